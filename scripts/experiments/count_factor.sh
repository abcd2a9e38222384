#!/bin/bash
# Counts as the detections times a factor chosen with the counting threshold on the folds
# (DetectorConfig.count_factor, loro.pooled_count): the experiment, the folds' thresholds chosen
# again, the chat path, the shipped detector and the card. docs/benchmarks.md, "Counts times a
# factor chosen on the folds".
set -euo pipefail
cd "$(dirname "$0")/../.."
P=.venv/bin/python
RUN=${RUN:-runs/l12_ship}   # round 19's folds (scripts/experiments/round19.sh)
# 1. The experiment on the folds' tiles and held-out views: threshold alone against threshold
#    and factor, each chosen on the other OAM areas (tiles, views, or both). Before step 2:
#    --fold-threshold reads the folds' counting thresholds, which step 2 chooses again.
for on in views both; do $P scripts/experiments/count_scale.py --run $RUN --choose-on $on; done
$P scripts/experiments/count_scale.py --run $RUN --choose-on both --two-factors
$P scripts/experiments/count_scale.py --run $RUN --choose-on both --fold-threshold
# 2. Every fold's thresholds chosen again (writes each fold's count_factor, and the whole set's
#    choice in $RUN/counting.json), then the chat path with the folds' detectors (int8 tower).
$P scripts/loro.py --out $RUN --rescore
RUN=$RUN OUT=runs/refer_l12_int8k bash scripts/loro_refer.sh
# 3. The shipped detector takes the whole set's threshold and factor (the heads' members are
#    reused, so only detector.json changes); the card.
$P scripts/ship_detector.py --loro $RUN --parts assets/models/embedded --refiner-epochs 0
$P scripts/loro.py --out $RUN --table --card assets/models/embedded/MODEL_CARD.md \
  --refer runs/refer_l12_int8k --zoom runs/zoom_l12_336.md
$P scripts/model_card.py --data runs/embedded_ds
