"""How many detector heads to average? For each leave-one-region-out fold, heads from seeds
0, 1, ... are trained on the fold's cached views (kept in ``RUN/members/HELD/seedN``, as
`scripts/loro.py --heads` keeps them: resumable, shared); the held-out tiles are read by the
first 1, 2, ... of them averaged (`rsvlm.detector.DetectorEnsemble`), optionally in
``--views`` orientations too (`scripts/loro_tta.py`), thresholds chosen again on the other
regions' tiles each time.

    python scripts/loro_ensemble.py --run runs/loro --heads 4 --train-files 3 --regions kampala_ug
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loro import _fold_head, _load, _train_parts  # noqa: E402
from loro_tta import oriented_features, rescored  # noqa: E402

from rsvlm.detector import DetectorEnsemble  # noqa: E402
from training.detection import train_heads  # noqa: E402
from training.labelled import SETS  # noqa: E402


def fold_members(run: Path, held: str, names: list[str], heads: int, files: int | None,
                 epochs: int, reduce: int | None) -> list[torch.nn.Module]:
    _, config = _fold_head(run, held)
    feats, boxes = [], []
    for n in names:
        if n != held:
            for part in [*_train_parts(run, n, files), "eval"]:
                d = _load(run, n, part)
                feats.append(d["features"])
                boxes += d["boxes"]
    x = torch.cat(feats)
    head = train_heads(x, boxes, heads=heads, members=run / "members" / held,
                       hidden=x.shape[-1], levels=x.shape[1], epochs=epochs, dim=config.dim,
                       reduce=reduce, convs=config.convs)
    return list(head.members) if isinstance(head, DetectorEnsemble) else [head]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/loro")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--regions", default=",".join(SETS))
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--train-files", type=int, default=None,
                    help="a region's training-view cache files (as many as the folds took)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--reduce", type=int, default=128)
    ap.add_argument("--views", default="1", help="orientations read, comma list")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    run = Path(args.run)
    names = [n for n in SETS if (run / "cache" / f"{n}.eval.pt").is_file()]
    views = [int(v) for v in args.views.split(",")]
    feats = {n: oriented_features(run, args.data, n, None) if max(views) > 1 else
             _load(run, n, "eval")["features"].unsqueeze(1) for n in names}
    print("| held-out region | heads | orientations | F1 | P | R | counts within 20 % | "
          "presence | thresholds |\n|---|---|---|---|---|---|---|---|---|", flush=True)
    for held in args.regions.split(","):
        members = fold_members(run, held, names, args.heads, args.train_files, args.epochs,
                               args.reduce or None)
        for k in range(1, len(members) + 1):
            head = members[0] if k == 1 else DetectorEnsemble(members[:k])
            for v in views:
                print(f"| {held} | {k} | {v} | {rescored(run, held, names, head, feats, v)} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
