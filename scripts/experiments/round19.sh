#!/bin/bash
# Round 19 (docs/benchmarks.md, "Leave-one-region-out perception, round 19"): round 18's balanced
# levels (`--balance-levels` on levels 7, 9, 11) with the shipped recipe (two heads a fold, finer
# maps) on every fold the card reads (the four OAM areas, Rio, Atlanta), then the shipped head
# and every number of the card through the chat path. Needs round 18's cache (runs/l12/cache:
# scripts/experiments/round18.sh, step 1). Seed 0 of the OAM folds is round 18's
# (runs/l12_base_bal/members); every step is resumable.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/experiments/one_head.sh
D=${DATA:-../shared/data}
RUN=runs/l12_ship
mkdir -p $RUN && ln -sfn "$PWD/runs/l12/cache" $RUN/cache
cp -rn runs/l12_base_bal/members $RUN/
# 1. two heads a fold, balanced levels, the four OAM folds, then Rio and Atlanta
$P scripts/loro.py --out $RUN --levels 7,9,11 --balance-levels --regions $B,$S,$O \
  --convs 3 --train-files 3 --heads 2 --input-dropout 0.3 --upsample 2 --folds $F,rio,atlanta
# 2. the held-out views, against the shipped folds' (round 14)
$P scripts/experiments/views_scores.py --runs $RUN
# 3. every chat-path number with the folds' detectors (the language model's parts as shipped),
#    the satellite folds read zoomed in, Rio's referring questions at 200 px chips
RUN=$RUN OUT=runs/refer_l12 bash scripts/loro_refer.sh
$P scripts/loro_zoom.py --run $RUN --regions rio,atlanta --input-size 336 > runs/zoom_l12_336.md
$P -c "import sys; sys.path.insert(0, 'scripts'); import loro; from pathlib import Path; print(loro.fold_chat_table(Path('runs/refer_l12')))"
.venv/bin/rsvlm-train eval --task grounding --data runs/rio_region --model runs/parts/rio --limit 300 \
  --chip-size 200 --out runs/refer_l12/rio.grounding.200.json
# 4. shipped: the same recipe's heads on every region and set, the folds' thresholds; then the
#    card, its examples, the whole-scene and answer-time benchmarks, presence on Dubai
$P scripts/ship_detector.py --loro $RUN --parts assets/models/embedded --refiner-epochs 0
$P scripts/experiments/dubai_presence.py --out runs/exp/dubai_presence_l12.json
$P scripts/loro.py --out $RUN --rescore --card assets/models/embedded/MODEL_CARD.md \
  --refer runs/refer_l12 --zoom runs/zoom_l12_336.md
$P scripts/loro_examples.py --run $RUN --card assets/models/embedded/MODEL_CARD.md
$P scripts/bench_scene.py --raster "$D/demo_region/zanzibar_tz/oam_rgb_epsg3857.tif" \
  --footprints "$D/demo_region/zanzibar_tz/osm_buildings_epsg4326.geojson" --detector $RUN/folds/zanzibar_tz
$P scripts/bench_model.py --repeats 3
