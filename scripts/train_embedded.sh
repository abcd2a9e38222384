#!/usr/bin/env bash
# Train the embedded default from ../shared/data (research-only sets are read, never copied),
# then ship its parts and write its model card. Resumable: run it again after an interruption.
#   bash scripts/train_embedded.sh            # everything
#   SKIP_FIT=1 bash scripts/train_embedded.sh # only re-ship and re-evaluate runs/embedded_follow/final
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${SHARED_DATA:-../shared/data}
if [ ! -d "$DATA/classification/aid_150px" ]; then
  echo "shared data not found at $DATA (set SHARED_DATA): cannot train the embedded model" >&2
  exit 2
fi
PY=.venv/bin
DS=runs/embedded_ds
build() {  # output folder, extra build-data arguments
  [ -f "$1/dataset_card.json" ] || $PY/rsvlm-train build-data --quiet --chip-size 256 \
    --val-fraction 0.15 --seed 0 \
    --region "$DATA/demo_region/zanzibar_tz" --region "$DATA/demo_region/catanduanes_ph" \
    --region "$DATA/demo_region/banepa_np" --region "$DATA/demo_region/kampala_ug" \
    --region "$DATA/osm_tiles/labelmaker_portugal_z17" \
    --region "$DATA/roads/spacenet3_vegas_rgb_apls" \
    --image-folder "$DATA/classification/aid_150px" --out "$1" "${@:2}"
}
build "$DS"
# The same split with 7 rotated/mirrored views of every training chip and AID training image:
# the box head's and the views retriever's data.
build runs/embedded_ds_aug --augment 7
# Five rounds: embedded.yaml (retriever, caption alignment, instruction tuning), then
# embedded_round2.yaml, which continues round 1's parts, then embedded_boxes.yaml, the box head
# on round 2's parts, then embedded_retriever_views.yaml, the retriever again on the views, then
# embedded_follow.yaml, a short instruction round on that retriever's lists (see the comments in
# each config).
fit_round() {  # config, run folder
  [ -f "$2/final/trained.json" ] || $PY/rsvlm-train fit --config "$1" --resume auto
}
if [ -z "${SKIP_FIT:-}" ]; then
  fit_round training/configs/embedded.yaml runs/embedded
  fit_round training/configs/embedded_round2.yaml runs/embedded2
  fit_round training/configs/embedded_boxes.yaml runs/embedded_boxes
  fit_round training/configs/embedded_retriever_views.yaml runs/embedded_retriever_views
  fit_round training/configs/embedded_follow.yaml runs/embedded_follow
fi
# Shipping round 2 builds the semantic database; the last round ships over it and keeps it (the
# language model reads its top-3 lists best: embedded_follow.yaml). A re-ship without refitting
# keeps the database already in assets/.
if [ -z "${SKIP_FIT:-}" ] || [ ! -d assets/models/embedded/semantic_db ]; then
  $PY/python scripts/ship_embedded.py --run runs/embedded2/final --data "$DS"
fi
$PY/python scripts/ship_embedded.py --run runs/embedded_follow/final --data "$DS" \
  --keep-database
$PY/python scripts/model_card.py --model assets/models/embedded --data "$DS"
