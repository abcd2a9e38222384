#!/usr/bin/env bash
# Trained connector ablation (issue 4): fit the embedded preset with each connector at the same
# small budget (training/configs/ablations/*.yaml), then score each on the held-back split with
# the same eval commands. Reports land in runs/ablate-<connector>/eval/; the model card renders
# them (python scripts/model_card.py --data runs/embedded_ds --render-only). Resumable.
#   bash scripts/ablate_connectors.sh [connector ...]   # default: all three
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin
DS=runs/embedded_ds
LIMIT=${LIMIT:-100}
if [ ! -f "$DS/dataset_card.json" ]; then
  echo "no dataset at $DS: run scripts/train_embedded.sh first (it builds it)" >&2
  exit 2
fi
connectors=("$@")
[ ${#connectors[@]} -gt 0 ] || connectors=(semantic_prompter mlp perceiver)
for connector in "${connectors[@]}"; do
  run=runs/ablate-$connector
  [ -f "$run/final/trained.json" ] ||
    $PY/rsvlm-train fit --config "training/configs/ablations/$connector.yaml" --resume auto
  mkdir -p "$run/eval"
  for task in classification vqa grounding; do
    [ -f "$run/eval/$task.json" ] || $PY/rsvlm-train eval --model "$run/final" --task "$task" \
      --data "$DS" --limit "$LIMIT" --out "$run/eval/$task.json" >/dev/null
  done
done
