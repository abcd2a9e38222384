#!/bin/bash
# Round 15 (docs/benchmarks.md, "Leave-one-region-out perception, round 15"): a stem on the
# pixels beside the tower's patch tokens. Needs round 14's folds (runs/loro_up2 and the cache
# in runs/loro_r13/cache: scripts/experiments/round13.sh and round14.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
P=.venv/bin/python
# 0. where the shipped recipe's misses are
$P scripts/experiments/misses.py --run runs/loro_up2
# 1. the cut-again views are the cached ones (the tower on them gives the cached features)
$P scripts/experiments/pixel_stem.py --run runs/loro_up2 --check
# 2. one head with the stem per OAM fold against the fold's seed-0 head, on tiles and views
$P scripts/experiments/pixel_stem.py --run runs/loro_up2 --out runs/exp/pixel_stem
# 3. a find-all threshold by box size, chosen across the folds' held-out reads
$P scripts/experiments/size_thresholds.py --run runs/loro_up2
# 4. round 14's recipes on the held-out areas' augmented views too; counting by threshold;
#    the tiles and views read at other sizes
$P scripts/experiments/views_scores.py --runs runs/loro_up2,runs/loro_up4,runs/loro_p4,runs/loro_p2
$P scripts/experiments/views_scores.py --runs runs/loro_up2 --count-curves
$P scripts/experiments/views_scores.py --runs runs/loro_up2 --read-sizes 392,504
