"""Round 16: the shipped recipe's one-head folds at another peak learning rate.

`scripts/loro.py` with `train_detector`'s ``lr`` (2e-3 in every round so far) replaced, then
the same arguments as loro.py takes: ``python scripts/experiments/learning_rate.py --lr 1e-3
--out runs/loro_up1_lr1 --regions ... --folds ...``. Score against `runs/loro_up1` with
`views_scores.py`."""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import loro  # noqa: E402

from training import detection  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lr", type=float, required=True)
    args, rest = ap.parse_known_args(argv)
    # train_heads looks train_detector up in its module at each call
    detection.train_detector = functools.partial(detection.train_detector, lr=args.lr)
    return loro.main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
