#!/bin/bash
# Round 15 (docs/benchmarks.md, "Leave-one-region-out perception, round 15"): a stem on the
# pixels beside the tower's patch tokens. Needs round 14's folds (runs/loro_up2 and the cache
# in runs/loro_r13/cache: scripts/experiments/round13.sh and round14.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
P=.venv/bin/python
# 0. where the shipped recipe's misses are
$P scripts/experiments/misses.py --run runs/loro_up2
# 1. the cut-again views are the cached ones (the tower on them gives the cached features)
$P scripts/experiments/pixel_stem.py --run runs/loro_up2 --check
# 2. one head with the stem per OAM fold against the fold's seed-0 head, on tiles and views
$P scripts/experiments/pixel_stem.py --run runs/loro_up2 --out runs/exp/pixel_stem
# 3. a find-all threshold by box size, chosen across the folds' held-out reads
$P scripts/experiments/size_thresholds.py --run runs/loro_up2
# 4. round 14's recipes on the held-out areas' augmented views too; counting by threshold;
#    the tiles and views read at other sizes
$P scripts/experiments/views_scores.py --runs runs/loro_up2,runs/loro_up4,runs/loro_p4,runs/loro_p2
$P scripts/experiments/views_scores.py --runs runs/loro_up2 --count-curves
$P scripts/experiments/views_scores.py --runs runs/loro_up2 --read-sizes 392,504
# 5. centre sampling (the cells next to a roof's centre cell are centres too): one head a fold
#    against the shipped recipe's seed-0 head, then two heads a fold against runs/loro_up2
B=kampala_ug,zanzibar_tz,banepa_np,catanduanes_ph,rio,atlanta
O=trees_yell,trees_osbs,trees_soap,aircraft_a,aircraft_b
F=kampala_ug+trees_osbs+trees_soap+aircraft_b,zanzibar_tz+aircraft_a,banepa_np,catanduanes_ph
for run in loro_up1 loro_up1_c1 loro_up2_c1; do
  mkdir -p runs/$run/members && ln -sfn "$PWD/runs/loro_r13/cache" runs/$run/cache
done
for f in ${F//,/ }; do
  mkdir -p "runs/loro_up1/members/$f" && cp -n "runs/loro_up2/members/$f/seed0.safetensors" "runs/loro_up1/members/$f/"
done
$P scripts/loro.py --out runs/loro_up1 --regions $B,$O --convs 3 --train-files 3 --heads 1 --input-dropout 0.3 --upsample 2 --folds $F
$P scripts/loro.py --out runs/loro_up1_c1 --regions $B,$O --convs 3 --train-files 3 --heads 1 --input-dropout 0.3 --upsample 2 --centre-radius 1 --folds $F
$P scripts/experiments/views_scores.py --runs runs/loro_up1,runs/loro_up1_c1
cp -rn runs/loro_up1_c1/members/. runs/loro_up2_c1/members/
$P scripts/loro.py --out runs/loro_up2_c1 --regions $B,$O --convs 3 --train-files 3 --heads 2 --input-dropout 0.3 --upsample 2 --centre-radius 1 --folds $F
$P scripts/experiments/views_scores.py --runs runs/loro_up2,runs/loro_up2_c1
# 6. the two heads with centre sampling through the chat path (the card's thresholds)
for r in kampala_ug zanzibar_tz banepa_np catanduanes_ph; do
  mkdir -p runs/parts_up2c1 runs/refer_up2c1
  rm -rf runs/parts_up2c1/$r && cp -as "$PWD/assets/models/embedded" runs/parts_up2c1/$r
  rm -rf runs/parts_up2c1/$r/detector && cp -r runs/loro_up2_c1/folds/$r/detector runs/parts_up2c1/$r/
  for task in findall vqa; do
    .venv/bin/rsvlm-train eval --task $task --data "${DATA:-../shared/data}/demo_region/$r" \
      --model runs/parts_up2c1/$r --out runs/refer_up2c1/$r.$task.json
  done
done
$P -c "import sys; sys.path.insert(0, 'scripts'); import loro; from pathlib import Path; print(loro.fold_chat_table(Path('runs/refer_up2c1')))"
