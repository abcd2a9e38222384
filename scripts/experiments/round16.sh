#!/bin/bash
# Round 16 (docs/benchmarks.md, "Leave-one-region-out perception, round 16"): more of the same
# data, longer training, the aerial folds without the satellite sets, dilated convolutions. One head a fold
# against round 15's seed-0 heads (runs/loro_up1: scripts/experiments/round15.sh, step 5), on the
# held-out tiles and the held-out areas' 1,200 augmented views. Needs round 13's cache
# (runs/loro_r13/cache: scripts/experiments/round13.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/experiments/one_head.sh
on_r13_cache loro_up1_t4 loro_up1_e12 loro_up1_oam loro_up1_d2 loro_up1_s1
# 1. a fourth cached part of training views per region (train3; 300 -> 400 views an area)
$P scripts/loro.py --out runs/loro_up1_t4 --regions $B,$S,$O --convs 3 --train-files 4 --heads 1 --input-dropout 0.3 --upsample 2 --folds $F
# 2. 12 epochs instead of 8
$P scripts/loro.py --out runs/loro_up1_e12 --regions $B,$S,$O --convs 3 --train-files 3 --heads 1 --input-dropout 0.3 --upsample 2 --epochs 12 --folds $F
# 3. the aerial folds trained without Rio and Atlanta (0.5 m satellite)
$P scripts/loro.py --out runs/loro_up1_oam --regions $B,$O --convs 3 --train-files 3 --heads 1 --input-dropout 0.3 --upsample 2 --folds $F
# 4. dilated convolutions (1, 2, 4 patches apart)
$P scripts/loro.py --out runs/loro_up1_d2 --regions $B,$S,$O --convs 3 --train-files 3 --heads 1 --input-dropout 0.3 --upsample 2 --dilation 2 --folds $F
# 5. how far a seed moves a one-head fold: the shipped recipe's seed-1 heads (runs/loro_up2) read alone
for f in ${F//,/ }; do
  mkdir -p "runs/loro_up1_s1/members/$f"
  cp -n "runs/loro_up2/members/$f/seed1.safetensors" "runs/loro_up1_s1/members/$f/seed0.safetensors"
done
$P scripts/loro.py --out runs/loro_up1_s1 --regions $B,$S,$O --convs 3 --train-files 3 --heads 1 --input-dropout 0.3 --upsample 2 --folds $F
$P scripts/experiments/views_scores.py --runs runs/loro_up1,runs/loro_up1_s1,runs/loro_up1_t4,runs/loro_up1_e12,runs/loro_up1_oam,runs/loro_up1_d2
# 6. the peak learning rate halved and doubled (2e-3 in every round so far)
for lr in 1e-3 4e-3; do
  run=loro_up1_lr${lr:0:1}
  on_r13_cache $run
  $P scripts/loro.py --lr $lr --out runs/$run --regions $B,$S,$O --convs 3 --train-files 3 --heads 1 --input-dropout 0.3 --upsample 2 --folds $F
done
$P scripts/experiments/views_scores.py --runs runs/loro_up1,runs/loro_up1_lr1,runs/loro_up1_lr4
