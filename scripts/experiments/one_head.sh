# Sourced by the rounds that compare one-head folds (round16.sh, round17.sh), from the repo root:
# the sets, the four OAM folds (each building area held out with sets of other classes), the
# shipped recipe read as one head, and run folders on round 13's cache
# (runs/loro_r13/cache: scripts/experiments/round13.sh).
P=.venv/bin/python
B=kampala_ug,zanzibar_tz,banepa_np,catanduanes_ph
S=rio,atlanta
O=trees_yell,trees_osbs,trees_soap,aircraft_a,aircraft_b
F=kampala_ug+trees_osbs+trees_soap+aircraft_b,zanzibar_tz+aircraft_a,banepa_np,catanduanes_ph
RECIPE="--convs 3 --train-files 3 --heads 1 --input-dropout 0.3 --upsample 2 --folds $F"

on_r13_cache() {
  for run in "$@"; do
    mkdir -p "runs/$run" && ln -sfn "$PWD/runs/loro_r13/cache" "runs/$run/cache"
  done
}
