#!/bin/bash
# Round 17, steps 1-2 (docs/benchmarks.md, "Leave-one-region-out perception, round 17"): the optimiser's last
# untried settings, weight decay and batch size. One head a fold against round 15's seed-0 heads
# (runs/loro_up1: scripts/experiments/round15.sh, step 5) and their seed-1 twins
# (runs/loro_up1_s1: round16.sh, step 5), on the held-out tiles and the held-out areas' 1,200
# augmented views. Needs round 13's cache (runs/loro_r13/cache: scripts/experiments/round13.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
P=.venv/bin/python
B=kampala_ug,zanzibar_tz,banepa_np,catanduanes_ph
S=rio,atlanta
O=trees_yell,trees_osbs,trees_soap,aircraft_a,aircraft_b
F=kampala_ug+trees_osbs+trees_soap+aircraft_b,zanzibar_tz+aircraft_a,banepa_np,catanduanes_ph
R="--regions $B,$S,$O --convs 3 --train-files 3 --heads 1 --input-dropout 0.3 --upsample 2 --folds $F"
for run in loro_up1_wd3 loro_up1_b32; do
  mkdir -p runs/$run && ln -sfn "$PWD/runs/loro_r13/cache" runs/$run/cache
done
# 1. AdamW's weight decay 0.3, not 0.05
$P scripts/loro.py --out runs/loro_up1_wd3 --weight-decay 0.3 $R
# 2. 32 views a step, not 16 (half the steps over the same 8 epochs)
$P scripts/loro.py --out runs/loro_up1_b32 --batch-size 32 $R
$P scripts/experiments/views_scores.py --runs runs/loro_up1,runs/loro_up1_s1,runs/loro_up1_wd3,runs/loro_up1_b32
