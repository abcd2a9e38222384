"""Leave-one-region-out: counting by a threshold against counting by a weight per score.

The detector answers "how many" with the number of peaks above one threshold, chosen where
the other folds count best. Its peaks carry scores, and a peak at 0.3 is a roof more often in
one area and less often in another; a count can instead add up a weight per peak, a weight
for each band of scores, fitted on the other folds' held-out areas (non-negative least squares
on the relative count error, so the weights also make up for the roofs no peak finds).

For each OAM area, one head of the shipped recipe trained without it (the base heads of
`loro_tune_tower.py`, trained here when missing) reads the area's tiles and its augmented
views (held out from that head). Each area is then counted with the threshold, and with the
weights, that the other three areas' held-out reads favour; never with its own.

    python scripts/experiments/loro_soft_count.py --run runs/loro_mc [--power 0|0.5|1]

Tried, not adopted (issue 18, round 10; one unrefined head a fold). Counts within 20 %, mean
over the four areas, on their tiles (44) and on tiles and augmented views (1,244): by the
threshold 0.276 and 0.229; by weights fitted on relative errors 0.094 and 0.081, on absolute
errors 0.219 and 0.189, between the two 0.086 and 0.090. The weights the other areas favour
differ area to area as the thresholds do (the 0.35-0.4 band weighs 0 with Kampala held out
and 0.65 with Banepa held out), and a weighted count errs on every tile, where a threshold is
right on some; a relative fit also leans short, as under-counting costs at most 100 %.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import nnls

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import loro  # noqa: E402

from training.detection import THRESHOLDS, predict, train_detector  # noqa: E402
from training.metrics import count_scores  # noqa: E402

log = logging.getLogger("soft_count")

OAM = ["kampala_ug", "zanzibar_tz", "banepa_np", "catanduanes_ph"]
EDGES = np.array([0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.8, 1.01])


def base_head(run: Path, held: str, names: list[str], folder: Path, train_files: int) -> object:
    path = folder / held / "base.pt"
    if path.is_file():
        return torch.load(path, weights_only=False)
    others = [n for n in names if n != held]
    x, boxes, _, _ = loro.training_stack(run, others, train_files, ["building"])
    head = train_detector(x, boxes, hidden=x.shape[-1], levels=x.shape[1], epochs=8, dim=64,
                          reduce=128, convs=3, input_dropout=0.3, seed=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(head, path)
    return head


def held_out_reads(run: Path, held: str, head: object, train_files: int
                   ) -> list[tuple[np.ndarray, int]]:
    """(peak scores >= 0.1, true count) for each tile and augmented view of ``held``."""
    reads = []
    for part in ["eval", *loro._train_parts(run, held, train_files)]:
        d = loro._load(run, held, part)
        for pred, truth in zip(predict(head, d["features"], 0.1), d["boxes"], strict=True):
            reads.append((np.array([p[4] for p in pred]), len(truth)))
    return reads


def bands(scores: np.ndarray) -> np.ndarray:
    return np.histogram(scores, bins=EDGES)[0].astype(np.float64)


def fit_weights(reads: list[tuple[np.ndarray, int]], power: float = 1.0) -> np.ndarray:
    """``power`` 1: relative errors (a count of 3 off by 2 weighs as 30 off by 20); 0: absolute
    errors; 0.5 between."""
    x = np.stack([bands(s) for s, _ in reads])
    t = np.array([n for _, n in reads], np.float64)
    w = 1.0 / np.maximum(t, 1.0) ** power
    weights, _ = nnls(x * w[:, None], t * w)
    return weights


def best_threshold(reads_by_area: list[list[tuple[np.ndarray, int]]]) -> float:
    """The threshold with the most counts within 20 %, as a mean over the areas (each once)."""
    def key(th: float) -> tuple[float, float]:
        within, logs = [], []
        for reads in reads_by_area:
            pairs = [(int((s >= th).sum()), n) for s, n in reads]
            within.append(count_scores(pairs)["within_20pct"])
            logs.append(np.mean([abs(math.log((p + 1) / (n + 1))) for p, n in pairs]))
        return float(np.mean(within)), -float(np.mean(logs))
    return max(THRESHOLDS[1:], key=key)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/loro_mc")
    ap.add_argument("--regions", default="kampala_ug,zanzibar_tz,banepa_np,catanduanes_ph,"
                                         "rio,atlanta")
    ap.add_argument("--heads", default="runs/exp/tune_tower", help="base heads' folder")
    ap.add_argument("--train-files", type=int, default=3)
    ap.add_argument("--power", type=float, default=1.0,
                    help="error weighting of the fit: 1 relative, 0 absolute")
    ap.add_argument("--out", default="runs/exp/soft_count.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    run, names = Path(args.run), args.regions.split(",")
    reads = {}
    for held in OAM:
        head = base_head(run, held, names, Path(args.heads), args.train_files)
        reads[held] = held_out_reads(run, held, head, args.train_files)
        log.info("%s: %d reads", held, len(reads[held]))
    result = {}
    for held in OAM:
        others = [reads[g] for g in OAM if g != held]
        th = best_threshold(others)
        weights = fit_weights([r for o in others for r in o], args.power)
        tiles = reads[held][:len(loro._load(run, held, "eval")["boxes"])]
        row = {}
        for label, sample in (("tiles", tiles), ("tiles and views", reads[held])):
            by_threshold = count_scores([(int((s >= th).sum()), n) for s, n in sample])
            by_weights = count_scores([(int(round(bands(s) @ weights)), n) for s, n in sample])
            row[label] = {"n": len(sample),
                          "threshold": {"at": th, **{k: by_threshold[k]
                                                     for k in ("within_20pct", "exact", "mape")}},
                          "weights": {k: by_weights[k] for k in ("within_20pct", "exact", "mape")}}
        row["weights"] = [round(float(w), 3) for w in weights]
        result[held] = row
        log.info("%s: %s", held, json.dumps(row))
    for label in ("tiles", "tiles and views"):
        for how in ("threshold", "weights"):
            vals = [result[h][label][how]["within_20pct"] for h in OAM]
            result.setdefault("mean", {})[f"{label} / {how}"] = round(float(np.mean(vals)), 3)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result["mean"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
