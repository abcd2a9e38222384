#!/bin/bash
# Round 17, step 3 (docs/benchmarks.md, "Leave-one-region-out perception, round 17"): LoveDA's
# three rural crops (0.3 m, `training.labelled.loveda`) added to every fold's training, as the
# other sets are: 300 augmented views. The run's cache is round 13's (linked file by file, so
# that round 13's own folder stays as it was) plus LoveDA's.
set -euo pipefail
cd "$(dirname "$0")/../.."
P=.venv/bin/python
B=kampala_ug,zanzibar_tz,banepa_np,catanduanes_ph
S=rio,atlanta
O=trees_yell,trees_osbs,trees_soap,aircraft_a,aircraft_b
F=kampala_ug+trees_osbs+trees_soap+aircraft_b,zanzibar_tz+aircraft_a,banepa_np,catanduanes_ph
run=runs/loro_up1_lv
mkdir -p $run/cache
for f in runs/loro_r13/cache/*.pt; do ln -sfn "$PWD/$f" "$run/cache/$(basename "$f")"; done
$P scripts/loro.py --out $run --regions loveda --views-per-tile 16 --min-views 300 --max-views 300 --cache-only
$P scripts/loro.py --out $run --regions $B,$S,loveda,$O --convs 3 --train-files 3 --heads 1 --input-dropout 0.3 --upsample 2 --folds $F
$P scripts/experiments/views_scores.py --runs runs/loro_up1,runs/loro_up1_s1,$run
