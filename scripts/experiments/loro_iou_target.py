"""Tried, not adopted as shipped (issue 18, round 8): the IoU-aware heatmap target, one head.

For each held-out OAM area: one head trained as the fold's first member was (`--run`'s fold
settings, seed 0), with `detection_loss(iou_target=True)`, against that first member itself
(CenterNet's target); boxes refined by the fold's refiner, each area at the threshold the other
three favour. Four heads are `scripts/loro.py --iou-target` (docs/benchmarks.md, round 8).

    python scripts/experiments/loro_iou_target.py --run runs/loro_mc --refiners runs/refine_q
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import loro  # noqa: E402

from rsvlm.detector import DenseDetector  # noqa: E402
from training.detection import THRESHOLDS, predict, score_detections, train_heads  # noqa: E402
from training.refine import refined_predictions  # noqa: E402

AERIAL = ["banepa_np", "catanduanes_ph", "kampala_ug", "zanzibar_tz"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/loro_mc")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--refiners", default="runs/refine_q")
    ap.add_argument("--out", default="runs/iou_target", help="the new heads are kept here")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    run, out = Path(args.run), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loro.DATA, loro.REFINERS = Path(args.data), [Path(args.refiners)]
    names = [p.stem for p in sorted((run / "cache").glob("*.pt")) if "." not in p.stem]
    curves: dict[str, dict[str, dict]] = {"CenterNet target": {}, "IoU target": {}}
    for held in AERIAL:
        fold = json.loads((run / "folds" / f"{held}.json").read_text())
        path = out / f"{held}.safetensors"
        if not path.is_file():
            others = [n for n in names if n not in fold["fold"].split("+")]
            x, boxes, view_classes, known = loro.training_stack(run, others, fold["train_files"],
                                                                fold["classes"])
            head = train_heads(x, boxes, heads=1, seed=0, hidden=x.shape[-1], levels=x.shape[1],
                               epochs=fold["epochs"], dim=fold["dim"], reduce=fold["reduce"],
                               convs=fold["convs"], input_dropout=fold["input_dropout"],
                               iou_target=True, **loro.class_training(
                                   fold["classes"], view_classes, known,
                                   bool(fold.get("object_negatives"))))
            save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(path))
            del x
        test = loro._load(run, held, "eval")
        for name, weights in (("CenterNet target", run / "members" / fold["fold"] / "seed0.safetensors"),
                              ("IoU target", path)):
            head = DenseDetector(test["features"].shape[-1], test["features"].shape[1],
                                 classes=len(fold["classes"]), dim=fold["dim"], convs=fold["convs"])
            head.load_state_dict(load_file(str(weights)))
            preds = refined_predictions(loro.fold_refiner(held), loro.held_out_images(run, held),
                                        predict(head.eval(), test["features"], 0.1))
            curves[name][held] = {t: score_detections(preds, test["boxes"], test["sizes"], t)
                                  for t in THRESHOLDS}
    print("| one head | " + " | ".join(AERIAL) + " | mean |\n|---|" + "---|" * (len(AERIAL) + 1))
    for name, by_area in curves.items():
        f1 = []
        for held in AERIAL:
            t = max(THRESHOLDS[1:], key=lambda t, h=held: np.mean(
                [by_area[o][t]["f1"] for o in AERIAL if o != h]))
            f1.append(by_area[held][t]["f1"])
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in f1) + f" | {np.mean(f1):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
