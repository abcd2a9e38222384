"""Dense object detector over the frozen multi-level vision features.

The box head (`rsvlm.box_head`) places the boxes the language model asks for; this head finds
objects by itself, so that presence, counts and "find all" rest on what is in the image rather
than on a retrieved neighbour's text. CenterNet-style (Zhou et al. 2019): per patch of a finer
grid than the chat view's (the tower run at `input_size`, 448 px -> 32 x 32 patches of 14 px),
a centre heatmap per class and a box (centre offset inside the patch, log width and height in
patches). Peaks of the heatmap above a threshold are the detections.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class Detection:
    label: str
    score: float
    box: tuple[float, float, float, float]  # 0-1 of the image: x1, y1, x2, y2


class DenseDetector(nn.Module):
    """Levels of patch features (batch, grid*grid, hidden) -> (heatmap logits (batch, classes,
    grid, grid), boxes (batch, 4, grid, grid))."""

    def __init__(self, hidden: int, levels: int, classes: int = 1, dim: int = 96,
                 convs: int = 2) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(hidden * levels, dim), nn.GELU())
        layers: list[nn.Module] = []
        for _ in range(convs):
            layers += [nn.Conv2d(dim, dim, 3, padding=1), nn.GroupNorm(8, dim), nn.GELU()]
        self.body = nn.Sequential(*layers)
        self.heat = nn.Conv2d(dim, classes, 1)
        self.box = nn.Conv2d(dim, 4, 1)
        # A prior of 1 % objectness keeps the first steps' focal loss from exploding
        # (RetinaNet's initialisation).
        nn.init.constant_(self.heat.bias, -4.6)

    def forward(self, levels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat(levels, dim=-1)
        b, n, _ = x.shape
        grid = int(round(n ** 0.5))
        if grid * grid != n:
            raise ValueError(f"{n} patches do not make a square grid")
        x = self.proj(x).transpose(1, 2).reshape(b, -1, grid, grid)
        x = self.body(x)
        return self.heat(x), self.box(x)


def decode(heat: torch.Tensor, box: torch.Tensor, labels: list[str], threshold: float,
           max_detections: int = 200) -> list[list[Detection]]:
    """Heatmap peaks (3 x 3 local maxima) scoring above `threshold` -> detections per image."""
    prob = heat.sigmoid()
    peaks = prob * (F.max_pool2d(prob, 3, stride=1, padding=1) == prob)
    b, k, g, _ = prob.shape
    out: list[list[Detection]] = []
    for i in range(b):
        flat = peaks[i].flatten()
        keep = (flat >= threshold).nonzero().flatten()
        keep = keep[flat[keep].argsort(descending=True)][:max_detections]
        dets = []
        for idx in keep.tolist():
            cls, cell = divmod(idx, g * g)
            row, col = divmod(cell, g)
            dx, dy, lw, lh = box[i, :, row, col].tolist()
            cx = (col + torch.sigmoid(torch.tensor(dx)).item()) / g
            cy = (row + torch.sigmoid(torch.tensor(dy)).item()) / g
            w = min(float(torch.exp(torch.tensor(lw).clamp(max=4.0))), g) / g
            h = min(float(torch.exp(torch.tensor(lh).clamp(max=4.0))), g) / g
            x1, y1 = max(cx - w / 2, 0.0), max(cy - h / 2, 0.0)
            x2, y2 = min(cx + w / 2, 1.0), min(cy + h / 2, 1.0)
            dets.append(Detection(labels[cls], float(flat[idx]), (x1, y1, x2, y2)))
        out.append(dets)
    return out


def detection_targets(boxes: list[torch.Tensor], classes: list[torch.Tensor], grid: int,
                      n_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian centre heatmaps (batch, classes, grid, grid), box targets (batch, 4, grid, grid)
    and the mask of centre patches (batch, grid, grid). Boxes in 0-1 of the image."""
    b = len(boxes)
    heat = torch.zeros(b, n_classes, grid, grid)
    target = torch.zeros(b, 4, grid, grid)
    mask = torch.zeros(b, grid, grid, dtype=torch.bool)
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    for i, (bx, cl) in enumerate(zip(boxes, classes, strict=True)):
        for (x1, y1, x2, y2), c in zip((bx * grid).tolist(), cl.tolist(), strict=True):
            w, h = max(x2 - x1, 1e-3), max(y2 - y1, 1e-3)
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            col, row = min(int(cx), grid - 1), min(int(cy), grid - 1)
            # Spread with the object's size (CenterNet's radius, in patches), at least a patch.
            sigma = max(min(w, h) / 6, 0.5)
            g = torch.exp(-((xs - col) ** 2 + (ys - row) ** 2) / (2 * sigma ** 2))
            heat[i, c] = torch.maximum(heat[i, c], g)
            heat[i, c, row, col] = 1.0
            off_x = min(max(cx - col, 1e-3), 1 - 1e-3)
            off_y = min(max(cy - row, 1e-3), 1 - 1e-3)
            target[i, :, row, col] = torch.tensor([
                torch.logit(torch.tensor(off_x)).item(), torch.logit(torch.tensor(off_y)).item(),
                float(torch.log(torch.tensor(w))), float(torch.log(torch.tensor(h)))])
            mask[i, row, col] = True
    return heat, target, mask


def detection_loss(heat_logits: torch.Tensor, box: torch.Tensor, heat: torch.Tensor,
                   target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss on the heatmap + L1 on the centre patches' boxes."""
    p = heat_logits.sigmoid().clamp(1e-4, 1 - 1e-4)
    pos = heat.eq(1.0).float()
    neg = 1.0 - pos
    pos_loss = -(torch.log(p) * (1 - p) ** 2 * pos).sum()
    neg_loss = -(torch.log(1 - p) * p ** 2 * (1 - heat) ** 4 * neg).sum()
    n_pos = pos.sum().clamp(min=1.0)
    loss = (pos_loss + neg_loss) / n_pos
    if mask.any():
        pred = box.permute(0, 2, 3, 1)[mask]
        true = target.permute(0, 2, 3, 1)[mask]
        loss = loss + F.l1_loss(pred, true, reduction="sum") / n_pos
    return loss
