"""Training and scoring the dense detector (`rsvlm.detector`) on cached frozen features.

Views of the labelled sets (`training.labelled`) are augmented for the shift between regions
(scale, rotation, mirror, colour, contrast, blur, resolution, JPEG), run through the frozen
vision tower once at the detector's input size, and cached; the head then trains on the cache
in minutes on a CPU.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsvlm.detector import (
    DenseDetector,
    DetectorEnsemble,
    decode,
    detection_loss,
    detection_targets,
)
from rsvlm.perception import scaled_count
from training.labelled import LabelledImage, clip_boxes, cut_boxes
from training.metrics import count_scores, detection_scores, match_boxes, match_pairs

log = logging.getLogger(__name__)

INPUT_SIZE = 448  # 32 x 32 patches of 14 px on DINOv2


@dataclass
class View:
    name: str
    image: np.ndarray  # (H, W, 3) uint8
    boxes: np.ndarray  # (n, 4) pixels of this view
    # objects the view's edge cuts too far to count (`training.labelled.cut_boxes`)
    ignore: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))


# ------------------------------------------------------------------------ augmentation


def _rot90_boxes(boxes: np.ndarray, w: int, h: int, k: int) -> np.ndarray:
    """Boxes of a (h, w) image after `np.rot90(image, k)` (counter-clockwise)."""
    b = boxes.copy()
    for _ in range(k % 4):
        x1, y1, x2, y2 = b[:, 0].copy(), b[:, 1].copy(), b[:, 2].copy(), b[:, 3].copy()
        b = np.stack([y1, w - x2, y2, w - x1], axis=1)
        w, h = h, w
    return b


def _mirror_boxes(boxes: np.ndarray, side: int) -> np.ndarray:
    return boxes[:, [2, 1, 0, 3]] * np.array([-1, 1, -1, 1], np.float32) + np.array(
        [side, 0, side, 0], np.float32)


def augment_view(item: LabelledImage, rng: random.Random, base: int, name: str, *,
                 gray: float = 0.0, hue: float = 0.0, coarse: float = 0.0,
                 min_visible: float = 0.5) -> View:
    """A random crop (0.7-1.4 x `base` px), quarter turn and mirror, colour, contrast, blur,
    resolution and JPEG changes; boxes move along. With ``gray`` a view is made panchromatic
    with that probability (a PAN sensor), with ``hue`` half the views' hues turn by up to that
    share of the circle (another region's roofs and soil). With ``coarse``, that share of the
    views is cut 2-3.5 x `base` px, so that read at the input size fine imagery looks as a
    coarser sensor's does (roofs of 0.15 m imagery at 0.34-0.6 m a pixel). An object the crop
    cuts keeps its box when at least ``min_visible`` of it is inside; one cut further is the
    view's ``ignore``. The random draws do not depend on ``min_visible``: the same seed cuts
    the same view under either rule."""
    from PIL import Image, ImageEnhance, ImageFilter

    w, h = item.size
    scale = rng.uniform(2.0, 3.5) if coarse and rng.random() < coarse else rng.uniform(0.7, 1.4)
    side = int(min(base * scale, w, h))
    x, y = rng.randint(0, w - side), rng.randint(0, h - side)
    crop = item.image[y:y + side, x:x + side]
    boxes, cut = cut_boxes(item.boxes, x, y, side, side, min_visible)
    k = rng.randrange(4)
    crop = np.rot90(crop, k)
    boxes = _rot90_boxes(boxes, side, side, k) if len(boxes) else boxes
    cut = _rot90_boxes(cut, side, side, k) if len(cut) else cut
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
        boxes, cut = _mirror_boxes(boxes, side), _mirror_boxes(cut, side)
    im = Image.fromarray(np.ascontiguousarray(crop))
    im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.7, 1.3))
    im = ImageEnhance.Contrast(im).enhance(rng.uniform(0.7, 1.3))
    im = ImageEnhance.Color(im).enhance(rng.uniform(0.5, 1.4))
    if hue and rng.random() < 0.5:
        im = _turn_hue(im, rng.uniform(-hue, hue))
    if gray and rng.random() < gray:
        im = im.convert("L").convert("RGB")
    if rng.random() < 0.3:
        im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5)))
    if rng.random() < 0.3:  # a coarser sensor
        f = rng.uniform(0.4, 0.9)
        small = im.resize((max(8, int(side * f)),) * 2, Image.BILINEAR)
        im = small.resize((side, side), Image.BILINEAR)
    if rng.random() < 0.5:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=rng.randint(30, 90))
        im = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    arr = np.asarray(im)
    return View(name, arr, clip_boxes(boxes.astype(np.float32), side, side),
                clip_boxes(cut.astype(np.float32), side, side, min_side=1.0))


def _turn_hue(im: Any, turn: float) -> Any:
    from PIL import Image

    h, s, v = im.convert("HSV").split()
    h = h.point(lambda x: int(x + turn * 256) % 256)
    return Image.merge("HSV", (h, s, v)).convert("RGB")


# ------------------------------------------------------------------------ features


class FrozenTower:
    """The preset's vision encoder run at the detector's input size (levels of the config)."""

    def __init__(self, preset: str = "embedded", size: int = INPUT_SIZE,
                 layers: Sequence[int] | None = None) -> None:
        from transformers import AutoImageProcessor

        from rsvlm.presets import load_preset

        p = load_preset(preset)
        plan = p.plan("cpu", quantize=False)
        self.model = plan.components["vision"].load().eval()
        proc = AutoImageProcessor.from_pretrained(plan.components["vision"].location)
        self.mean = torch.tensor(proc.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(proc.image_std).view(1, 3, 1, 1)
        self.size = size
        self.layers = list(layers or p.architecture.get("vision_feature_layers", [7, 9, 11]))
        self.hidden = int(self.model.config.hidden_size)

    def pixels(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        from PIL import Image

        arr = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(im)).resize(
            (self.size, self.size), Image.BICUBIC)) for im in images])
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def __call__(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(batch, levels, patches, hidden) float16."""
        out = self.model(pixel_values=self.pixels(images), output_hidden_states=True)
        n = (self.size // self.model.config.patch_size) ** 2
        levels = [out.hidden_states[i][:, -n:] for i in self.layers]
        return torch.stack(levels, dim=1).half()


def cache_views(tower: FrozenTower, views: list[View], path: Path | None, batch: int = 4
                ) -> dict:
    """Features and normalised boxes of `views`, saved to `path` (one file per call)."""
    feats = []
    for i in range(0, len(views), batch):
        feats.append(tower([v.image for v in views[i:i + batch]]))
    data = {
        "names": [v.name for v in views],
        "features": torch.cat(feats) if feats else torch.zeros(0),
        "boxes": [torch.from_numpy(v.boxes / np.array([v.image.shape[1], v.image.shape[0]] * 2,
                                                       np.float32)) for v in views],
        "sizes": [(int(v.image.shape[1]), int(v.image.shape[0])) for v in views],
    }
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(data, tmp)
        tmp.replace(path)
    return data


# ------------------------------------------------------------------------ training


def principal_components(features: torch.Tensor, k: int, samples: int = 20000,
                         seed: int = 0, balance: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (d,) and the top-k principal directions (d, k) of the concatenated levels of a
    sample of patches: the input layer then trains on k numbers per patch instead of d.

    ``balance``: each level scaled to the same spread first. The tower's later levels spread
    several times as wide as its earlier ones (levels 7, 9, 11 and 12 of this DINOv2: patch
    norms about 2, 3, 9 and 56), so the top directions of the raw concatenation are nearly all
    the widest level's. The directions returned are then in the unscaled levels' units (each
    level's rows divided by its spread), so that `reduce_features` and `compose_projection`
    take them as they are."""
    b, levels, n, h = features.shape
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, b, (samples,), generator=gen)
    cols = torch.randint(0, n, (samples,), generator=gen)
    x = features[rows, :, cols].float().reshape(samples, levels * h)
    mean = x.mean(0)
    scale = torch.ones(levels * h)
    if balance:
        spread = (x - mean).reshape(samples, levels, h).pow(2).mean((0, 2)).sqrt()
        scale = (1 / spread.clamp(min=1e-6)).repeat_interleave(h)
    _, _, v = torch.pca_lowrank((x - mean) * scale, q=k, center=False, niter=3)
    return mean, scale[:, None] * v[:, :k]


def reduce_features(features: torch.Tensor, mean: torch.Tensor, comps: torch.Tensor,
                    chunk: int = 32) -> torch.Tensor:
    """(b, levels, n, h) -> (b, 1, n, k) projections on the principal directions."""
    out = []
    for i in range(0, len(features), chunk):
        x = features[i:i + chunk].float()
        x = x.permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1)
        out.append(((x - mean) @ comps).unsqueeze(1).half())
    return torch.cat(out)


def compose_projection(head: DenseDetector, mean: torch.Tensor, comps: torch.Tensor,
                       hidden: int, levels: int) -> DenseDetector:
    """A head on the full levels computing exactly what `head` computes on the projections:
    its input layer W x' + b with x' = (x - mean) V becomes (W V^T) x + (b - W V^T mean)."""
    full = DenseDetector(hidden, levels, classes=head.heat.out_channels,
                         dim=head.heat.in_channels, convs=len(head.body) // 3,
                         upsample=head.upsample, dilation=head.dilation)
    state = head.state_dict()
    w, b = state["proj.0.weight"], state["proj.0.bias"]
    state["proj.0.weight"] = w @ comps.T
    state["proj.0.bias"] = b - w @ comps.T @ mean
    full.load_state_dict(state)
    return full.eval()


def train_detector(features: torch.Tensor, boxes: list[torch.Tensor], *, hidden: int,
                   levels: int, epochs: int = 15, batch_size: int = 16, lr: float = 2e-3,
                   seed: int = 0, dim: int = 96, log_every: int = 50,
                   reduce: int | None = None, convs: int = 2,
                   init: DenseDetector | None = None,
                   input_dropout: float = 0.0, classes: int = 1,
                   view_classes: Sequence[int] | None = None,
                   known: torch.Tensor | None = None,
                   object_negatives: bool = False,
                   iou_target: bool = False, ignore_below: float = 0.0,
                   ignore: Sequence[torch.Tensor] | None = None,
                   upsample: int = 1, centre_radius: int = 0,
                   dilation: int = 1, weight_decay: float = 0.05,
                   balance_levels: bool = False) -> DenseDetector:
    """The head on cached features, AdamW with a one-cycle schedule.

    ``reduce``: train on the top principal components of the levels (2 CPU cores: the input
    layer is most of the cost); the returned head takes the full levels all the same.
    ``init``: continue this head (on the full levels) instead of a new one. With ``classes``
    > 1, every view's boxes are of its class in ``view_classes`` and ``known`` (views,
    classes) says which heatmaps it trains (`rsvlm.detector.detection_loss`); one class: every
    box is of it, every heatmap trained. ``object_negatives``: inside a view's labelled objects
    every other class's heatmap learns background too (an airliner is not a roof), wherever
    the rest of the view leaves that class unlabelled. ``iou_target``: an object's centre
    learns to score its own box's IoU with the object (`rsvlm.detector.detection_loss`).
    ``ignore_below``: a labelled building (class 0) whose box covers less than this share of
    the view (0.004: four patches of the 32 x 32 grid) trains nothing where it lies, neither
    an object nor background (`small_objects_mask`): too small to see at the view's
    resolution, and mapped in some regions and not in others. ``ignore``: per view, boxes (0-1)
    of objects its edge cuts too far to count (`View.ignore`), left out of their class's
    heatmap in the same way: a part of a roof is neither an object to find nor background.
    ``upsample``: maps that many times finer than the patch grid (`DenseDetector`).
    ``centre_radius``: cells that near an object's centre learn it as a centre too
    (`rsvlm.detector.detection_targets`). ``dilation``: the convolutions' growing dilation
    (`DenseDetector`). ``weight_decay``: AdamW's decoupled decay. ``balance_levels``: the
    principal components of levels scaled to one spread (`principal_components`)."""
    torch.manual_seed(seed)
    pca = None
    if init is not None:
        reduce = None
    if reduce:
        pca = principal_components(features, reduce, seed=seed, balance=balance_levels)
        features = reduce_features(features, *pca)
        full_hidden, full_levels = hidden, levels
        hidden, levels = reduce, 1
    head = (copy.deepcopy(init) if init is not None
            else DenseDetector(hidden, levels, classes=classes, dim=dim, convs=convs,
                               upsample=upsample, dilation=dilation))
    view_classes = list(view_classes) if view_classes is not None else [0] * len(features)
    n = len(features)
    grid = int(round(features.shape[2] ** 0.5)) * head.upsample
    steps = epochs * math.ceil(n / batch_size)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    step, t0 = 0, time.perf_counter()
    head.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).tolist()
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            x = features[idx].float()
            if input_dropout:  # leaning on fewer feature channels, for regions unlike these
                x = torch.nn.functional.dropout(x, input_dropout)
            heat, box = head([x[:, j] for j in range(levels)])
            tb = [boxes[j] for j in idx]
            small = None
            if ignore_below:  # buildings (class 0) only: aircraft and crowns are small
                tiny = [(box_areas(b) < ignore_below) & (view_classes[j] == 0)
                        for b, j in zip(tb, idx, strict=True)]
                small = [b[t] for b, t in zip(tb, tiny, strict=True)]
                tb = [b[~t] for b, t in zip(tb, tiny, strict=True)]
            if ignore is not None:
                cut = [torch.as_tensor(ignore[j]).reshape(-1, 4) for j in idx]
                small = cut if small is None else [torch.cat([torch.as_tensor(a).reshape(-1, 4), c])
                                                   for a, c in zip(small, cut, strict=True)]
            th, tt, tm = detection_targets(tb, [torch.full((len(b),), view_classes[j],
                                                           dtype=torch.long)
                                                for b, j in zip(tb, idx, strict=True)],
                                           grid, classes, centre_radius)
            mask = known[idx] if known is not None else None
            if mask is not None and object_negatives:
                mask = mask[:, :, None, None] | (tm > 0)[:, None]
            if small is not None:
                mask = small_objects_mask(mask, small, [view_classes[j] for j in idx], classes,
                                          grid)
            loss = detection_loss(heat, box, th, tt, tm, mask, iou_target=iou_target)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if step % log_every == 0:
                log.info("detector step %d/%d loss %.3f (%.0f s)", step, steps, loss.item(),
                         time.perf_counter() - t0)
    if pca is not None:
        return compose_projection(head.eval(), *pca, full_hidden, full_levels)
    return head.eval()


def box_areas(boxes: torch.Tensor) -> torch.Tensor:
    """Areas of (n, 4) boxes in 0-1 of the image, as shares of it."""
    b = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)


def small_objects_mask(mask: torch.Tensor | None, small: list[torch.Tensor],
                       view_classes: list[int], classes: int, grid: int) -> torch.Tensor:
    """``mask`` (None: every heatmap trained; (batch, classes) or per patch) per patch, with
    the patches each small object covers, and the ring of patches around them, left out of its
    class's heatmap."""
    b = len(small)
    if mask is None:
        out = torch.ones(b, classes, grid, grid, dtype=torch.bool)
    elif mask.dim() == 2:
        out = mask[:, :, None, None].expand(b, classes, grid, grid).clone()
    else:
        out = mask.clone()
    for i, (boxes, cls) in enumerate(zip(small, view_classes, strict=True)):
        for x1, y1, x2, y2 in (torch.as_tensor(boxes).reshape(-1, 4) * grid).tolist():
            c1, r1 = max(int(x1) - 1, 0), max(int(y1) - 1, 0)
            c2, r2 = min(int(x2) + 2, grid), min(int(y2) + 2, grid)
            out[i, cls, r1:r2, c1:c2] = False
    return out


def train_heads(features: torch.Tensor, boxes: list[torch.Tensor], *, heads: int = 1,
                seed: int = 0, members: Path | None = None, **kwargs: Any
                ) -> DenseDetector | DetectorEnsemble:
    """``heads`` detectors (`train_detector`, seeds ``seed``, ``seed + 1``, ...) read as one
    (`rsvlm.detector.DetectorEnsemble`); one head as it is. With ``members``, each head's
    weights are kept in ``members/seedN.safetensors`` as it finishes and read from there when
    a run starts again (the architecture is this call's)."""
    from safetensors.torch import load_file, save_file

    trained = []
    for s in range(seed, seed + heads):
        path = members / f"seed{s}.safetensors" if members is not None else None
        if path is not None and path.is_file():
            head = DenseDetector(kwargs["hidden"], kwargs["levels"],
                                 classes=kwargs.get("classes", 1),
                                 dim=kwargs.get("dim", 96), convs=kwargs.get("convs", 2),
                                 upsample=kwargs.get("upsample", 1),
                                 dilation=kwargs.get("dilation", 1))
            head.load_state_dict(load_file(str(path)))
            trained.append(head.eval())
            continue
        head = train_detector(features, boxes, seed=s, **kwargs)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(path))
        trained.append(head)
    return trained[0] if heads == 1 else DetectorEnsemble(trained)


@torch.inference_mode()
def predict(head: DenseDetector | DetectorEnsemble, features: torch.Tensor, threshold: float,
            batch_size: int = 32, cls: int = 0
            ) -> list[list[tuple[float, float, float, float, float]]]:
    """(x1, y1, x2, y2 in 0-1, score) of class ``cls`` per image, scores >= threshold."""
    levels = features.shape[1]
    out = []
    for i in range(0, len(features), batch_size):
        x = features[i:i + batch_size].float()
        heat, box = head([x[:, j] for j in range(levels)])
        for dets in decode(heat[:, cls:cls + 1], box, ["object"], threshold):
            out.append([(*d.box, d.score) for d in dets])
    return out


def score_detections(preds: list[list[tuple[float, ...]]], truths: list[torch.Tensor],
                     sizes: list[tuple[int, int]], threshold: float,
                     count_factor: float = 1.0) -> dict[str, Any]:
    """Find-all precision / recall / F1 at IoU 0.5 (pixels), counts and presence per image;
    the counts are the detections times ``count_factor`` (`DetectorConfig.count_of`)."""
    tp = n_pred = n_true = 0
    counts, presence = [], []
    for pred, truth, (w, h) in zip(preds, truths, sizes, strict=True):
        scale = np.array([w, h, w, h], np.float32)
        p = [np.array(d[:4]) * scale for d in pred if d[4] >= threshold]
        t = [np.array(b) * scale for b in truth.tolist()]
        tp += match_boxes(p, t)
        n_pred, n_true = n_pred + len(p), n_true + len(t)
        counts.append((scaled_count(len(p), count_factor), len(t)))
        presence.append((len(p) > 0) == (len(t) > 0))
    return {"n": len(preds), **detection_scores(tp, n_pred, n_true),
            "counting": count_scores(counts),
            "presence": sum(presence) / len(presence) if presence else None,
            "threshold": threshold}


def score_large(preds: list[list[tuple[float, ...]]], truths: list[torch.Tensor],
                sizes: list[tuple[int, int]], threshold: float, min_px: float
                ) -> dict[str, Any]:
    """`score_detections` over objects whose box covers at least ``min_px`` square pixels,
    COCO's area-range rule: a smaller labelled object is neither to be found nor wrong to
    find (a box matching it counts for nothing), an unmatched box that small is ignored, and
    the counts compare the boxes that large with the objects that large."""
    tp = n_pred = n_true = 0
    counts = []

    def area(b: np.ndarray) -> float:
        return float((b[2] - b[0]) * (b[3] - b[1]))

    for pred, truth, (w, h) in zip(preds, truths, sizes, strict=True):
        scale = np.array([w, h, w, h], np.float32)
        p = [np.array(d[:4]) * scale for d in pred if d[4] >= threshold]
        t = [np.array(b) * scale for b in truth.tolist()]
        matched = match_pairs(p, t)
        large = [area(b) >= min_px for b in t]
        tp += sum(large[j] for j in matched.values())
        n_pred += sum(large[matched[i]] if i in matched else area(b) >= min_px
                      for i, b in enumerate(p))
        n_true += sum(large)
        counts.append((sum(area(b) >= min_px for b in p), sum(large)))
    return {"n": len(preds), **detection_scores(tp, n_pred, n_true),
            "counting": count_scores(counts), "threshold": threshold}


THRESHOLDS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5)


def choose_threshold(preds: list[list[tuple[float, ...]]], truths: list[torch.Tensor],
                     sizes: list[tuple[int, int]], grid: Sequence[float] = THRESHOLDS[1:],
                     metric: str = "f1") -> float:
    """The threshold with the best find-all F1 (or ``metric="count"``: the most counts within
    20 %, then exact) on a selection set (never the scored one)."""
    def key(t: float) -> Any:
        r = score_detections(preds, truths, sizes, t)
        return r["f1"] if metric == "f1" else (r["counting"]["within_20pct"],
                                               r["counting"]["exact"])
    return max(grid, key=key)
