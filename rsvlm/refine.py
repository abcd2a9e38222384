"""A second look at each detected box, in the image's own pixels.

The dense detector (`rsvlm.detector`) places boxes from the frozen tower's 14 px patches: on
held-out regions a quarter of its boxes land on a building but miss IoU 0.5 (the bar's
measure), because a patch grid says little about where a roof's edge lies inside a patch. As
the second stage of a two-stage detector (Fast R-CNN, Girshick 2015) does, `BoxRefiner` looks
again at each box: a crop of the native-resolution pixels around it (twice the box, so both
edges are in view), resampled to a fixed size and standardised per crop (so a region's colour
and brightness do not matter), and regresses the box's offset and log scale. The crop is
box-relative, so one refiner reads 0.15 m aerial roofs and 0.5 m satellite ones alike
(`scripts/loro_refine.py` measures it region by region, never on a region it trained on).
"""

from __future__ import annotations

import math
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from rsvlm.detector import Detection

# R-CNN's delta scale: offsets ~0.1 of the box, log sizes ~0.2, learnt at unit variance.
DELTA_STD = (0.1, 0.1, 0.2, 0.2)


class BoxRefiner(nn.Module):
    """(batch, 3, size, size) standardised crops -> (batch, 5): scaled deltas (dx, dy, dw, dh)
    of the box the crop was cut around (`crop_boxes`), and a logit of the box's IoU with the
    object it lies on (0 on background): a second opinion on the detector's score."""

    def __init__(self, size: int = 64, width: int = 24, context: float = 2.0) -> None:
        super().__init__()
        self.size, self.width, self.context = size, width, context
        chans = [3, width, width * 2, width * 4, width * 4]
        layers: list[nn.Module] = []
        for a, b in pairwise(chans):
            layers += [nn.Conv2d(a, b, 3, stride=2, padding=1), nn.GroupNorm(8, b), nn.GELU(),
                       nn.Conv2d(b, b, 3, padding=1), nn.GroupNorm(8, b), nn.GELU()]
        self.body = nn.Sequential(*layers)
        cells = (size // 16) ** 2
        # Flattened, not pooled: where an edge lies in the crop is the whole answer.
        self.out = nn.Sequential(nn.Flatten(), nn.Linear(chans[-1] * cells, 128), nn.GELU(),
                                 nn.Linear(128, 5))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(crops))


class RefinerEnsemble(nn.Module):
    """Refiners trained from other seeds, read as one: their outputs averaged. One refiner's
    gain moves by several hundredths of F1 with its seed (`scripts/loro_refine.py --seed`,
    `scripts/loro.py --refiners A,B` reads the folds with the average)."""

    def __init__(self, members: list[BoxRefiner]) -> None:
        super().__init__()
        first = members[0]
        if any((m.size, m.context) != (first.size, first.context) for m in members):
            raise ValueError("refiners of an ensemble must cut the same crops")
        self.members = nn.ModuleList(members)
        self.size, self.width, self.context = first.size, first.width, first.context

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(crops) for m in self.members]).mean(0)


def pyramid(image: torch.Tensor, levels: int = 5) -> list[torch.Tensor]:
    """(3, H, W) float image -> itself halved `levels - 1` times (area averages), so that a
    crop is sampled from a level near its output size instead of aliasing a large one."""
    out = [image[None]]
    for _ in range(levels - 1):
        if min(out[-1].shape[-2:]) < 4:
            break
        out.append(F.avg_pool2d(out[-1], 2, ceil_mode=True))
    return out


def crop_boxes(levels: list[torch.Tensor], boxes: torch.Tensor, size: int,
               context: float) -> torch.Tensor:
    """Crops of `context` times each box (pixels x1, y1, x2, y2 of the level-0 image), sampled
    bilinearly at `size` x `size` from the pyramid level nearest that size, each standardised
    over its own pixels -> (n, 3, size, size)."""
    if not len(boxes):
        return torch.zeros(0, 3, size, size)
    h0, w0 = levels[0].shape[-2:]
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    bw = (boxes[:, 2] - boxes[:, 0]).clamp(min=1.0) * context
    bh = (boxes[:, 3] - boxes[:, 1]).clamp(min=1.0) * context
    pick = torch.log2((torch.maximum(bw, bh) / (2 * size)).clamp(min=1.0)).floor().long()
    pick = pick.clamp(max=len(levels) - 1)
    crops = torch.zeros(len(boxes), 3, size, size)
    lin = torch.linspace(-1, 1, size)
    for lv in pick.unique().tolist():
        sel = (pick == lv).nonzero().flatten()
        # Normalised grid coordinates of the level-0 image (align_corners=False: -1 and 1 are
        # the outer pixel edges, which scale the same at every level).
        gx = ((cx[sel, None] + bw[sel, None] / 2 * lin) / w0) * 2 - 1
        gy = ((cy[sel, None] + bh[sel, None] / 2 * lin) / h0) * 2 - 1
        grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), -1)
        src = levels[lv].expand(len(sel), -1, -1, -1)
        crops[sel] = F.grid_sample(src, grid, mode="bilinear", padding_mode="border",
                                   align_corners=False)
    flat = crops.flatten(2)
    mean, std = flat.mean(-1, keepdim=True), flat.std(-1, keepdim=True).clamp(min=1e-3)
    return ((flat - mean) / std).view_as(crops)


def box_deltas(proposals: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Scaled deltas that move each proposal onto its truth (both (n, 4) pixels)."""
    pw, ph = (proposals[:, 2] - proposals[:, 0]).clamp(min=1e-3), \
        (proposals[:, 3] - proposals[:, 1]).clamp(min=1e-3)
    tw, th = (truth[:, 2] - truth[:, 0]).clamp(min=1e-3), (truth[:, 3] - truth[:, 1]).clamp(min=1e-3)
    d = torch.stack([((truth[:, 0] + truth[:, 2]) - (proposals[:, 0] + proposals[:, 2])) / 2 / pw,
                     ((truth[:, 1] + truth[:, 3]) - (proposals[:, 1] + proposals[:, 3])) / 2 / ph,
                     torch.log(tw / pw), torch.log(th / ph)], 1)
    return d / torch.tensor(DELTA_STD)


def apply_deltas(proposals: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """`box_deltas`'s inverse: proposals (n, 4) moved by scaled deltas (n, 4)."""
    d = deltas * torch.tensor(DELTA_STD)
    d[:, 2:] = d[:, 2:].clamp(-math.log(4), math.log(4))
    pw, ph = proposals[:, 2] - proposals[:, 0], proposals[:, 3] - proposals[:, 1]
    cx = (proposals[:, 0] + proposals[:, 2]) / 2 + d[:, 0] * pw
    cy = (proposals[:, 1] + proposals[:, 3]) / 2 + d[:, 1] * ph
    w, h = pw * d[:, 2].exp(), ph * d[:, 3].exp()
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)


@torch.inference_mode()
def refine(refiner: BoxRefiner | RefinerEnsemble, image: np.ndarray, boxes: torch.Tensor,
           steps: int = 1, quality: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Boxes (n, 4 pixels) of `image` ((H, W, 3) uint8) refined `steps` times, clipped to the
    image, and (with ``quality``: one more look at each, as long again) the IoU the refiner
    expects of each refined box."""
    if not len(boxes):
        return boxes, torch.zeros(0) if quality else None
    levels = pyramid(image_tensor(image))
    h, w = levels[0].shape[-2:]
    boxes = boxes.float()
    for _ in range(steps):
        crops = crop_boxes(levels, boxes, refiner.size, refiner.context)
        boxes = apply_deltas(boxes, refiner(crops)[:, :4])
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clamp(0, w)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clamp(0, h)
    if not quality:
        return boxes, None
    expected = refiner(crop_boxes(levels, boxes, refiner.size, refiner.context))[:, 4].sigmoid()
    return boxes, expected


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 array -> (3, H, W) float 0-1."""
    arr = np.array(np.asarray(image)[..., :3])  # a writable copy
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0


REFINER_NAME = "refiner.safetensors"


def save_refiner(refiner: BoxRefiner | RefinerEnsemble, folder: str | Path) -> dict:
    """Weights into ``folder`` (a detector's folder); returns the config that rebuilds it."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in refiner.state_dict().items()},
              str(Path(folder) / REFINER_NAME))
    members = len(refiner.members) if isinstance(refiner, RefinerEnsemble) else 1
    return {"size": refiner.size, "width": refiner.width, "context": refiner.context,
            "members": members}


def load_refiner(folder: str | Path, config: dict) -> BoxRefiner | RefinerEnsemble:
    from safetensors.torch import load_file

    path = Path(folder) / REFINER_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the detector's config names a refiner")
    arch = {k: config[k] for k in ("size", "width", "context") if k in config}
    members = int(config.get("members", 1))
    refiner = (BoxRefiner(**arch) if members == 1
               else RefinerEnsemble([BoxRefiner(**arch) for _ in range(members)]))
    refiner.load_state_dict(load_file(str(path)))
    return refiner.eval()


def refine_detections(refiner: BoxRefiner | RefinerEnsemble, image: Any, detections: list[Detection],
                      steps: int = 1, rescore: float = 0.0) -> list[Detection]:
    """Detections (boxes 0-1 of ``image``: PIL or (H, W, 3) uint8) with their boxes refined in
    the image's own pixels and, with ``rescore`` > 0, their scores times the refiner's
    expected IoU to that power; boxes that now overlap are suppressed again."""
    from rsvlm.detector import suppress

    if not detections:
        return []
    arr = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)
    h, w = arr.shape[:2]
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    boxes = torch.tensor([d.box for d in detections], dtype=torch.float32) * scale
    new, quality = refine(refiner, arr, boxes, steps=steps, quality=bool(rescore))
    expected = quality.tolist() if quality is not None else [1.0] * len(detections)
    out = [Detection(d.label, d.score * q ** rescore, tuple(float(v) for v in b))
           for d, b, q in zip(detections, (new / scale).tolist(), expected, strict=True)]
    return suppress(out)
