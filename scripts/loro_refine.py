"""Leave-one-region-out measure of the box refiner (`rsvlm.refine`, issue 18).

For each held-out building region: a refiner trained on every other labelled set (building
regions and aircraft; never the held-out one), applied to the boxes the fold's detector
(`scripts/loro.py`'s run, which never saw the region either) finds on the region's scoring
tiles. Prints find-all precision / recall / F1 at IoU 0.5 before and after, at the fold's own
out-of-sample threshold, and writes the refiners (resumable: a fold whose refiner exists is
only scored).

    python scripts/loro_refine.py --run runs/loro_mc --out runs/refine \
        --regions banepa_np,catanduanes_ph,kampala_ug,zanzibar_tz
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import loro  # noqa: E402

from rsvlm.refine import BoxRefiner  # noqa: E402
from training.detection import THRESHOLDS, score_detections  # noqa: E402
from training.refine import (  # noqa: E402
    load_checkpoint,
    refined_predictions,
    refiner_sets,
    save_checkpoint,
    train_refiner,
)

log = logging.getLogger("loro_refine")

# Rescored detections score lower than the detector's own (times an IoU below 1).
GRID = (0.03, 0.05, 0.075, *THRESHOLDS)


def fold_refiner(root: Path, out: Path, region: str, args: argparse.Namespace) -> BoxRefiner:
    path = out / f"{region}.pt"
    if path.is_file():
        return load_checkpoint(path)
    sets, quality_sets = refiner_sets(root, held_out=[region])
    t0 = time.perf_counter()
    refiner = train_refiner(sets, epochs=args.epochs, per_set=args.per_set, width=args.width,
                            size=args.size, seed=args.seed, quality_sets=quality_sets)
    save_checkpoint(refiner, path, trained_on=list(sets), train_s=time.perf_counter() - t0)
    return refiner


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--run", type=Path, default=Path("runs/loro_mc"))
    ap.add_argument("--out", type=Path, default=Path("runs/refine"))
    ap.add_argument("--regions", default="banepa_np,catanduanes_ph,kampala_ug,zanzibar_tz")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--per-set", type=int, default=800)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", default="1,2")
    ap.add_argument("--rescore", default="0,0.5,1")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not args.data.is_dir():
        print(f"{args.data} is absent: the labelled sets are needed", file=sys.stderr)
        return 2
    torch.set_num_threads(2)
    variants = [(0, 0.0)] + [(int(st), float(rs)) for st in args.steps.split(",")
                             for rs in args.rescore.split(",")]
    regions = args.regions.split(",")
    curves: dict[tuple, dict[str, dict[float, dict]]] = {v: {} for v in variants}
    fold_thr = {}
    for region in regions:
        fold_thr[region] = json.loads((args.run / "folds" / f"{region}.json").read_text())[
            "threshold"]
        names, images = loro.held_out_tiles(args.data, region)
        test = loro._load(args.run, region, "eval")
        if list(test["names"]) != names:
            raise SystemExit(f"{region}: the cached scoring tiles are not these tiles")
        preds = loro._held_out_predictions(args.run, region)
        refiner = fold_refiner(args.data, args.out, region, args)
        for steps, rescore in variants:
            got = preds if not steps and not rescore else refined_predictions(
                refiner, images, preds, steps, rescore)
            curves[steps, rescore][region] = {
                t: {k: r[k] for k in ("f1", "precision", "recall")} for t in GRID
                for r in [score_detections(got, test["boxes"], test["sizes"], t)]}
            r = curves[steps, rescore][region][fold_thr[region]]
            log.info("%s steps %d rescore %.1f at %.2f: F1 %.3f P %.3f R %.3f", region, steps,
                     rescore, fold_thr[region], r["f1"], r["precision"], r["recall"])
    # Each region at the threshold the other regions favour for that variant (out of
    # sample), as the folds choose theirs.
    rows = []
    for v in variants:
        row = {}
        for region in regions:
            others = [o for o in regions if o != region] or [region]
            t = max(GRID, key=lambda t: sum(curves[v][o][t]["f1"] for o in others))
            row[region] = {**curves[v][region][t], "threshold": t,
                           "best": max(c["f1"] for c in curves[v][region].values()),
                           "at_fold_threshold": curves[v][region][fold_thr[region]]["f1"]}
        rows.append((v, row))
    print("| read | " + " | ".join(regions) + " | mean |")
    print("|---|" + "---|" * (len(regions) + 1))
    for (steps, rescore), row in rows:
        name = "as detected" if not steps and not rescore else (
            f"refined x{steps}" + (f", rescored ^{rescore:g}" if rescore else ""))
        print(f"| {name} | " + " | ".join(
            f"{row[r]['f1']:.3f} @{row[r]['threshold']:g}" for r in regions)
            + f" | {sum(row[r]['f1'] for r in regions) / len(regions):.3f} |")
    print("\nBest threshold of each region (in sample, for diagnosis): " + "; ".join(
        f"{'refined' if v[0] else 'detected'} ^{v[1]:g}: "
        + " ".join(f"{row[r]['best']:.3f}" for r in regions) for v, row in rows))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.json").write_text(json.dumps(
        [{"steps": v[0], "rescore": v[1], **row} for v, row in rows], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
