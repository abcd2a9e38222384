"""Tried, not adopted (issue 18, round 9): self-training on the new region, without its labels.

An analyst's region is new but its imagery is at hand. For each held-out OAM area, the fold's
four heads label the area's own training views themselves: a peak of their average scoring at
least ``--sure`` becomes a footprint to learn, the 3 x 3 patches around a peak in ``[--unsure,
--sure)`` train nothing, and every other patch learns background. Each head is then continued
(``--epochs``, one-cycle AdamW at ``--lr``) on those views mixed with ``--source`` labelled
views of the regions the fold trained on, and the area's tiles are scored as `scripts/loro.py`
scores them (the fold's refiner, the thresholds the other folds favour).

    python scripts/experiments/loro_self_training.py --run runs/loro_mc --refiners runs/refine_q

Measured (find-all F1 on the held-out tiles, before -> after; 2 epochs at 5e-4, 600 source
views): Kampala 0.539 -> 0.538, Zanzibar 0.605 -> 0.631, Banepa 0.424 -> 0.296, Catanduanes
0.636 -> 0.592; mean 0.551 -> 0.514. The heads learn the new area's own mistakes as well as its
roofs: Banepa's sheds inside compounds become sure, and its precision falls 0.396 -> 0.225.
Surer pseudo-labels (0.5 / 0.15) raise precision and lose recall instead (Kampala 0.531).
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import loro  # noqa: E402

from rsvlm.detector import (  # noqa: E402
    DenseDetector,
    DetectorEnsemble,
    detection_loss,
    detection_targets,
)
from training.detection import predict, score_detections  # noqa: E402
from training.labelled import DEMO_AREAS, known_classes, set_class  # noqa: E402


def pseudo_labels(head: DetectorEnsemble, features: torch.Tensor, cls: int, classes: int,
                  sure: float, unsure: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The head's sure boxes per view, and the patches each view trains (views, classes, grid,
    grid): class ``cls`` everywhere but around unsure peaks, no other class."""
    grid = int(round(features.shape[2] ** 0.5))
    boxes, masks = [], []
    for dets in predict(head, features, unsure, cls=cls):
        boxes.append(torch.tensor([d[:4] for d in dets if d[4] >= sure],
                                  dtype=torch.float32).reshape(-1, 4))
        m = torch.zeros(classes, grid, grid, dtype=torch.bool)
        m[cls] = True
        for d in dets:
            if d[4] < sure:
                c = min(int((d[0] + d[2]) / 2 * grid), grid - 1)
                r = min(int((d[1] + d[3]) / 2 * grid), grid - 1)
                m[cls, max(r - 1, 0):r + 2, max(c - 1, 0):c + 2] = False
        masks.append(m)
    return boxes, torch.stack(masks)


def source_views(run: Path, names: list[str], labels: list[str], n: int, grid: int
                 ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """``n`` labelled training views spread over the building regions ``names``."""
    rng = random.Random(0)
    x, boxes, masks = [], [], []
    for name in names:
        d = loro._load(run, name, "train")
        idx = sorted(rng.sample(range(len(d["boxes"])), min(n // len(names), len(d["boxes"]))))
        x.append(d["features"][idx])
        boxes += [d["boxes"][i] for i in idx]
        row = torch.tensor([c in known_classes(name) for c in labels])
        masks += [row[:, None, None].expand(len(labels), grid, grid) for _ in idx]
    return torch.cat(x), boxes, torch.stack(masks)


def continue_head(member: DenseDetector, x: torch.Tensor, boxes: list[torch.Tensor],
                  masks: torch.Tensor, cls: int, epochs: int, lr: float, seed: int
                  ) -> DenseDetector:
    head = copy.deepcopy(member).train()
    classes, grid, levels = masks.shape[1], masks.shape[-1], x.shape[1]
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * math.ceil(len(x) / 16)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen).tolist()
        for i in range(0, len(x), 16):
            idx = order[i:i + 16]
            xb = x[idx].float()
            heat, box = head([xb[:, j] for j in range(levels)])
            th, tt, tm = detection_targets(
                [boxes[j] for j in idx],
                [torch.full((len(boxes[j]),), cls, dtype=torch.long) for j in idx],
                grid, classes)
            loss = detection_loss(heat, box, th, tt, tm, masks[idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            opt.step()
            sched.step()
    return head.eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/loro_mc")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--refiners", default="runs/refine_q")
    ap.add_argument("--regions", default=",".join(DEMO_AREAS))
    ap.add_argument("--sure", type=float, default=0.25)
    ap.add_argument("--unsure", type=float, default=0.05)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--source", type=int, default=600, help="labelled views mixed in")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    run = Path(args.run)
    loro.DATA, loro.REFINERS = Path(args.data), [Path(args.refiners)]
    print("| held-out area | F1 before | F1 after | P before / after | R before / after |\n"
          "|---|---|---|---|---|")
    for held in args.regions.split(","):
        report = loro.json.loads((run / "folds" / f"{held}.json").read_text())
        head, config = loro._fold_head(run, held)
        labels = list(config.labels)
        cls = labels.index("building")
        own = torch.cat([loro._load(run, held, p)["features"] for p in ("train", "train1")])
        boxes, masks = pseudo_labels(head, own, cls, len(labels), args.sure, args.unsure)
        sources = [n for n in report["trained_on"] if set_class(n) == "building"]
        sx, sb, sm = source_views(run, sources, labels, args.source, masks.shape[-1])
        x, boxes, masks = torch.cat([own, sx]), boxes + sb, torch.cat([masks, sm])
        adapted = DetectorEnsemble([continue_head(m, x, boxes, masks, cls, args.epochs,
                                                  args.lr, seed)
                                    for seed, m in enumerate(head.members)]).eval()
        test = loro._load(run, held, "eval")
        before, after = (score_detections(loro._held_out_predictions(run, held, h),
                                          test["boxes"], test["sizes"], report["threshold"])
                         for h in (head, adapted))
        print(f"| {held} | {before['f1']:.3f} | {after['f1']:.3f} | "
              f"{before['precision']:.3f} / {after['precision']:.3f} | "
              f"{before['recall']:.3f} / {after['recall']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
