"""The find-all threshold chosen on the other OAM areas' tiles alone (as `loro.cross_thresholds`
chooses it) or on their tiles and held-out augmented views together: which one scores the
held-out area better?

    python scripts/experiments/box_threshold_views.py --run runs/l12_ship
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from views_scores import OAM, _reads  # noqa: E402

from training.detection import score_detections  # noqa: E402

GRID = [0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5]


def main(argv: list[str] | None = None) -> int:
    import loro

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/l12_ship")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    run = Path(args.run)
    f1: dict[str, dict[str, dict[float, float]]] = {}
    for area in OAM:
        head = loro._fold_head(run, area)[0].eval()
        f1[area] = {}
        for label, parts in (("tiles", ["eval"]), ("views", loro._train_parts(run, area, 3))):
            preds, boxes, sizes = _reads(run, area, head, parts)
            f1[area][label] = {t: score_detections(preds, boxes, sizes, t)["f1"] for t in GRID}
    print("| held-out area | chosen on tiles: t, F1 tiles / views | on tiles and views: t, F1 "
          "tiles / views |\n|---|---|---|")
    rows = []
    for held in OAM:
        others = [a for a in OAM if a != held]
        on_tiles = max(GRID, key=lambda t: np.mean([f1[a]["tiles"][t] for a in others]))
        on_both = max(GRID, key=lambda t: np.mean([f1[a][r][t] for a in others
                                                   for r in ("tiles", "views")]))
        row = [f1[held][r][t] for t in (on_tiles, on_both) for r in ("tiles", "views")]
        rows.append(row)
        print(f"| {held} | {on_tiles}: {row[0]:.3f} / {row[1]:.3f} | {on_both}: {row[2]:.3f} / "
              f"{row[3]:.3f} |")
    m = np.mean(rows, axis=0)
    print(f"| mean | {m[0]:.3f} / {m[1]:.3f} | {m[2]:.3f} / {m[3]:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
