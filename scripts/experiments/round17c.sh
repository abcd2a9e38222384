#!/bin/bash
# Round 17, step 4 (docs/benchmarks.md, "Leave-one-region-out perception, round 17"): after
# weight decay 0.3 (a little better on the views, no better on the tiles) and 32 views a step
# (worse on both), the two further along each line: decay 1.0, and 8 views a step.
set -euo pipefail
cd "$(dirname "$0")/../.."
P=.venv/bin/python
B=kampala_ug,zanzibar_tz,banepa_np,catanduanes_ph
S=rio,atlanta
O=trees_yell,trees_osbs,trees_soap,aircraft_a,aircraft_b
F=kampala_ug+trees_osbs+trees_soap+aircraft_b,zanzibar_tz+aircraft_a,banepa_np,catanduanes_ph
R="--regions $B,$S,$O --convs 3 --train-files 3 --heads 1 --input-dropout 0.3 --upsample 2 --folds $F"
for run in loro_up1_wd10 loro_up1_b8; do
  mkdir -p runs/$run && ln -sfn "$PWD/runs/loro_r13/cache" runs/$run/cache
done
$P scripts/loro.py --out runs/loro_up1_wd10 --weight-decay 1.0 $R
$P scripts/loro.py --out runs/loro_up1_b8 --batch-size 8 $R
$P scripts/experiments/views_scores.py --runs runs/loro_up1,runs/loro_up1_s1,runs/loro_up1_wd3,runs/loro_up1_wd10,runs/loro_up1_b8
