#!/bin/bash
# Round 17 (docs/benchmarks.md, "Leave-one-region-out perception, round 17"): the optimiser's last
# untried settings (weight decay, batch size) and LoveDA's crops. One head a fold against round
# 15's seed-0 heads (runs/loro_up1: scripts/experiments/round15.sh, step 5) and their seed-1
# twins (runs/loro_up1_s1: round16.sh, step 5), on the held-out tiles and the held-out areas'
# 1,200 augmented views.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/experiments/one_head.sh
on_r13_cache loro_up1_wd3 loro_up1_b32 loro_up1_wd10 loro_up1_b8
# 1. AdamW's weight decay 0.3, not 0.05
$P scripts/loro.py --out runs/loro_up1_wd3 --weight-decay 0.3 --regions $B,$S,$O $RECIPE
# 2. 32 views a step, not 16 (half the steps over the same 8 epochs)
$P scripts/loro.py --out runs/loro_up1_b32 --batch-size 32 --regions $B,$S,$O $RECIPE
$P scripts/experiments/views_scores.py --runs runs/loro_up1,runs/loro_up1_s1,runs/loro_up1_wd3,runs/loro_up1_b32
# 3. LoveDA's three rural crops (0.3 m, `training.labelled.loveda`) in every fold's training, 300
# views as every set has. The run's cache is round 13's, linked file by file so that round 13's
# folder stays as it was, plus LoveDA's.
run=runs/loro_up1_lv
mkdir -p $run/cache
for f in runs/loro_r13/cache/*.pt; do ln -sfn "$PWD/$f" "$run/cache/$(basename "$f")"; done
$P scripts/loro.py --out $run --regions loveda --views-per-tile 16 --min-views 300 --max-views 300 --cache-only
$P scripts/loro.py --out $run --regions $B,$S,loveda,$O $RECIPE
$P scripts/experiments/views_scores.py --runs runs/loro_up1,runs/loro_up1_s1,$run
# 4. further along each line: weight decay 1.0, and 8 views a step
$P scripts/loro.py --out runs/loro_up1_wd10 --weight-decay 1.0 --regions $B,$S,$O $RECIPE
$P scripts/loro.py --out runs/loro_up1_b8 --batch-size 8 --regions $B,$S,$O $RECIPE
$P scripts/experiments/views_scores.py --runs runs/loro_up1,runs/loro_up1_s1,runs/loro_up1_wd3,runs/loro_up1_wd10,runs/loro_up1_b8
# 5. a third seed of the baseline, for the size of a seed's move
on_r13_cache loro_up1_s2
$P scripts/loro.py --out runs/loro_up1_s2 --seed 2 --regions $B,$S,$O $RECIPE
$P scripts/experiments/views_scores.py --runs runs/loro_up1,runs/loro_up1_s1,runs/loro_up1_s2
