#!/bin/bash
# Round 14 (docs/benchmarks.md, "Leave-one-region-out perception, round 14"): referring answers
# replayed on recorded detections, the heads read in mirrored feature grids, and heads of two
# grids averaged. Needs round 13's folds (runs/loro_up2, runs/parts_up2, runs/parts_r13/rio and
# the cache in runs/loro_r13/cache: scripts/experiments/round13.sh) and runs/rio_region.
set -euo pipefail
cd "$(dirname "$0")/../.."
P=.venv/bin/python
D=${DATA:-../shared/data}
B=kampala_ug,zanzibar_tz,banepa_np,catanduanes_ph,rio,atlanta
O=trees_yell,trees_osbs,trees_soap,aircraft_a,aircraft_b
# 1. every referring question's detections, recorded once, then the rules scored on them
for r in zanzibar_tz kampala_ug banepa_np catanduanes_ph; do
  $P scripts/experiments/refer_replay.py record --data "$D/demo_region/$r" --model runs/parts_up2/$r \
    --limit 60 --out runs/exp/replay/${r}_up2.pkl
done
$P scripts/experiments/refer_replay.py record --data runs/rio_region --model runs/parts_up2/rio \
  --chip-size 200 --limit 300 --out runs/exp/replay/rio_up2.pkl
$P scripts/experiments/refer_replay.py record --data runs/rio_region --model runs/parts_r13/rio \
  --chip-size 200 --limit 300 --out runs/exp/replay/rio_r13.pkl
$P scripts/experiments/refer_replay.py score runs/exp/replay/*.pkl
# 2. the heads over mirrored and turned feature grids (the tower once)
$P scripts/experiments/feature_tta.py --run runs/loro_up2 --views 1,2,8
# 3. two heads on the patch grid (same cache and recipe as runs/loro_up2, no --upsample), then
#    averaged with the finer heads
mkdir -p runs/loro_p2 && ln -sfn "$PWD/runs/loro_r13/cache" runs/loro_p2/cache
$P scripts/loro.py --out runs/loro_p2 --regions $B,$O --convs 3 --train-files 3 --heads 2 --input-dropout 0.3 \
  --folds kampala_ug+trees_osbs+trees_soap+aircraft_b,zanzibar_tz+aircraft_a,banepa_np,catanduanes_ph
$P scripts/experiments/mixed_grids.py --coarse runs/loro_p2 --fine runs/loro_up2 --weights 0,0.3,0.5,0.7,1
