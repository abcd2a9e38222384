#!/bin/bash
# Round 18 (docs/benchmarks.md, "Leave-one-region-out perception, round 18"): the tower's last
# block as a level of the detector. That block of this DINOv2 copy was trained further for
# saliency (../shared/DESIGN.md), and no detector so far read it (levels 7, 9 and 11 of 12).
# One head a fold on the four OAM folds, on a cache of levels 7, 9, 11 and 12 (runs/l12/cache;
# its views are cut from the seeds round 13's were), scored on the held-out tiles and the held-out
# areas' 1,200 augmented views. Every step is resumable.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/experiments/one_head.sh
# 1. the cache: the building and satellite sets, then the tree and aircraft sets
$P scripts/loro.py --out runs/l12 --regions $B,$S --views-per-tile 16 --min-views 300 --max-views 300 --cache-layers 7,9,11,12 --cache-only
$P scripts/loro.py --out runs/l12 --regions $O --views-per-tile 16 --min-views 40 --max-views 300 --cache-layers 7,9,11,12 --cache-only
for run in l12_base l12_all_bal l12_all l12_base_bal; do
  mkdir -p "runs/$run" && ln -sfn "$PWD/runs/l12/cache" "runs/$run/cache"
done
# 2. levels 7, 9, 11 (the shipped detector's), then 7, 9, 11, 12 with each level scaled to one
# spread before their principal components (`--balance-levels`: the last block's patches
# spread six times as wide as level 11's, and level 11's four times level 7's). The balanced
# run was stopped after three folds (Kampala, Zanzibar, Banepa), each 0.07 below the first.
$P scripts/loro.py --out runs/l12_base --levels 7,9,11 --regions $B,$S,$O $RECIPE
$P scripts/loro.py --out runs/l12_all_bal --levels 7,9,11,12 --balance-levels --regions $B,$S,$O \
  --convs 3 --train-files 3 --heads 1 --input-dropout 0.3 --upsample 2 \
  --folds kampala_ug+trees_osbs+trees_soap+aircraft_b,zanzibar_tz+aircraft_a,banepa_np
# 3. the four levels as they are (the last block then takes most of the principal components),
# stopped after two folds (Kampala 0.13 and Zanzibar 0.09 below the first run)
$P scripts/loro.py --out runs/l12_all --levels 7,9,11,12 --regions $B,$S,$O \
  --convs 3 --train-files 3 --heads 1 --input-dropout 0.3 --upsample 2 \
  --folds kampala_ug+trees_osbs+trees_soap+aircraft_b,zanzibar_tz+aircraft_a
# 4. the three runs on the two areas every one of them holds out: tiles and augmented views
$P scripts/experiments/views_scores.py --runs runs/l12_base,runs/l12_all_bal,runs/l12_all --areas kampala_ug,zanzibar_tz
# 5. the shipped levels balanced, on the same two folds: is step 4's gain in counts the
# balance's or the last block's?
$P scripts/loro.py --out runs/l12_base_bal --levels 7,9,11 --balance-levels --regions $B,$S,$O \
  --convs 3 --train-files 3 --heads 1 --input-dropout 0.3 --upsample 2 \
  --folds kampala_ug+trees_osbs+trees_soap+aircraft_b,zanzibar_tz+aircraft_a
$P scripts/experiments/views_scores.py --runs runs/l12_base_bal --areas kampala_ug,zanzibar_tz
# 6. the balanced shipped levels on the other two folds, and the four areas' views
$P scripts/loro.py --out runs/l12_base_bal --levels 7,9,11 --balance-levels --regions $B,$S,$O \
  --convs 3 --train-files 3 --heads 1 --input-dropout 0.3 --upsample 2 --folds banepa_np,catanduanes_ph
$P scripts/experiments/views_scores.py --runs runs/l12_base,runs/l12_base_bal --areas banepa_np,catanduanes_ph
