#!/bin/bash
# Leave-one-region-out round 13 (docs/benchmarks.md): roofs cut by a view's edge, and maps
# twice as fine as the patch grid. Every step is resumable (finished folds are skipped).
# Needs round 10's cache of the six building regions in runs/loro_mc/cache and round 13's
# cache of every set in runs/loro_r13/cache (the commands in docs/benchmarks.md build them).
set -euo pipefail
cd "$(dirname "$0")/../.."
P=.venv/bin/python
B=kampala_ug,zanzibar_tz,banepa_np,catanduanes_ph,rio,atlanta
O=trees_yell,trees_osbs,trees_soap,aircraft_a,aircraft_b
OAM="kampala_ug zanzibar_tz banepa_np catanduanes_ph"
for run in pv_base pv_30 pv_up2; do
  mkdir -p runs/$run && ln -sfn "$PWD/runs/loro_mc/cache" runs/$run/cache
done
# one head a fold, the six building regions: as before / 30 % rule / finer maps
for f in $OAM; do
  $P scripts/loro.py --out runs/pv_base --regions $B --convs 3 --train-files 3 --heads 1 --input-dropout 0.3 --folds $f
  $P scripts/loro.py --out runs/pv_30 --regions $B --convs 3 --train-files 3 --heads 1 --input-dropout 0.3 --folds $f --min-visible 0.3
  $P scripts/loro.py --out runs/pv_up2 --regions $B --convs 3 --train-files 3 --heads 1 --input-dropout 0.3 --folds $f --upsample 2
done
# the shipped recipe (buildings, trees, aircraft) with finer maps: two heads, then four
F=kampala_ug+trees_osbs+trees_soap+aircraft_b,zanzibar_tz+aircraft_a,banepa_np,catanduanes_ph
for heads in 2 4; do
  run=runs/loro_up$heads
  mkdir -p $run && ln -sfn "$PWD/runs/loro_r13/cache" $run/cache
  [ "$heads" = 4 ] && mkdir -p $run/members && cp -rn runs/loro_up2/members/. $run/members/
  $P scripts/loro.py --out $run --regions $B,$O --convs 3 --train-files 3 --heads $heads --input-dropout 0.3 --upsample 2 --folds $F
  # through the chat path, as the evaluation asks, each area with its fold's detector
  mkdir -p runs/parts_up$heads runs/refer_up$heads
  for r in $OAM; do
    rm -rf runs/parts_up$heads/$r && cp -as "$PWD/assets/models/embedded" runs/parts_up$heads/$r
    rm -rf runs/parts_up$heads/$r/detector && cp -r $run/folds/$r/detector runs/parts_up$heads/$r/
    for task in findall vqa; do
      .venv/bin/rsvlm-train eval --task $task --data ../shared/data/demo_region/$r \
        --model runs/parts_up$heads/$r --out runs/refer_up$heads/$r.$task.json
    done
  done
  $P -c "import sys; sys.path.insert(0, 'scripts'); import loro; from pathlib import Path; print(loro.fold_chat_table(Path('runs/refer_up$heads')))"
done
# the box refiner on the finer maps' boxes (stopped after two areas in round 13)
$P scripts/loro_refine.py --run runs/loro_up2 --out runs/refine_up2 --epochs 20 --width 24 --per-set 1500 --steps 1 --rescore 0 --regions kampala_ug,zanzibar_tz
# the dense city: Rio's fold with finer maps, and referring on its 200 px chips
$P scripts/loro.py --out runs/loro_up2 --regions $B,$O --convs 3 --train-files 3 --heads 2 --input-dropout 0.3 --upsample 2 --folds rio
rm -rf runs/parts_up2/rio && cp -as "$PWD/assets/models/embedded" runs/parts_up2/rio
rm -rf runs/parts_up2/rio/detector && cp -r runs/loro_up2/folds/rio/detector runs/parts_up2/rio/
.venv/bin/rsvlm-train eval --task grounding --data runs/rio_region --model runs/parts_up2/rio --limit 300 \
  --chip-size 200 --out runs/refer_up2/rio.grounding.200.json
