"""Presence on each fold's held-out tiles at each threshold: where a region has tiles without
buildings, the threshold counts are chosen at (0.15 for the finer maps) says "yes" too often.

    python scripts/experiments/presence_thresholds.py --run runs/loro_up2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import loro

    from training.detection import THRESHOLDS, predict, score_detections

    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/loro_up2")
    ap.add_argument("--regions", default="banepa_np,catanduanes_ph,kampala_ug,zanzibar_tz,rio,atlanta")
    args = ap.parse_args()
    out = Path(args.run)
    print("| held-out region | tiles | without buildings | "
          + " | ".join(f"presence at {t:g}" for t in THRESHOLDS[1:]) + " |")
    print("|---|---|---|" + "---|" * len(THRESHOLDS[1:]))
    for held in args.regions.split(","):
        head, _ = loro._fold_head(out, held)
        test = loro._load(out, held, "eval")
        with torch.inference_mode():
            preds = predict(head.eval(), test["features"], 0.1)
        empty = sum(len(b) == 0 for b in test["boxes"])
        cells = [f"{score_detections(preds, test['boxes'], test['sizes'], t)['presence']:.3f}"
                 for t in THRESHOLDS[1:]]
        print(f"| {held} | {len(preds)} | {empty} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
