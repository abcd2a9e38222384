"""Sweep the box head's "find all" threshold (`box_head_threshold`) on a build-data split.

For every "find all" question of the split, the head's boxes above each threshold (after the
same non-maximum suppression the chat engine applies) are matched one-to-one to the OSM boxes at
IoU 0.5; the table gives precision, recall and F1 per threshold, and the best F1. Choose the
threshold on the training split and score it on validation, so validation stays held back:

    .venv/bin/python scripts/box_threshold.py --model assets/models/embedded \
        --data runs/embedded_ds --split train --split val

Then set it in the model folder's `trained.json` ("architecture": {"box_head_threshold": ...})
or in a fit config's `model_overrides`. This scores the head alone, on every question; in the
app the head is asked only when the language model's answer holds a box.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def find_all_items(data: Path, split: str) -> list[tuple[Path, str, list[tuple[float, ...]]]]:
    """(image, question, OSM boxes in pixels) of the split's "find all" questions."""
    from training.dataset_files import question_of
    from training.evaluate import split_records

    return [(data / r["image"], question_of(r), [tuple(b) for b in r["meta"]["boxes_px"]])
            for r in split_records(data, split, "grounding")
            if (r.get("meta") or {}).get("type") == "find_all"]


def sweep(loaded, items, thresholds) -> dict[float, dict[str, float]]:
    import torch
    from PIL import Image

    from rsvlm.box_head import select_boxes
    from training.metrics import match_boxes

    model, processor = loaded.model, loaded.processor
    counts = {t: [0, 0, 0] for t in thresholds}  # matched, predicted, true
    for path, question, truth in items:
        with Image.open(path) as im:
            image = im.convert("RGB")
        ids, mask = processor.encode_queries([question])
        pixels = processor.image_processor([image], return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            logits, boxes = model.predict_boxes(pixels.to(model.device, model.dtype),
                                                ids.to(model.device), mask.to(model.device))
        w, h = image.size
        for t in thresholds:
            found = select_boxes(logits[0], boxes[0], single=False, threshold=t)
            pred = [(b[0] * w, b[1] * h, b[2] * w, b[3] * h) for _, b in found]
            c = counts[t]
            c[0] += match_boxes(pred, truth)
            c[1] += len(pred)
            c[2] += len(truth)
    out = {}
    for t, (tp, n_pred, n_true) in counts.items():
        p = tp / n_pred if n_pred else 0.0
        r = tp / n_true if n_true else 0.0
        out[t] = {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if tp else 0.0}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="assets/models/embedded",
                        help="a model folder or preset with a box head")
    parser.add_argument("--data", type=Path, required=True, help="a build-data folder")
    parser.add_argument("--split", action="append", choices=("train", "val"),
                        help="split(s) to score (repeatable; default train)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=THRESHOLDS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="also write the tables as JSON")
    args = parser.parse_args()

    from rsvlm.loading import load

    loaded = load(args.model, device=args.device)
    if loaded.model.box_head is None:
        sys.exit(f"{args.model} has no box head")
    report = {"model": str(args.model),
              "threshold_in_use": loaded.model.config.box_head_threshold, "splits": {}}
    for split in args.split or ["train"]:
        items = find_all_items(args.data, split)
        if not items:
            sys.exit(f"{args.data / (split + '.jsonl')} has no \"find all\" questions")
        table = sweep(loaded, items, args.thresholds)
        best = max(table, key=lambda t: table[t]["f1"])
        report["splits"][split] = {"questions": len(items), "best_f1_threshold": best,
                                   "by_threshold": table}
        print(f"{split}: {len(items)} \"find all\" questions "
              f"(threshold in use: {loaded.model.config.box_head_threshold})")
        print("threshold  precision  recall  F1")
        for t, m in table.items():
            print(f"{t:9.2f}  {m['precision']:9.3f}  {m['recall']:6.3f}  {m['f1']:.3f}"
                  + ("  <- best F1" if t == best else ""))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
