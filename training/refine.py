"""Training the box refiner (`rsvlm.refine`) on labelled images.

Proposals are the labelled boxes jittered as a detector misplaces them on a region it never
saw (centre off by ~15 % of the side, sides ~30 % off in log scale); each epoch draws new
ones. Crops turn and mirror with their targets, so the refiner learns edges, not a region's
sun angle."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from rsvlm.refine import BoxRefiner, box_deltas, crop_boxes, image_tensor, pyramid
from training.labelled import CLASS_SETS, SETS, LabelledImage, load_sets, set_class

log = logging.getLogger(__name__)

# The classes the refiner trains on, and those it moves in the chat path: it was measured on
# buildings only (scripts/loro_refine.py), so aircraft keep the grid's boxes.
TRAINED_ON = ("building", "aircraft")
MOVES = ["building"]


def refiner_sets(root: str | Path, held_out: Sequence[str] = ()
                 ) -> tuple[dict[str, list[LabelledImage]], list[str]]:
    """The labelled sets under ``root`` a refiner trains on (every building and aircraft set
    but ``held_out``) and those whose every object is labelled, so that their background
    teaches the expected IoU (`sample_crops`'s ``quality_sets``): the building sets."""
    names = [n for n in (*SETS, *CLASS_SETS) if n not in held_out and set_class(n) in TRAINED_ON]
    sets = load_sets(root, names)
    return sets, [n for n in sets if set_class(n) == "building"]


def save_checkpoint(refiner: BoxRefiner, path: Path, **extra: Any) -> None:
    """A trained refiner for a later run (`load_checkpoint`), with notes (``extra``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": {"size": refiner.size, "width": refiner.width,
                           "context": refiner.context},
                "state": refiner.state_dict(), **extra}, path)


def load_checkpoint(path: Path) -> BoxRefiner:
    saved = torch.load(path, weights_only=False)
    refiner = BoxRefiner(**saved["config"])
    refiner.load_state_dict(saved["state"])
    return refiner.eval()


def jitter(truth: torch.Tensor, k: int, gen: torch.Generator, shift: float = 0.15,
           scale: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """`k` proposals per box (n, 4 pixels) -> (proposals (n*k, 4), their truths (n*k, 4))."""
    t = truth.repeat_interleave(k, 0)
    w, h = t[:, 2] - t[:, 0], t[:, 3] - t[:, 1]
    cx = (t[:, 0] + t[:, 2]) / 2 + torch.randn(len(t), generator=gen) * shift * w
    cy = (t[:, 1] + t[:, 3]) / 2 + torch.randn(len(t), generator=gen) * shift * h
    sw = (torch.randn(len(t), generator=gen) * scale).clamp(-1, 1).exp()
    sh = (torch.randn(len(t), generator=gen) * scale).clamp(-1, 1).exp()
    pw, ph = w * sw, h * sh
    return torch.stack([cx - pw / 2, cy - ph / 2, cx + pw / 2, cy + ph / 2], 1), t


def overlaps(proposals: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """IoU of every proposal (n, 4) with every labelled box (m, 4) -> (n, m)."""
    x1 = torch.maximum(proposals[:, None, 0], truth[None, :, 0])
    y1 = torch.maximum(proposals[:, None, 1], truth[None, :, 1])
    x2 = torch.minimum(proposals[:, None, 2], truth[None, :, 2])
    y2 = torch.minimum(proposals[:, None, 3], truth[None, :, 3])
    inter = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
    return inter / (area(proposals)[:, None] + area(truth)[None] - inter).clamp(min=1e-6)


def nearest_truth(proposals: torch.Tensor, truth: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each proposal, the labelled box it overlaps most (a jittered box can come to lie
    more on a neighbouring roof than on its own) and that IoU."""
    iou = overlaps(proposals, truth)
    best, idx = iou.max(1)
    return truth[idx], best


def background(truth: torch.Tensor, n: int, width: int, height: int, gen: torch.Generator
               ) -> torch.Tensor:
    """`n` boxes of the image's own object sizes at random places."""
    pick = torch.randint(len(truth), (n,), generator=gen)
    w = (truth[pick, 2] - truth[pick, 0]).clamp(max=width - 1)
    h = (truth[pick, 3] - truth[pick, 1]).clamp(max=height - 1)
    x = torch.rand(n, generator=gen) * (width - w)
    y = torch.rand(n, generator=gen) * (height - h)
    return torch.stack([x, y, x + w, y + h], 1)


def sample_crops(sets: dict[str, list[LabelledImage]], refiner: BoxRefiner, per_set: int,
                 gen: torch.Generator, quality_sets: Sequence[str] = (),
                 background_share: float = 0.5
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """About `per_set` jittered proposals per set (each set weighing the same, whatever its
    size), and for the sets in `quality_sets` (those whose every object is labelled, so that
    a box elsewhere is truly background) `background_share` as many boxes at random places ->
    (crops (n, 3, size, size), scaled target deltas (n, 4), target IoU (n,), and which of
    the two targets each crop trains (n, 2) booleans)."""
    crops, deltas, quality, trains = [], [], [], []
    for name, items in sets.items():
        n_boxes = sum(len(it.boxes) for it in items)
        if not n_boxes:
            continue
        k = max(1, round(per_set / n_boxes))
        keep = min(1.0, per_set / (n_boxes * k))
        scored = name in quality_sets
        for it in items:
            if not len(it.boxes):
                continue
            truth = torch.from_numpy(np.asarray(it.boxes, np.float32))
            own = truth
            if keep < 1.0:
                own = truth[torch.rand(len(truth), generator=gen) < keep]
            props, _ = jitter(own, k, gen)
            if scored:
                h, w = it.image.shape[:2]
                props = torch.cat([props, background(truth, int(len(props) * background_share),
                                                     w, h, gen)])
            if not len(props):
                continue
            target, iou = nearest_truth(props, truth)
            levels = pyramid(image_tensor(it.image))
            crops.append(crop_boxes(levels, props, refiner.size, refiner.context))
            deltas.append(box_deltas(props, target))
            quality.append(iou)
            trains.append(torch.stack([iou >= 0.2, torch.full_like(iou, scored, dtype=torch.bool)],
                                      1))
    return torch.cat(crops), torch.cat(deltas), torch.cat(quality), torch.cat(trains)


def turn(crops: torch.Tensor, deltas: torch.Tensor, rng: random.Random
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch mirrored and/or transposed, its deltas along."""
    d = deltas.clone()
    if rng.random() < 0.5:
        crops, d[:, 0] = crops.flip(-1), -d[:, 0]
    if rng.random() < 0.5:
        crops, d[:, 1] = crops.flip(-2), -d[:, 1]
    if rng.random() < 0.5:
        crops, d = crops.transpose(-1, -2), d[:, [1, 0, 3, 2]]
    return crops, d


def train_refiner(sets: dict[str, list[LabelledImage]], *, epochs: int = 12,
                  per_set: int = 800, lr: float = 2e-3, batch: int = 64, seed: int = 0,
                  width: int = 16, size: int = 64, resample_every: int = 3,
                  quality_sets: Sequence[str] = (), threads: int | None = None) -> BoxRefiner:
    """A `BoxRefiner` trained on jittered labelled boxes of `sets` (name -> images); its
    IoU output on those of `quality_sets` and on background boxes there (`sample_crops`)."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    refiner = BoxRefiner(size=size, width=width)
    opt = torch.optim.AdamW(refiner.parameters(), lr=lr, weight_decay=1e-4)
    t0 = time.perf_counter()
    crops, deltas, quality, trains = sample_crops(sets, refiner, per_set, gen, quality_sets)
    # Each draw holds about as many crops (per_set a set): the first sets the schedule.
    steps_per_epoch = -(-len(crops) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps_per_epoch)
    for epoch in range(epochs):
        if epoch and epoch % resample_every == 0:
            crops, deltas, quality, trains = sample_crops(sets, refiner, per_set, gen,
                                                          quality_sets)
        order = torch.randperm(len(crops), generator=gen)
        refiner.train()
        total = 0.0
        for i in range(steps_per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            if not len(idx):
                break
            x, y = turn(crops[idx], deltas[idx], rng)
            x = x + torch.randn_like(x) * rng.uniform(0, 0.2)
            out, m = refiner(x), trains[idx].float()
            box = (F.smooth_l1_loss(out[:, :4], y, beta=0.5, reduction="none").mean(1)
                   * m[:, 0]).sum() / m[:, 0].sum().clamp(min=1)
            iou = (F.binary_cross_entropy_with_logits(out[:, 4], quality[idx], reduction="none")
                   * m[:, 1]).sum() / m[:, 1].sum().clamp(min=1)
            loss = box + iou
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        log.info("refiner epoch %d: loss %.4f on %d crops (%.0f s)", epoch + 1,
                 total / len(crops), len(crops), time.perf_counter() - t0)
    return refiner.eval()


def refined_predictions(refiner: BoxRefiner, images: Sequence[np.ndarray],
                        preds: list[list[tuple[float, ...]]], steps: int = 1,
                        rescore: float = 0.0) -> list[list[tuple[float, ...]]]:
    """Detections (x1, y1, x2, y2 in 0-1, score) per image through `refine_detections`."""
    from rsvlm.detector import Detection
    from rsvlm.refine import refine_detections

    return [[(*d.box, d.score) for d in refine_detections(
        refiner, image, [Detection("object", p[4], tuple(p[:4])) for p in dets], steps, rescore)]
        for image, dets in zip(images, preds, strict=True)]
