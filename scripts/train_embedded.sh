#!/usr/bin/env bash
# Train the embedded default from ../shared/data (research-only sets are read, never copied),
# then ship its parts and write its model card. Resumable: run it again after an interruption.
#   bash scripts/train_embedded.sh            # everything
#   SKIP_FIT=1 bash scripts/train_embedded.sh # only re-ship and re-evaluate runs/embedded2/final
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${SHARED_DATA:-../shared/data}
if [ ! -d "$DATA/classification/aid_150px" ]; then
  echo "shared data not found at $DATA (set SHARED_DATA): cannot train the embedded model" >&2
  exit 2
fi
PY=.venv/bin
DS=runs/embedded_ds
if [ ! -f "$DS/dataset_card.json" ]; then
  $PY/rsvlm-train build-data --quiet --chip-size 256 --val-fraction 0.15 --seed 0 \
    --region "$DATA/demo_region/zanzibar_tz" --region "$DATA/demo_region/catanduanes_ph" \
    --region "$DATA/demo_region/banepa_np" --region "$DATA/demo_region/kampala_ug" \
    --region "$DATA/osm_tiles/labelmaker_portugal_z17" \
    --region "$DATA/roads/spacenet3_vegas_rgb_apls" \
    --image-folder "$DATA/classification/aid_150px" --out "$DS"
fi
# Two rounds: embedded.yaml (retriever, caption alignment, instruction tuning), then
# embedded_round2.yaml, which continues round 1's parts (see the comments in each config).
fit_round() {  # config, run folder
  [ -f "$2/final/trained.json" ] || $PY/rsvlm-train fit --config "$1" --resume auto
}
if [ -z "${SKIP_FIT:-}" ]; then
  fit_round training/configs/embedded.yaml runs/embedded
  fit_round training/configs/embedded_round2.yaml runs/embedded2
fi
$PY/python scripts/ship_embedded.py --run runs/embedded2/final --data "$DS"
$PY/python scripts/model_card.py --model assets/models/embedded --data "$DS"
