#!/bin/bash
# Referring grounding, VQA (presence, counting, rural/urban, area) and find-all through the chat
# path with each leave-one-region-out fold's detector (never trained on the region it is scored
# on), the four OAM areas, Atlanta and Rio, as `rsvlm-train eval` asks them. Needs
# `scripts/loro.py --out runs/loro` first.
# PARTS = the shipped parts with detector/ replaced by the fold's; reports in $OUT (runs/refer),
# which `scripts/loro.py --table --card ... --refer runs/refer` renders into the model card.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/loro}
D=${DATA:-../shared/data}
OUT=${OUT:-runs/refer}
mkdir -p runs/parts "$OUT"
parts() {
  rm -rf "runs/parts/$1"
  cp -as "$PWD/assets/models/embedded" "runs/parts/$1"
  rm -rf "runs/parts/$1/detector"
  cp -r "$RUN/folds/$1/detector" "runs/parts/$1/"
}
for r in zanzibar_tz kampala_ug banepa_np catanduanes_ph; do
  parts "$r"
  .venv/bin/rsvlm-train eval --task grounding --data "$D/demo_region/$r" --model "runs/parts/$r" \
    --limit 60 --out "$OUT/$r.grounding.json"
  for task in vqa findall; do
    .venv/bin/rsvlm-train eval --task $task --data "$D/demo_region/$r" --model "runs/parts/$r" \
      --out "$OUT/$r.$task.json"
  done
done
parts atlanta
.venv/bin/rsvlm-train eval --task grounding --data "$D/buildings/spacenet4_atlanta_pan_solaris" \
  --model runs/parts/atlanta --limit 60 --chip-size 450 --out "$OUT/atlanta.grounding.json"
for task in vqa findall; do
  .venv/bin/rsvlm-train eval --task $task --data "$D/buildings/spacenet4_atlanta_pan_solaris" \
    --model runs/parts/atlanta --chip-size 450 --out "$OUT/atlanta.$task.json"
done
# Rio (SpaceNet-1, 0.5 m WorldView-2: the dense city in satellite imagery), its masks made a
# region folder by scripts/rio_region.py; each chip (438 x 406 px) read as one 400 px chip.
[ -f runs/rio_region/buildings_epsg4326.geojson ] || \
  .venv/bin/python scripts/rio_region.py --data "$D" --out runs/rio_region
parts rio
.venv/bin/rsvlm-train eval --task grounding --data runs/rio_region --model runs/parts/rio \
  --limit 60 --chip-size 400 --out "$OUT/rio.grounding.json"
for task in vqa findall; do
  .venv/bin/rsvlm-train eval --task $task --data runs/rio_region --model runs/parts/rio \
    --chip-size 400 --out "$OUT/rio.$task.json"
done
