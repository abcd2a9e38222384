"""Training targets and loss of the box head (`rsvlm.box_head`).

Which patches answer for an object (FCOS's centre sampling): those whose centre lies inside the
box *and* within ``radius`` patches of the box centre, and always the patch holding the centre,
so a box smaller than a patch still gets one. A patch claimed by two objects answers for the
smaller. The loss is a sigmoid focal loss on every patch's logit and L1 + generalised IoU on the
answering patches' boxes, each summed and divided by the number of answering patches.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from rsvlm.box_head import patch_centres


def assign_patches(boxes: torch.Tensor, grid: int, radius: float = 1.5) -> torch.Tensor:
    """``boxes`` ``(n, 4)`` x1y1x2y2 in 0-1 -> ``(grid*grid,)`` index of the box each patch
    answers for, -1 for none."""
    cx, cy = patch_centres(grid).unbind(1)
    assign = torch.full((grid * grid,), -1, dtype=torch.long)
    owner_area = torch.full((grid * grid,), float("inf"))
    reach = radius / grid
    for k, (x1, y1, x2, y2) in enumerate(boxes.float().tolist()):
        mx, my = (x1 + x2) / 2, (y1 + y2) / 2
        inside = ((cx > x1) & (cx < x2) & (cy > y1) & (cy < y2)
                  & ((cx - mx).abs() < reach) & ((cy - my).abs() < reach))
        col = min(max(int(mx * grid), 0), grid - 1)
        row = min(max(int(my * grid), 0), grid - 1)
        inside[row * grid + col] = True
        area = max(x2 - x1, 0.0) * max(y2 - y1, 0.0)
        take = inside & (area < owner_area)
        assign[take] = k
        owner_area[take] = area
    return assign


def generalized_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise GIoU of ``(n, 4)`` x1y1x2y2 boxes."""
    lt, rb = torch.max(a[:, :2], b[:, :2]), torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    hull = (torch.max(a[:, 2:], b[:, 2:]) - torch.min(a[:, :2], b[:, :2])).prod(-1)
    return inter / union.clamp(min=1e-7) - (hull - union) / hull.clamp(min=1e-7)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25,
               gamma: float = 2.0) -> torch.Tensor:
    """RetinaNet's sigmoid focal loss, summed."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    weight = alpha * target + (1 - alpha) * (1 - target)
    return (weight * ce * (1 - p_t) ** gamma).sum()


def box_head_loss(logits: torch.Tensor, boxes: torch.Tensor, assign: torch.Tensor,
                  truth: torch.Tensor, l1_weight: float = 5.0,
                  giou_weight: float = 2.0) -> torch.Tensor:
    """``logits`` ``(B, P)``, ``boxes`` ``(B, P, 4)``, ``assign`` ``(B, P)`` (from
    `assign_patches`), ``truth`` ``(B, K, 4)`` (padded per image) -> scalar loss."""
    positive = assign >= 0
    n_pos = positive.sum().clamp(min=1).to(logits.dtype)
    loss = focal_loss(logits.float(), positive.float())
    if positive.any():
        batch_idx, patch_idx = positive.nonzero(as_tuple=True)
        pred = boxes[batch_idx, patch_idx].float()
        gold = truth[batch_idx, assign[batch_idx, patch_idx]].float()
        loss = loss + l1_weight * F.l1_loss(pred, gold, reduction="sum")
        loss = loss + giou_weight * (1 - generalized_iou(pred, gold)).sum()
    return loss / n_pos
