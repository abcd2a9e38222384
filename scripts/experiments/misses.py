"""Where a leave-one-region-out detector's misses are: F1 at three IoUs, recall by footprint
size, and the scores of the large roofs it finds or loses.

Each OAM fold's detector (`RUN/folds/AREA`) on its held-out tiles, at the find-all threshold
the other OAM areas' tiles favour (`feature_tta.held_out_scores`):

- find-all precision / recall / F1 with a box matching a footprint at IoU 0.5, 0.3 and 0.1
  (`training.metrics.match_boxes`, as the evaluation matches);
- recall at IoU 0.5 by footprint area (pixels of the tile), down to a score of 0.05 and at
  the threshold;
- for footprints of at least 2,000 px² (45 m² at 0.15 m): the median score of the best box
  matching each at IoU 0.5 (those matched down to 0.02), and how many of those the threshold
  loses touch the tile's edge, against all of them.

    python scripts/experiments/misses.py --run runs/loro_up2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.detection import predict  # noqa: E402
from training.metrics import box_iou, detection_scores, match_boxes  # noqa: E402

OAM = ["banepa_np", "catanduanes_ph", "kampala_ug", "zanzibar_tz"]
BINS = [0, 1000, 2000, 4000, float("inf")]
LARGE = 2000


def f1_at(preds: list, truths: list, sizes: list, threshold: float, min_iou: float
          ) -> dict[str, float | int]:
    tp = n_pred = n_true = 0
    for pred, truth, (w, h) in zip(preds, truths, sizes, strict=True):
        s = np.array([w, h, w, h], np.float32)
        p = [np.array(d[:4]) * s for d in pred if d[4] >= threshold]
        t = [np.array(b) * s for b in truth.tolist()]
        tp, n_pred, n_true = tp + match_boxes(p, t, min_iou), n_pred + len(p), n_true + len(t)
    return detection_scores(tp, n_pred, n_true)


def main() -> None:
    import loro
    from feature_tta import held_out_scores

    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/loro_up2")
    args = ap.parse_args()
    run = Path(args.run)
    print("| held-out area | threshold | F1 at IoU 0.5 | 0.3 | 0.1 | recall at 0.1 |")
    print("|---|---|---|---|---|---|")
    rows = []
    for held in OAM:
        head = loro._fold_head(run, held)[0].eval()
        thr = held_out_scores(run, held, OAM, head)["threshold"]
        test = loro._load(run, held, "eval")
        with torch.inference_mode():
            preds = predict(head, test["features"], 0.02)
        at = {m: f1_at(preds, test["boxes"], test["sizes"], thr, m) for m in (0.5, 0.3, 0.1)}
        print(f"| {held} | {thr:.2f} | {at[0.5]['f1']:.3f} | {at[0.3]['f1']:.3f} | "
              f"{at[0.1]['f1']:.3f} | {at[0.1]['recall']:.2f} |")
        total = np.zeros(len(BINS) - 1)
        found = {0.05: np.zeros(len(BINS) - 1), thr: np.zeros(len(BINS) - 1)}
        large_scores, lost_edge, all_edge = [], [], []
        for pred, truth, (w, h) in zip(preds, test["boxes"], test["sizes"], strict=True):
            s = np.array([w, h, w, h], np.float32)
            for tb in truth.tolist():
                tb = np.array(tb) * s
                area = (tb[2] - tb[0]) * (tb[3] - tb[1])
                k = int(np.searchsorted(BINS, area, side="right")) - 1
                total[k] += 1
                fits = [(box_iou(np.array(d[:4]) * s, tb), d[4]) for d in pred]
                best = max([sc for f, sc in fits if f >= 0.5], default=0.0)
                for cut, hits in found.items():
                    hits[k] += best >= cut
                if area >= LARGE:
                    edge = tb[0] < 3 or tb[1] < 3 or tb[2] > w - 3 or tb[3] > h - 3
                    all_edge.append(edge)
                    if best > 0:
                        large_scores.append(best)
                    if best < thr:
                        lost_edge.append(edge)
        rows.append((held, total, {c: v / np.maximum(total, 1) for c, v in found.items()},
                     thr, np.median(large_scores) if large_scores else float("nan"),
                     np.mean(lost_edge) if lost_edge else float("nan"), np.mean(all_edge),
                     len(all_edge)))
    print("\n| held-out area | footprints by area (px²: <1000, 1000-2000, 2000-4000, >=4000) "
          "| recall at IoU 0.5, scores >= 0.05 | at the threshold | large roofs: median score "
          "when matched | lost ones touching the edge | all touching the edge |")
    print("|---|---|---|---|---|---|---|")
    for held, total, recall, thr, med, lost, edge, n in rows:
        print(f"| {held} | {' / '.join(str(int(v)) for v in total)} | "
              f"{' / '.join(f'{v:.2f}' for v in recall[0.05])} | "
              f"{' / '.join(f'{v:.2f}' for v in recall[thr])} | {med:.2f} | {lost:.2f} | "
              f"{edge:.2f} ({n}) |")


if __name__ == "__main__":
    main()
