#!/bin/bash
# Round 14 (docs/benchmarks.md, "Leave-one-region-out perception, round 14"): referring answers
# replayed on recorded detections, the heads read in mirrored feature grids, and heads of two
# grids averaged. Needs round 13's folds (runs/loro_up2, runs/parts_up2, runs/parts_r13/rio and
# the cache in runs/loro_r13/cache: scripts/experiments/round13.sh) and runs/rio_region.
set -euo pipefail
cd "$(dirname "$0")/../.."
P=.venv/bin/python
D=${DATA:-../shared/data}
B=kampala_ug,zanzibar_tz,banepa_np,catanduanes_ph,rio,atlanta
O=trees_yell,trees_osbs,trees_soap,aircraft_a,aircraft_b
# 1. every referring question's detections, recorded once, then the rules scored on them
for r in zanzibar_tz kampala_ug banepa_np catanduanes_ph; do
  $P scripts/experiments/refer_replay.py record --data "$D/demo_region/$r" --model runs/parts_up2/$r \
    --limit 60 --out runs/exp/replay/${r}_up2.pkl
done
$P scripts/experiments/refer_replay.py record --data runs/rio_region --model runs/parts_up2/rio \
  --chip-size 200 --limit 300 --out runs/exp/replay/rio_up2.pkl
$P scripts/experiments/refer_replay.py record --data runs/rio_region --model runs/parts_r13/rio \
  --chip-size 200 --limit 300 --out runs/exp/replay/rio_r13.pkl
$P scripts/experiments/refer_replay.py score runs/exp/replay/*.pkl
# 2. the heads over mirrored and turned feature grids (the tower once)
$P scripts/experiments/feature_tta.py --run runs/loro_up2 --views 1,2,8
# 3. two heads on the patch grid (same cache and recipe as runs/loro_up2, no --upsample), then
#    averaged with the finer heads
mkdir -p runs/loro_p2 && ln -sfn "$PWD/runs/loro_r13/cache" runs/loro_p2/cache
$P scripts/loro.py --out runs/loro_p2 --regions $B,$O --convs 3 --train-files 3 --heads 2 --input-dropout 0.3 \
  --folds kampala_ug+trees_osbs+trees_soap+aircraft_b,zanzibar_tz+aircraft_a,banepa_np,catanduanes_ph
$P scripts/experiments/mixed_grids.py --coarse runs/loro_p2 --fine runs/loro_up2 --weights 0,0.3,0.5,0.7,1
# 4. the patch grid with four heads (seeds 0-1 from runs/loro_p2), through the chat path too
mkdir -p runs/loro_p4/members && ln -sfn "$PWD/runs/loro_r13/cache" runs/loro_p4/cache
cp -rn runs/loro_p2/members/. runs/loro_p4/members/
$P scripts/loro.py --out runs/loro_p4 --regions $B,$O --convs 3 --train-files 3 --heads 4 --input-dropout 0.3 \
  --folds kampala_ug+trees_osbs+trees_soap+aircraft_b,zanzibar_tz+aircraft_a,banepa_np,catanduanes_ph
for run in p2 p4; do
  for r in kampala_ug zanzibar_tz banepa_np catanduanes_ph; do
    mkdir -p runs/parts_$run runs/refer_$run
    rm -rf runs/parts_$run/$r && cp -as "$PWD/assets/models/embedded" runs/parts_$run/$r
    rm -rf runs/parts_$run/$r/detector && cp -r runs/loro_$run/folds/$r/detector runs/parts_$run/$r/
    for task in findall vqa; do
      .venv/bin/rsvlm-train eval --task $task --data "$D/demo_region/$r" --model runs/parts_$run/$r \
        --out runs/refer_$run/$r.$task.json
    done
  done
  $P -c "import sys; sys.path.insert(0, 'scripts'); import loro; from pathlib import Path; print(loro.fold_chat_table(Path('runs/refer_$run')))"
done
# 5. shipped: two heads with finer maps on every region and set (no box refiner: it moves these
#    boxes off the roofs, round 13), the folds' thresholds; then every number of the card and bar
#    again with runs/loro_up2's folds
$P scripts/loro.py --out runs/loro_up2 --regions $B,$O --convs 3 --train-files 3 --heads 2 --input-dropout 0.3 --upsample 2 --folds atlanta
$P scripts/ship_detector.py --loro runs/loro_up2 --parts assets/models/embedded --refiner-epochs 0
RUN=runs/loro_up2 OUT=runs/refer_up2full bash scripts/loro_refer.sh
$P scripts/loro_zoom.py --run runs/loro_up2 --regions rio,atlanta --input-size 336 > runs/zoom_up2_336.md
$P scripts/loro.py --out runs/loro_up2 --rescore --card assets/models/embedded/MODEL_CARD.md \
  --refer runs/refer_up2full --zoom runs/zoom_up2_336.md
$P scripts/loro_examples.py --run runs/loro_up2 --card assets/models/embedded/MODEL_CARD.md
$P scripts/bench_scene.py --raster "$D/demo_region/zanzibar_tz/oam_rgb_epsg3857.tif" \
  --footprints "$D/demo_region/zanzibar_tz/osm_buildings_epsg4326.geojson" --detector runs/loro_up2/folds/zanzibar_tz
$P scripts/bench_model.py --repeats 3
$P scripts/experiments/dubai_presence.py --out runs/exp/dubai_presence_up2.json
$P scripts/experiments/presence_thresholds.py --run runs/loro_up2
# 6. presence at its own threshold (chosen on the folds): folds rescored (their detectors take
#    it), the shipped detector written again from the same heads, presence asked again
$P scripts/loro.py --out runs/loro_up2 --rescore
$P scripts/ship_detector.py --loro runs/loro_up2 --parts assets/models/embedded --refiner-epochs 0
for r in zanzibar_tz kampala_ug banepa_np catanduanes_ph atlanta rio; do
  rm -rf runs/parts/$r && cp -as "$PWD/assets/models/embedded" runs/parts/$r
  rm -rf runs/parts/$r/detector && cp -r runs/loro_up2/folds/$r/detector runs/parts/$r/
done
for r in zanzibar_tz kampala_ug banepa_np catanduanes_ph; do
  .venv/bin/rsvlm-train eval --task vqa --data "$D/demo_region/$r" --model runs/parts/$r --out runs/refer_up2full/$r.vqa.json
done
.venv/bin/rsvlm-train eval --task vqa --data "$D/buildings/spacenet4_atlanta_pan_solaris" --model runs/parts/atlanta --chip-size 450 --out runs/refer_up2full/atlanta.vqa.json
.venv/bin/rsvlm-train eval --task vqa --data runs/rio_region --model runs/parts/rio --chip-size 400 --out runs/refer_up2full/rio.vqa.json
$P scripts/experiments/dubai_presence.py --out runs/exp/dubai_presence_up2p.json
$P scripts/loro.py --out runs/loro_up2 --rescore --card assets/models/embedded/MODEL_CARD.md \
  --refer runs/refer_up2full --zoom runs/zoom_up2_336.md
$P scripts/loro_examples.py --run runs/loro_up2 --card assets/models/embedded/MODEL_CARD.md
