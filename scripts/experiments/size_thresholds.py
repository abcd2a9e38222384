"""Leave-one-region-out: one find-all threshold, or one for small boxes and one for large?

Large roofs that a box matches score a median of 0.45-0.56 on a region the detector never
saw, close to the find-all threshold, and the threshold loses a quarter of them; small roofs
are seldom found at all (`scripts/experiments/misses.py`). Here a box is kept when its score
reaches the threshold of its size: ``small`` below ``split`` of the image's area, ``large``
from there. Each OAM fold's detector reads its held-out area once (tiles, and the area's 300
augmented views no fold trained on); the rule for an area is the one with the best pooled F1
over the other three areas' held-out tiles, each read by its own fold (never the area's own).
The single threshold is chosen the same way.

    python scripts/experiments/size_thresholds.py --run runs/loro_up2
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.metrics import detection_scores, match_boxes  # noqa: E402

OAM = ["banepa_np", "catanduanes_ph", "kampala_ug", "zanzibar_tz"]
CUTS = [round(x, 2) for x in np.arange(0.15, 0.55, 0.05)]
SPLITS = [0.005, 0.01, 0.02, 0.04]


def counts(preds: list, truths: list, sizes: list, small: float, large: float, split: float
           ) -> tuple[int, int, int]:
    tp = n_pred = n_true = 0
    for pred, truth, (w, h) in zip(preds, truths, sizes, strict=True):
        scale = np.array([w, h, w, h], np.float32)
        keep = [d for d in pred
                if d[4] >= (small if (d[2] - d[0]) * (d[3] - d[1]) < split else large)]
        p = [np.array(d[:4]) * scale for d in keep]
        t = [np.array(b) * scale for b in truth.tolist()]
        tp += match_boxes(p, t)
        n_pred, n_true = n_pred + len(p), n_true + len(t)
    return tp, n_pred, n_true


def main() -> None:
    import loro
    from views_scores import _reads

    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/loro_up2")
    args = ap.parse_args()
    run = Path(args.run)
    tiles, views = {}, {}
    for area in OAM:
        head = loro._fold_head(run, area)[0].eval()
        tiles[area] = _reads(run, area, head, ["eval"])
        views[area] = _reads(run, area, head, loro._train_parts(run, area, 3))
    rules = [(c, c, 1.0) for c in CUTS] + [
        (a, b, s) for a, b, s in itertools.product(CUTS, CUTS, SPLITS) if a != b]
    table = {area: {r: counts(*tiles[area], *r) for r in rules} for area in OAM}
    print("| held-out area | one threshold | tiles F1 | views F1 | by size (small / large / "
          "split) | tiles F1 | views F1 |")
    print("|---|---|---|---|---|---|---|")
    means = np.zeros(4)
    for area in OAM:
        def pooled(rule: tuple, held: str = area) -> float:
            tp, n_pred, n_true = (sum(table[o][rule][i] for o in OAM if o != held)
                                  for i in range(3))
            return detection_scores(tp, n_pred, n_true)["f1"]

        one = max((r for r in rules if r[2] == 1.0), key=pooled)
        two = max(rules, key=pooled)
        row = []
        for rule in (one, two):
            row.append(detection_scores(*table[area][rule])["f1"])
            row.append(detection_scores(*counts(*views[area], *rule))["f1"])
        means += np.array(row) / len(OAM)
        print(f"| {area} | {one[0]:.2f} | {row[0]:.3f} | {row[1]:.3f} | {two[0]:.2f} / "
              f"{two[1]:.2f} / {two[2]:g} | {row[2]:.3f} | {row[3]:.3f} |")
    print(f"| mean | | {means[0]:.3f} | {means[1]:.3f} | | {means[2]:.3f} | {means[3]:.3f} |")


if __name__ == "__main__":
    main()
