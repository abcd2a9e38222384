"""Imagery of unknown ground (an uploaded PNG or JPEG) read whole or zoomed in (four crops, as
imagery of 0.3 m or coarser is read), with each region's leave-one-region-out detector
(`runs/parts/REGION`, never trained on it): find-all F1, counts within 20 %, and the median side
of the whole read's boxes (0-1 of the image), the signal a choice between the two reads could
rest on.

    python scripts/experiments/plain_zoom.py --regions rio,zanzibar_tz,... [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loro import eval_tile_size  # noqa: E402

from rsvlm.loading import load  # noqa: E402
from training.detection import score_detections  # noqa: E402
from training.labelled import load_sets, tiles  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--parts", default="runs/parts")
    ap.add_argument("--regions", required=True)
    ap.add_argument("--out", default="runs/exp/plain_zoom.json")
    args = ap.parse_args()
    report = {}
    for region in args.regions.split(","):
        loaded = load(str(Path(args.parts) / region))
        perception = loaded.perception
        box_t = perception.config.cut("building", "find_all")
        count_t = perception.config.cut("building", "count")
        (items,) = load_sets(Path(args.data), [region]).values()
        reads = {"whole": [], "zoomed": []}
        truths, sizes, sides = [], [], []
        for item in items:
            size = item.tile or eval_tile_size(item.gsd)
            for _, im, boxes in tiles(item, size):
                image = Image.fromarray(np.ascontiguousarray(im))
                w, h = image.size
                truths.append(torch.tensor(boxes / np.array([w, h, w, h], np.float32)
                                           if len(boxes) else np.zeros((0, 4), np.float32)))
                sizes.append((w, h))
                for name, gsd in (("whole", None), ("zoomed", 1.0)):
                    dets = [d for d in perception.detect(image, gsd) if d.label == "building"]
                    reads[name].append([(*d.box, d.score) for d in dets])
                whole = [d for d in reads["whole"][-1] if d[4] >= box_t]
                sides.append(float(np.median([max(d[2] - d[0], d[3] - d[1]) for d in whole]))
                             if whole else None)
        row = {"tiles": len(truths), "median_side": sides}
        for name, preds in reads.items():
            boxes = score_detections(preds, truths, sizes, box_t)
            counts = score_detections(preds, truths, sizes, count_t)
            row[name] = {"f1": round(boxes["f1"], 3), "precision": round(boxes["precision"], 3),
                         "recall": round(boxes["recall"], 3),
                         "count_within_20": round(counts["counting"]["within_20pct"], 3)}
        report[region] = row
        print(region, {k: v for k, v in row.items() if k != "median_side"},
              "median side", np.nanmedian([s for s in sides if s is not None] or [np.nan]),
              flush=True)
        report[region]["reads"] = reads
    Path(args.out).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
