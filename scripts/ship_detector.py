"""Train the dense detector on every cached region of a `scripts/loro.py` run and write it into
trained parts (``PARTS/detector/``).

The thresholds (boxes; presence and counts) are the medians of those the leave-one-region-out
folds chose on their selection regions (never on a held-out one), so the shipped head is scored by those folds'
numbers: a head trained on all regions is not scored anywhere else.

    python scripts/ship_detector.py --loro runs/loro --parts assets/models/embedded
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rsvlm.perception import DetectorConfig, save_detector  # noqa: E402
from training.detection import INPUT_SIZE, train_detector  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loro", default="runs/loro")
    ap.add_argument("--parts", default="assets/models/embedded")
    ap.add_argument("--epochs", type=int, default=None, help="the folds' (default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    loro = Path(args.loro)
    folds = [json.loads(p.read_text()) for p in sorted((loro / "folds").glob("*.json"))]
    if not folds:
        raise SystemExit(f"{loro}/folds holds no fold results: run scripts/loro.py first")
    regions = sorted(p.name.removesuffix(".pt") for p in (loro / "cache").glob("*.pt")
                     if p.name.count(".") == 1)
    feats, boxes = [], []
    for name in regions:
        for path in [*sorted((loro / "cache").glob(f"{name}.train*.pt")),
                     loro / "cache" / f"{name}.eval.pt"]:
            d = torch.load(path, weights_only=False, mmap=True)  # read once into the stack
            feats.append(d["features"])
            boxes += d["boxes"]
    x = torch.cat(feats)
    epochs = args.epochs or folds[0]["epochs"]
    dim, reduce, convs = folds[0].get("dim", 96), folds[0].get("reduce"), folds[0].get("convs", 2)
    head = train_detector(x, boxes, hidden=x.shape[-1], levels=x.shape[1], epochs=epochs,
                          seed=args.seed, dim=dim, reduce=reduce, convs=convs)
    threshold = statistics.median(f["threshold"] for f in folds)
    count_threshold = statistics.median(f.get("count_threshold", f["threshold"]) for f in folds)
    sizes = {torch.load(loro / "cache" / f"{r}.pt", weights_only=False).get("input_size",
                                                                          INPUT_SIZE)
             for r in regions}
    if len(sizes) != 1:
        raise SystemExit(f"{loro}/cache mixes input sizes {sorted(sizes)}")
    config = DetectorConfig(labels=["building"], input_size=sizes.pop(), hidden=x.shape[-1],
                            dim=dim, convs=convs,
                            threshold=threshold, count_threshold=count_threshold, notes={
                                "trained_on": regions, "views": len(x), "epochs": epochs,
                                "threshold": "median of the LORO folds' selected thresholds",
                                "loro_f1": {f["held_out"]: round(f["f1"], 3) for f in folds}})
    folder = save_detector(head, config, args.parts)
    print(json.dumps({"detector": str(folder), "threshold": threshold, "views": len(x)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
