"""A text-conditioned box head: where the objects the question names are, in the chip.

A 135M language model writes box coordinates as digits poorly: trained on eight times more
grounding data it still ignored position words ("top right" got a box on the left). So the
language model decides *whether* an answer holds boxes, how many and what they are called, and
this head decides *where* (the role of the detection heads of Groma and GLaMM next to their LLMs,
here dense and anchor-free like FCOS): the question's token embeddings and the multi-level patch
features go through a small transformer encoder together, and every patch predicts

* a logit: "this patch is the centre of an object the question asks for", and
* the distances from the patch centre to that object's four sides (a box in 0-1 chip units).

A referring question takes the best patch's box; "find all" takes every patch above a threshold,
non-maximum suppressed. The head sees the same cached vision levels as the rest of the model, so
training it costs no vision or LM forward pass.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def sincos_2d(side: int, dim: int) -> torch.Tensor:
    """Fixed 2D sine-cosine position codes ``(side * side, dim)``, row-major like the patches."""
    if dim % 4:
        raise ValueError(f"box head width {dim} must be divisible by 4")
    y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    omega = 1.0 / (10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4)))
    xs, ys = x.flatten()[:, None] * omega, y.flatten()[:, None] * omega
    return torch.cat([xs.sin(), xs.cos(), ys.sin(), ys.cos()], dim=1)


def patch_centres(grid: int) -> torch.Tensor:
    """``(grid * grid, 2)`` x, y of each patch centre in 0-1, row-major."""
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([cx.flatten(), cy.flatten()], 1)


class BoxHead(nn.Module):
    """(vision levels, question token embeddings) -> per-patch logits and boxes."""

    def __init__(self, vision_hidden: int, num_levels: int, text_hidden: int, grid: int,
                 dim: int = 192, layers: int = 3, heads: int = 4) -> None:
        super().__init__()
        self.grid = grid
        self.vision_in = nn.Sequential(nn.LayerNorm(vision_hidden * num_levels),
                                       nn.Linear(vision_hidden * num_levels, dim))
        self.text_in = nn.Sequential(nn.LayerNorm(text_hidden), nn.Linear(text_hidden, dim))
        # Derived from the grid, so not saved (`_init_weights` refills them after a load).
        self.register_buffer("position", sincos_2d(grid, dim), persistent=False)
        self.register_buffer("centres", patch_centres(grid), persistent=False)
        self.kind = nn.Parameter(torch.zeros(2, dim))  # image / text token type
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.1, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.score = nn.Linear(dim, 1)
        self.sides = nn.Linear(dim, 4)

    def forward(self, levels: list[torch.Tensor], text_embeds: torch.Tensor,
                text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``levels``: L tensors ``(B, grid*grid, vision_hidden)``; ``text_embeds`` ``(B, T, d)``
        with ``text_mask`` ``(B, T)`` (True for real tokens). Returns logits ``(B, P)`` and
        boxes ``(B, P, 4)`` as x1, y1, x2, y2 in 0-1 chip units."""
        dtype = self.score.weight.dtype
        patches = torch.cat([level.to(dtype) for level in levels], dim=-1)
        if patches.shape[1] != self.grid * self.grid:
            raise ValueError(f"the box head expects {self.grid}x{self.grid} patches, got "
                             f"{patches.shape[1]}")
        vision = self.vision_in(patches) + self.position.to(dtype) + self.kind[0]
        text = self.text_in(text_embeds.to(dtype)) + self.kind[1]
        tokens = torch.cat([text, vision], dim=1)
        pad = torch.cat([~text_mask.bool(),
                         torch.zeros(vision.shape[:2], dtype=torch.bool, device=vision.device)],
                        dim=1)
        out = self.norm(self.encoder(tokens, src_key_padding_mask=pad))[:, text.shape[1]:]
        logits = self.score(out).squeeze(-1)
        # Distances in patch units through softplus: positive, and a patch-sized object starts
        # near 1 instead of near the whole chip.
        ltrb = F.softplus(self.sides(out)) / self.grid
        centres = self.centres.to(ltrb.dtype)
        boxes = torch.cat([centres - ltrb[..., :2], centres + ltrb[..., 2:]], dim=-1)
        return logits, boxes.clamp(0.0, 1.0)


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of ``(n, 4)`` and ``(m, 4)`` x1y1x2y2 boxes."""
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-9)


def select_boxes(logits: torch.Tensor, boxes: torch.Tensor, *, single: bool,
                 threshold: float = 0.5, nms_iou: float = 0.5,
                 max_boxes: int = 12) -> list[tuple[float, list[float]]]:
    """One image's head output -> ``[(score, [x1, y1, x2, y2] in 0-1)]``, best first.

    ``single``: the best patch's box (a referring question names one object). Otherwise every
    patch above ``threshold`` after greedy non-maximum suppression, at least the best one (the
    language model already said there is something to find)."""
    scores = logits.float().sigmoid()
    order = scores.argsort(descending=True)
    if single:
        best = int(order[0])
        return [(float(scores[best]), boxes[best].float().tolist())]
    kept: list[int] = []
    for idx in order.tolist():
        if kept and (scores[idx] < threshold or len(kept) >= max_boxes):
            break
        if kept and float(_iou(boxes[idx:idx + 1].float(), boxes[kept].float()).max()) >= nms_iou:
            continue
        kept.append(idx)
    return [(float(scores[i]), boxes[i].float().tolist()) for i in kept]
