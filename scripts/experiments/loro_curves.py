"""Held-out find-all F1 and counts within 20 % at every threshold of the grid, for the same
held-out regions under several `scripts/loro.py` runs (each region read by its fold's
detector and refiner): two training recipes compared threshold by threshold, without choosing
thresholds.

    python scripts/experiments/loro_curves.py --runs runs/loro_mc,runs/loro_ig \
        --regions kampala_ug,zanzibar_tz --refiners runs/refine_q
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import loro  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", required=True, help="comma-separated loro.py --out folders")
    ap.add_argument("--regions", required=True)
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--refiners", default=None)
    args = ap.parse_args(argv)
    loro.DATA = Path(args.data)
    loro.REFINERS = [Path(d) for d in args.refiners.split(",")] if args.refiners else None
    print("| held-out region | run | F1 / counts within 20 % at " + " | ".join(
        str(t) for t in loro.THRESHOLDS) + " |\n|---|---|" + "---|" * len(loro.THRESHOLDS))
    for held in args.regions.split(","):
        for run in args.runs.split(","):
            out = Path(run)
            curve = loro._curves(out, held, loro._held_out_predictions(out, held))
            print(f"| {held} | {run} | " + " | ".join(
                f"{curve[t][0]:.3f} / {curve[t][2]:.2f}" for t in loro.THRESHOLDS) + " |",
                flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
