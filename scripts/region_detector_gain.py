"""What `rsvlm-train finetune`'s detector step buys on a region the detector never saw.

A leave-one-region-out fold's head (`scripts/loro.py`: trained without REGION) stands in for
the shipped detector; it is continued on REGION's training chips exactly as the finetune step
does (`training.region_detector.tune_detector`), and both heads are scored on REGION's
held-back chips (the same spatial-block split as `finetune`): find-all precision / recall / F1
at IoU 0.5 and counts within 20 %, at the shipped thresholds.

    python scripts/region_detector_gain.py --region ../shared/data/demo_region/zanzibar_tz \\
        --fold runs/loro/folds/zanzibar_tz --out runs/gain_zanzibar
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def score(perception, items) -> dict:
    from PIL import Image

    from training.metrics import count_scores, detection_scores, match_boxes

    tp = n_pred = n_true = 0
    counts = []
    for it in items:
        h, w = it.image.shape[:2]
        dets = perception.detect(Image.fromarray(it.image))
        boxes = [np.array(d.box) * [w, h, w, h] for d in perception.select(dets, "find_all")]
        tp += match_boxes(boxes, list(it.boxes))
        n_pred, n_true = n_pred + len(boxes), n_true + len(it.boxes)
        counts.append((len(perception.select(dets, "count")), len(it.boxes)))
    return {"chips": len(items), **detection_scores(tp, n_pred, n_true),
            "counting": count_scores(counts)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--region", required=True)
    ap.add_argument("--fold", required=True, help="parts folder holding detector/ (a LORO fold)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--chip-size", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--val-fraction", type=float, default=0.2,
                    help="share held back (finetune's 0.2; more: a steadier score, less to tune on)")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoImageProcessor, Dinov2Model

    from rsvlm import weights
    from rsvlm.perception import Perception
    from training.region import load_region
    from training.region_detector import region_items, tune_detector

    torch.set_num_threads(2)
    spec = load_region(args.region, chip_size=args.chip_size, val_fraction=args.val_fraction,
                       block_chips=2)
    held = [it for it in region_items(spec, 0, split="val")]
    t0 = time.perf_counter()
    tuned = tune_detector(spec, Path(args.fold), Path(args.out), epochs=args.epochs, lr=args.lr)
    tune_s = time.perf_counter() - t0
    vision_dir = weights.ensure_embedded_weights(components=[weights.VISION])[weights.VISION]
    model = Dinov2Model.from_pretrained(vision_dir).eval()
    processor = AutoImageProcessor.from_pretrained(vision_dir)
    report = {"region": spec.name, "held_back_chips": len(held),
              "held_back_buildings": int(sum(len(it.boxes) for it in held)),
              "tune_s": round(tune_s, 1)}
    for name, parts in (("before", Path(args.fold)), ("after", tuned.parent if tuned else None)):
        if parts is None:
            continue
        report[name] = score(Perception.load(parts, model, processor), held)
    text = json.dumps(report, indent=2)
    (Path(args.out) / "gain.json").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
