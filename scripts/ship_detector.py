"""Train the dense detector on every cached region of a `scripts/loro.py` run and write it into
trained parts (``PARTS/detector/``).

The thresholds (boxes; presence and counts) are those every leave-one-region-out fold's held-out
region agrees best on, each scored by the fold's head that never saw it
(`loro.pooled_thresholds`), so the shipped head is scored by those folds' numbers: a head
trained on all regions is not scored anywhere else. With sets of other classes cached (trees,
aircraft: `training.labelled.CLASS_SETS`), the head detects those classes too, each at the
thresholds its held-out sets favour (`loro.class_table`). Each head is kept in
``LORO/members/shipped/`` as it finishes, so a stopped run picks up where it was.

The box refiner (`rsvlm.refine`: a second look at each box in the chip's pixels) is trained
on every labelled set found under ``--data`` (buildings and aircraft; `scripts/loro_refine.py`
measures it region by region) and kept in ``LORO/members/shipped/refiner.pt``.

    python scripts/ship_detector.py --loro runs/loro --parts assets/models/embedded \
        --refiners runs/refine
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import loro as loro_module  # noqa: E402
from loro import (  # noqa: E402
    class_f1,
    class_table,
    class_training,
    cross_thresholds,
    fold_classes,
    pooled_presence,
    pooled_thresholds,
    training_stack,
)

from rsvlm.perception import DetectorConfig, save_detector  # noqa: E402
from rsvlm.refine import BoxRefiner  # noqa: E402
from training.detection import INPUT_SIZE, train_heads  # noqa: E402
from training.refine import (  # noqa: E402
    MOVES,
    load_checkpoint,
    refiner_sets,
    save_checkpoint,
    train_refiner,
)

# The folds' training settings (`scripts/loro.py` records them) that the shipped heads are
# trained with; a field an older fold lacks keeps `train_detector`'s default.
TRAINING_FIELDS = ("input_dropout", "iou_target", "ignore_below", "upsample", "centre_radius",
                   "dilation", "lr", "weight_decay", "batch_size", "balance_levels")


def shipped_refiner(args: argparse.Namespace, path: Path) -> BoxRefiner:
    """The box refiner on every labelled building and aircraft set (kept at ``path``)."""
    if path.is_file():
        return load_checkpoint(path)
    if not args.data.is_dir():
        raise SystemExit(f"{args.data} is absent: the box refiner trains on its labelled sets "
                         "(--refiner-epochs 0 ships none)")
    sets, quality_sets = refiner_sets(args.data)
    refiner = train_refiner(sets, epochs=args.refiner_epochs, per_set=1500,
                            width=args.refiner_width, seed=args.seed, quality_sets=quality_sets)
    save_checkpoint(refiner, path, trained_on=list(sets))
    return refiner


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loro", default="runs/loro")
    ap.add_argument("--parts", default="assets/models/embedded")
    ap.add_argument("--epochs", type=int, default=None, help="the folds' (default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"),
                    help="the labelled sets the box refiner trains on")
    ap.add_argument("--refiner-epochs", type=int, default=20, help="0: no box refiner")
    ap.add_argument("--refiners", default=None,
                    help="the folds' refiners (scripts/loro_refine.py's folder, as given to "
                         "loro.py --refiners): thresholds chosen on the refined boxes")
    ap.add_argument("--refiner-width", type=int, default=24)
    ap.add_argument("--refiner-steps", type=int, default=1)
    ap.add_argument("--min-f1", type=float, default=0.5,
                    help="answer a class other than buildings only when its held-out sets' "
                         "mean find-all F1 reaches this (it stays in the weights either way)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    loro = Path(args.loro)
    if args.refiner_epochs and not args.refiners:
        raise SystemExit("a detector shipped with a box refiner takes thresholds chosen on "
                         "refined boxes: give --refiners (or --refiner-epochs 0)")
    loro_module.REFINERS = ([Path(d) for d in args.refiners.split(",")] if args.refiners
                            else None)
    loro_module.DATA = args.data
    folds = [json.loads(p.read_text()) for p in sorted((loro / "folds").glob("*.json"))]
    if not folds:
        raise SystemExit(f"{loro}/folds holds no fold results: run scripts/loro.py first")
    regions = sorted(p.name.removesuffix(".pt") for p in (loro / "cache").glob("*.pt")
                     if p.name.count(".") == 1)
    # As many training views a region as the folds took, as many heads; the folds' classes.
    fold = folds[0]
    classes = fold_classes(regions)
    x, boxes, view_classes, known = training_stack(loro, regions, fold.get("train_files"),
                                                   classes)
    epochs = args.epochs or fold["epochs"]
    dim, reduce, convs = fold.get("dim", 96), fold.get("reduce"), fold.get("convs", 2)
    heads = fold.get("heads", 1)
    extra = class_training(classes, view_classes, known, fold.get("object_negatives", False))
    head = train_heads(x, boxes, heads=heads, seed=args.seed, hidden=x.shape[-1],
                       levels=x.shape[1], epochs=epochs, dim=dim, reduce=reduce, convs=convs,
                       members=loro / "members" / "shipped",
                       **{k: fold[k] for k in TRAINING_FIELDS if k in fold}, **extra)
    curves = cross_thresholds(loro)
    threshold, count_threshold = pooled_thresholds(curves)
    # The counting threshold and factor chosen together on every fold (`loro.pooled_count`).
    counting = (json.loads((loro / "counting.json").read_text())
                if (loro / "counting.json").is_file() else {})
    count_threshold = counting.get("count_threshold", count_threshold)
    count_factor = counting.get("count_factor", 1.0)
    per_class = class_table(loro)[1] if (loro / "class_folds").is_dir() else {}
    f1 = class_f1(loro) if per_class else {}
    answers = [c for c in classes if c == "building" or f1.get(c, 0.0) >= args.min_f1]
    folds = [json.loads(p.read_text()) for p in sorted((loro / "folds").glob("*.json"))]
    sizes = {torch.load(loro / "cache" / f"{r}.pt", weights_only=False).get("input_size",
                                                                          INPUT_SIZE)
             for r in regions}
    if len(sizes) != 1:
        raise SystemExit(f"{loro}/cache mixes input sizes {sorted(sizes)}")
    config = DetectorConfig(labels=classes, input_size=sizes.pop(), hidden=x.shape[-1],
                            # the tower's levels the folds read (`loro.py --levels`)
                            layers=fold.get("levels", DetectorConfig().layers),
                            dim=dim, convs=convs, heads=heads,
                            upsample=fold.get("upsample", 1),
                            dilation=fold.get("dilation", 1), threshold=threshold,
                            count_threshold=count_threshold, count_factor=count_factor,
                            presence_threshold=pooled_presence(curves, count_threshold),
                            class_thresholds={c: list(per_class[c]) for c in classes[1:]
                                              if c in per_class},
                            answers=None if answers == classes else answers, notes={
                                "trained_on": regions, "views": len(x), "epochs": epochs,
                                "heads": heads, "input_dropout": fold.get("input_dropout", 0.0),
                                "iou_target": fold.get("iou_target", False),
                                "ignore_below": fold.get("ignore_below", 0.0),
                                # how the heads were trained, so the weights say it themselves
                                **{k: fold[k] for k in TRAINING_FIELDS if k in fold},
                                "threshold": "best mean over the LORO folds' held-out regions",
                                "class_f1": {c: round(v, 3) for c, v in f1.items()},
                                "loro_f1": {f["held_out"]: round(f["f1"], 3) for f in folds}})
    refiner = None
    if args.refiner_epochs:
        refiner = shipped_refiner(args, loro / "members" / "shipped" / "refiner.pt")
        config.refiner = {"steps": args.refiner_steps, "rescore": 0.0, "labels": MOVES}
        config.notes["refiner"] = "scripts/loro_refine.py (leave-one-region-out)"
    folder = save_detector(head, config, args.parts, refiner)
    print(json.dumps({"detector": str(folder), "threshold": threshold, "views": len(x),
                      "refiner": refiner is not None}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
