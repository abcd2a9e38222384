"""Dense object detector over the frozen multi-level vision features.

The box head (`rsvlm.box_head`) places the boxes the language model asks for; this head finds
objects by itself, so that presence, counts and "find all" rest on what is in the image rather
than on a retrieved neighbour's text. CenterNet-style (Zhou et al. 2019): per patch of a finer
grid than the chat view's (the tower run at `input_size`, 448 px -> 32 x 32 patches of 14 px),
a centre heatmap per class and a box (log distances from the patch's centre to the four edges,
as in FCOS). Peaks of the heatmap above a threshold are the detections, each with the box its
patch predicts.
"""

from __future__ import annotations

import math
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
    grid, grid), boxes (batch, 4, grid, grid)). With ``upsample`` 2 the maps are twice as fine
    as the patch grid (half a patch a cell): two roofs whose centres share a patch, or lie in
    neighbouring ones, can then be two peaks. With ``dilation`` d, the i-th convolution
    looks d ** i patches apart (1, 2, 4 for d = 2), so that three of them span 15 patches
    instead of 7: a large roof seen whole, not as parts each with a centre of its own."""

    def __init__(self, hidden: int, levels: int, classes: int = 1, dim: int = 96,
                 convs: int = 2, upsample: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(hidden * levels, dim), nn.GELU())
        layers: list[nn.Module] = []
        for i in range(convs):
            d = dilation ** i
            layers += [nn.Conv2d(dim, dim, 3, padding=d, dilation=d), nn.GroupNorm(8, dim),
                       nn.GELU()]
        self.body = nn.Sequential(*layers)
        self.upsample = upsample
        self.dilation = dilation
        self.up = (nn.Sequential(nn.Upsample(scale_factor=upsample, mode="bilinear",
                                             align_corners=False),
                                 nn.Conv2d(dim, dim, 3, padding=1), nn.GroupNorm(8, dim),
                                 nn.GELU()) if upsample > 1 else nn.Identity())
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
        x = self.up(self.body(x))
        return self.heat(x), self.box(x)


class DetectorEnsemble(nn.Module):
    """Several `DenseDetector` heads on the same levels, read as one: their centre heatmaps
    (as probabilities) and boxes (as edges) averaged, returned in a head's own form so that
    `decode` and training take it as they take one head. Heads trained from other seeds
    disagree most on what is not a roof: the average keeps the peaks they share."""

    def __init__(self, members: list[DenseDetector]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    @property
    def upsample(self) -> int:
        return self.members[0].upsample

    def forward(self, levels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        probs, edges = [], []
        for member in self.members:
            heat, box = member(levels)
            probs.append(heat.sigmoid())
            edges.append(box_edges(box))
        prob = torch.stack(probs).mean(0).clamp(1e-6, 1 - 1e-6)
        return torch.logit(prob), edges_to_box(torch.stack(edges).mean(0))


def suppress(dets: list[Detection], iou: float = 0.5, contained: float = 0.8) -> list[Detection]:
    """Greedy non-maximum suppression per class, highest score first: a box goes when it
    overlaps a kept one by `iou`, or lies `contained` inside it (or it inside the box): two
    peaks on one large roof give a box and a part of it, whose IoU alone can stay low."""
    kept: list[Detection] = []
    for d in sorted(dets, key=lambda d: -d.score):
        ax1, ay1, ax2, ay2 = d.box
        a_area = max(ax2 - ax1, 0.0) * max(ay2 - ay1, 0.0)
        for k in kept:
            if k.label != d.label:
                continue
            bx1, by1, bx2, by2 = k.box
            inter = max(min(ax2, bx2) - max(ax1, bx1), 0.0) * max(min(ay2, by2) - max(ay1, by1), 0.0)
            b_area = max(bx2 - bx1, 0.0) * max(by2 - by1, 0.0)
            union = a_area + b_area - inter
            if union > 0 and (inter / union >= iou
                              or inter >= contained * max(min(a_area, b_area), 1e-12)):
                break
        else:
            kept.append(d)
    return kept


def decode(heat: torch.Tensor, box: torch.Tensor, labels: list[str], threshold: float,
           max_detections: int = 200, nms: bool = True) -> list[list[Detection]]:
    """Heatmap peaks (3 x 3 local maxima) scoring above `threshold` -> detections per image,
    overlapping boxes suppressed (`suppress`)."""
    return decode_maps(heat.sigmoid(), box_edges(box), labels, threshold, max_detections, nms)


def decode_maps(prob: torch.Tensor, edges: torch.Tensor, labels: list[str], threshold: float,
                max_detections: int = 200, nms: bool = True) -> list[list[Detection]]:
    """`decode` of heatmap probabilities (batch, classes, grid, grid) and box edges (batch, 4,
    grid, grid: x1, y1, x2, y2 in patches, `box_edges`)."""
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
            x1, y1, x2, y2 = (min(max(v / g, 0.0), 1.0) for v in edges[i, :, row, col].tolist())
            dets.append(Detection(labels[cls], float(flat[idx]), (x1, y1, x2, y2)))
        out.append(suppress(dets) if nms else dets)
    return out


def box_edges(box: torch.Tensor) -> torch.Tensor:
    """The head's box channels (log distances from each patch's centre to the left, top, right
    and bottom edges, FCOS-style, in patches) -> (x1, y1, x2, y2) in patches, per patch."""
    g = box.shape[-1]
    centre = torch.arange(g, dtype=box.dtype, device=box.device) + 0.5
    cx, cy = centre.view(1, 1, g), centre.view(1, g, 1)
    dist = box.clamp(max=math.log(2 * g)).exp()
    return torch.stack([cx - dist[:, 0], cy - dist[:, 1], cx + dist[:, 2], cy + dist[:, 3]], 1)


def edges_to_box(edges: torch.Tensor) -> torch.Tensor:
    """The inverse of `box_edges`: (x1, y1, x2, y2) per patch, in patches -> the head's log
    distances from each patch's centre (an edge on the wrong side of the centre: nearly 0)."""
    g = edges.shape[-1]
    centre = torch.arange(g, dtype=edges.dtype, device=edges.device) + 0.5
    cx, cy = centre.view(1, 1, g), centre.view(1, g, 1)
    dist = torch.stack([cx - edges[:, 0], cy - edges[:, 1], edges[:, 2] - cx,
                        edges[:, 3] - cy], 1)
    return dist.clamp(min=1e-4).log()


def detection_targets(boxes: list[torch.Tensor], classes: list[torch.Tensor], grid: int,
                      n_classes: int, centre_radius: int = 0
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian centre heatmaps (batch, classes, grid, grid), box targets (batch, 4, grid, grid:
    x1, y1, x2, y2 in patches) and their weights (batch, grid, grid). Boxes in 0-1 of the image.

    Every patch whose centre lies inside an object (the smallest one where objects overlap)
    learns that object's box, weighted by the centre heatmap there: the box is read at the peak,
    but a few dozen labelled objects per region give too few centre patches alone to learn
    sizes from (FCOS, Tian et al. 2019).

    ``centre_radius``: the cells up to that many cells from the centre's (inside the object)
    are centres too, so that a roof's centre need not be placed to one cell of a map finer
    than the patches that describe it (FCOS's centre sampling)."""
    b = len(boxes)
    heat = torch.zeros(b, n_classes, grid, grid)
    target = torch.zeros(b, 4, grid, grid)
    weight = torch.zeros(b, grid, grid)
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    px, py = xs + 0.5, ys + 0.5
    for i, (bx, cl) in enumerate(zip(boxes, classes, strict=True)):
        objects = sorted(zip((bx * grid).tolist(), cl.tolist(), strict=True),
                         key=lambda o: -(o[0][2] - o[0][0]) * (o[0][3] - o[0][1]))
        for (x1, y1, x2, y2), c in objects:  # largest first: smaller ones overwrite
            w, h = max(x2 - x1, 1e-3), max(y2 - y1, 1e-3)
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            col, row = min(int(cx), grid - 1), min(int(cy), grid - 1)
            # Spread with the object's size (CenterNet's radius, in patches), at least a patch.
            sigma = max(min(w, h) / 6, 0.5)
            g = torch.exp(-((xs - col) ** 2 + (ys - row) ** 2) / (2 * sigma ** 2))
            heat[i, c] = torch.maximum(heat[i, c], g)
            heat[i, c, row, col] = 1.0
            inside = (px > x1) & (px < x2) & (py > y1) & (py < y2)
            if centre_radius:
                near = ((xs - col).abs() <= centre_radius) & ((ys - row).abs() <= centre_radius)
                heat[i, c][near & inside] = 1.0
            inside[row, col] = True  # an object smaller than a patch still has its centre
            target[i, :, inside] = torch.tensor([x1, y1, x2, y2]).view(4, 1)
            weight[i, inside] = g[inside].clamp(min=0.1)
    return heat, target, weight


#: The least an object's centre is asked to score under `detection_loss`'s ``iou_target``: early
#: in training every box is poor, and the centres must still learn that an object is there.
IOU_TARGET_FLOOR = 0.3


def detection_loss(heat_logits: torch.Tensor, box: torch.Tensor, heat: torch.Tensor,
                   target: torch.Tensor, weight: torch.Tensor,
                   known: torch.Tensor | None = None, iou_target: bool = False) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss on the heatmap + GIoU of the boxes, weighted.
    ``known`` (batch, classes), when given: the heatmaps each image tells about (its labelled
    class, and those known to be absent from it); the others train nothing there, so a set
    that labels only trees does not teach that its buildings are background. Per patch
    (batch, classes, grid, grid), it can say more: inside a labelled aircraft, "building" is
    known to be background too.

    ``iou_target``: an object's centre learns to score the IoU of its own box with the object
    (at least `IOU_TARGET_FLOOR`), weighted by it, instead of 1 (VarifocalNet, Zhang et al.
    2021): a peak then says how well its box fits as well as that an object is there, so the
    boxes that survive the threshold are the ones that match."""
    p = heat_logits.sigmoid().clamp(1e-4, 1 - 1e-4)
    pos = heat.eq(1.0).float()
    neg = 1.0 - pos
    if known is not None:  # (batch, classes), or (batch, classes, grid, grid) per patch
        mask = known.float() if known.dim() == 4 else known.float()[:, :, None, None]
        pos, neg = pos * mask, neg * mask
    if iou_target:
        with torch.no_grad():
            b, _, g, _ = heat.shape
            fit = box_iou(box_edges(box).permute(0, 2, 3, 1).reshape(-1, 4),
                          target.permute(0, 2, 3, 1).reshape(-1, 4))
            q = fit.reshape(b, 1, g, g).clamp(min=IOU_TARGET_FLOOR)
        pos_loss = -((q * torch.log(p) + (1 - q) * torch.log(1 - p)) * q * pos).sum()
    else:
        pos_loss = -(torch.log(p) * (1 - p) ** 2 * pos).sum()
    neg_loss = -(torch.log(1 - p) * p ** 2 * (1 - heat) ** 4 * neg).sum()
    n_pos = pos.sum().clamp(min=1.0)
    loss = (pos_loss + neg_loss) / n_pos
    mask = weight > 0
    if mask.any():
        pred = box_edges(box).permute(0, 2, 3, 1)[mask]
        true = target.permute(0, 2, 3, 1)[mask]
        w = weight[mask]
        loss = loss + 2.0 * ((1 - generalized_iou(pred, true)) * w).sum() / w.sum()
    return loss


def _overlap(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersection and union areas of matching rows of (n, 4) x1, y1, x2, y2 boxes."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt, rb = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    return inter, area_a + area_b - inter


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of matching rows of (n, 4) x1, y1, x2, y2 boxes."""
    inter, union = _overlap(a, b)
    return inter / union.clamp(min=1e-6)


def generalized_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GIoU (Rezatofighi et al. 2019) of matching rows of (n, 4) x1, y1, x2, y2 boxes."""
    inter, union = _overlap(a, b)
    hull = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).prod(1)
    return inter / union.clamp(min=1e-6) - (hull - union) / hull.clamp(min=1e-6)
