#!/bin/bash
# The detector's tower in int8 (ONNX Runtime dynamic quantization of the blocks' MatMuls)
# against float32: the chat path on every leave-one-region-out fold (round 19's folds), the
# detector read of the benchmark chip interleaved in one process, and the answer-time benchmark
# run alternately with each tower. docs/benchmarks.md, "The detector's tower in int8".
set -euo pipefail
cd "$(dirname "$0")/../.."
P=.venv/bin/python
RUN=${RUN:-runs/l12_ship}   # round 19's folds (scripts/experiments/round19.sh)
# 1. The chat path with each fold's detector, the tower in int8 (float32: runs/refer_l12).
RSVLM_DETECTOR_TOWER=onnx-int8 RUN=$RUN OUT=runs/refer_l12_int8 bash scripts/loro_refer.sh
for r in runs/refer_l12 runs/refer_l12_int8; do
  $P -c "import sys; sys.path.insert(0, 'scripts'); import loro; from pathlib import Path; print(loro.fold_chat_table(Path('$r')))"
done
# Rio's 75 referring questions at 200 px (round 19's commands), read in int8.
RSVLM_DETECTOR_TOWER=onnx-int8 .venv/bin/rsvlm-train eval --task grounding --data runs/rio_region \
  --model runs/parts/rio --limit 300 --chip-size 200 --out runs/refer_l12_int8/rio.grounding.200.json
# 2. The benchmark chip's detector read: PyTorch, float32 and int8 interleaved, and how many of
#    float32's boxes int8 finds again.
$P scripts/experiments/ab_onnx_tower.py --rounds 7
# 3. The answer-time benchmark, float32 and int8 towers alternately.
mkdir -p runs/int8_bench
for i in 1 2 3; do
  for t in onnx onnx-int8; do
    RSVLM_DETECTOR_TOWER=$t $P scripts/bench_model.py --repeats 3 > "runs/int8_bench/$t.$i.log" 2>&1
    echo "$t run $i: $(grep -E '"ours_(detector_answer|description_first_text)_s"' \
      "runs/int8_bench/$t.$i.log" | tr -d '\n ') $(grep -A2 peak_rss "runs/int8_bench/$t.$i.log" | grep ours | tr -d ' ')"
  done
done
# 4. The whole Zanzibar scene with its fold's detector, each tower.
D=${DATA:-../shared/data}
for t in onnx-int8 onnx torch; do
  RSVLM_DETECTOR_TOWER=$t $P scripts/bench_scene.py --raster "$D/demo_region/zanzibar_tz/oam_rgb_epsg3857.tif" \
    --footprints "$D/demo_region/zanzibar_tz/osm_buildings_epsg4326.geojson" --detector $RUN/folds/zanzibar_tz
done
# 5. The card's chat-path table from the int8 reports.
$P scripts/loro.py --out $RUN --table --card assets/models/embedded/MODEL_CARD.md \
  --refer runs/refer_l12_int8 --zoom runs/zoom_l12_336.md
