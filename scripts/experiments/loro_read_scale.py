"""Leave-one-region-out: a small chip read at the detector's input size, or at its own scale?

The detector reads every chip at its input size (448 px). The views it trained on are 512 px
tiles at 0.15 m, so a roof spans as many patches as it does at about 0.17 m a pixel. A chip of
256 px at 0.15 m (38 m across: build-data's held-back chips, or a small box drawn on the map)
read at 448 px shows its roofs 1.75 times as large as the head learnt them, and the head finds
parts of roofs as roofs. This cuts each OAM area's scoring tiles into `--chip` px chips (boxes
at least half inside, clipped, as the tiles keep theirs) and reads each at 448 px and at the
size that keeps the training scale (`rsvlm.perception.read_size`), with the head of the fold
that never saw the area (the base heads of `loro_tune_tower.py`, one head, no refiner).

    python scripts/experiments/loro_read_scale.py --run runs/loro_mc --chip 256 [--sizes 322,280]

Measured (issue 18, round 10), mean of the four areas, F1 / counts within 20 % / count MAPE:
448 px 0.323 / 0.286 / 1.64; 322 px 0.393 / 0.312 / 1.04; 280 px 0.388 / 0.261 / 1.01; 224 px
(the training views' centre scale, shipped) 0.442 / 0.231 / 0.81. Kampala alone reads best at
448 px (F1 0.287 against 0.239): its small sheds need the magnification.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import loro  # noqa: E402

from rsvlm.perception import read_size  # noqa: E402
from training.detection import FrozenTower, predict, score_detections  # noqa: E402
from training.labelled import crop_boxes, load_sets  # noqa: E402

OAM = ["kampala_ug", "zanzibar_tz", "banepa_np", "catanduanes_ph"]


def chips_of(run: Path, region: str, chip: int
             ) -> tuple[list[np.ndarray], list[torch.Tensor], float]:
    gsd = load_sets(loro.DATA, [region])[region][0].gsd
    images, boxes = [], []
    _, tiles = loro.held_out_tiles(loro.DATA, region)
    truths = loro._load(run, region, "eval")["boxes"]
    for tile, truth in zip(tiles, truths, strict=True):
        h, w = tile.shape[:2]
        px = truth.numpy() * np.array([w, h, w, h], np.float32)
        for y in range(0, h - chip + 1, chip):
            for x in range(0, w - chip + 1, chip):
                crop = tile[y:y + chip, x:x + chip]
                b = crop_boxes(px, x, y, chip, chip, 0.5)
                images.append(crop)
                boxes.append(torch.from_numpy(b / chip).float().reshape(-1, 4))
    return images, boxes, gsd


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/loro_mc")
    ap.add_argument("--heads", default="runs/exp/tune_tower")
    ap.add_argument("--chip", type=int, default=256)
    ap.add_argument("--box-threshold", type=float, default=0.35)
    ap.add_argument("--count-threshold", type=float, default=0.25)
    ap.add_argument("--sizes", default="",
                    help="more read sizes to compare, comma-separated (e.g. 322)")
    ap.add_argument("--out", default="runs/exp/read_scale.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    result = {}
    towers: dict[int, FrozenTower] = {}
    for held in OAM:
        head = torch.load(Path(args.heads) / held / "base.pt", weights_only=False)
        images, truths, gsd = chips_of(Path(args.run), held, args.chip)
        sizes = [(args.chip, args.chip)] * len(images)
        row = {"chips": len(images), "gsd": gsd}
        extra = [(s, int(s)) for s in args.sizes.split(",") if s]
        for label, size in (("448", 448), ("own scale", read_size(args.chip, gsd, 448)),
                            *extra):
            tower = towers.setdefault(size, FrozenTower(size=size))
            feats = torch.cat([tower(images[i:i + 8]) for i in range(0, len(images), 8)])
            preds = predict(head, feats, 0.1)
            boxes = score_detections(preds, truths, sizes, args.box_threshold)
            counts = score_detections(preds, truths, sizes, args.count_threshold)
            row[label] = {"size": size, "f1": round(boxes["f1"], 3),
                          "precision": round(boxes["precision"], 3),
                          "recall": round(boxes["recall"], 3),
                          "within_20pct": round(counts["counting"]["within_20pct"], 3),
                          "mape": round(counts["counting"]["mape"] or 0, 3)}
        result[held] = row
        print(held, json.dumps(row), flush=True)
    for label in ("448", "own scale", *[s for s in args.sizes.split(",") if s]):
        result.setdefault("mean", {})[label] = {
            k: round(float(np.mean([result[h][label][k] for h in OAM])), 3)
            for k in ("f1", "within_20pct", "mape")}
    print(json.dumps(result["mean"], indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
