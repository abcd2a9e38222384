"""Tried, not adopted (issue 18, round 8): a second-stage verifier on the frozen features.

For each held-out OAM area: the detector's own proposals (score >= 0.05) on the other regions'
training views, each proposed by the fold head that never saw that region (so the proposals
look as they will on a new region), sampled on the principal components of the levels (a 4 x 4
grid inside the box, a ring one box side out, the box mean) with the detector's score and the
box size, label IoU >= 0.5 with a footprint; a small MLP learns to tell them apart. The held-out
area's proposals are then scored by it ("new"), by the detector ("old") or by both (geometric
mean), refined by the fold's refiner, and scored at the threshold the other three areas favour.

    python scripts/experiments/loro_verifier.py --run runs/loro_mc --refiners runs/refine_q
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import loro  # noqa: E402

from training.detection import (  # noqa: E402
    THRESHOLDS,
    predict,
    principal_components,
    reduce_features,
    score_detections,
)
from training.refine import refined_predictions  # noqa: E402

REGIONS = ["banepa_np", "catanduanes_ph", "kampala_ug", "zanzibar_tz", "rio", "atlanta"]
AERIAL = REGIONS[:4]
FLOOR = 0.05


def pairwise_iou(p: np.ndarray, t: np.ndarray) -> np.ndarray:
    if len(p) == 0 or len(t) == 0:
        return np.zeros((len(p), len(t)))
    p, t = p[:, None], t[None]
    ix = np.clip(np.minimum(p[..., 2], t[..., 2]) - np.maximum(p[..., 0], t[..., 0]), 0, None)
    iy = np.clip(np.minimum(p[..., 3], t[..., 3]) - np.maximum(p[..., 1], t[..., 1]), 0, None)
    inter = ix * iy
    area = ((p[..., 2] - p[..., 0]) * (p[..., 3] - p[..., 1])
            + (t[..., 2] - t[..., 0]) * (t[..., 3] - t[..., 1]) - inter)
    return inter / area


def roi(feat: torch.Tensor, boxes: list, g: int = 32) -> torch.Tensor:
    """(patches, k) features of one view, boxes 0-1 -> (boxes, 16 k + k + k)."""
    fmap = feat.float().T.reshape(1, -1, g, g)
    b = torch.as_tensor(np.asarray(boxes, np.float32))
    m = len(b)
    s = (torch.arange(4) + 0.5) / 4
    x = b[:, 0:1] + (b[:, 2:3] - b[:, 0:1]) * s
    y = b[:, 1:2] + (b[:, 3:4] - b[:, 1:2]) * s
    grid = torch.stack([x[:, None, :].expand(m, 4, 4), y[:, :, None].expand(m, 4, 4)], -1)
    inner = F.grid_sample(fmap.expand(m, -1, -1, -1), grid * 2 - 1, align_corners=False)
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    ang = torch.arange(8) * (math.pi / 4)
    ring = torch.stack([cx[:, None] + w[:, None] * torch.cos(ang),
                        cy[:, None] + h[:, None] * torch.sin(ang)], -1)[:, None]
    ring = F.grid_sample(fmap.expand(m, -1, -1, -1), ring * 2 - 1, align_corners=False,
                         padding_mode="border").mean(-1).flatten(1)
    return torch.cat([inner.flatten(1), ring, inner.mean((2, 3))], 1)


def geometry(dets: list) -> torch.Tensor:
    d = np.asarray(dets, np.float32).reshape(-1, 5)
    sc = np.clip(d[:, 4], 1e-4, 1 - 1e-4)
    return torch.as_tensor(np.stack([np.log(sc / (1 - sc)), np.log(d[:, 2] - d[:, 0] + 1e-3),
                                     np.log(d[:, 3] - d[:, 1] + 1e-3)], 1))


def samples(run: Path, head_of: str, region: str, part: str, pca: tuple, limit: int | None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
    head, _ = loro._fold_head(run, head_of)
    d = loro._load(run, region, part)
    n = len(d["features"]) if limit is None else min(limit, len(d["features"]))
    feats = d["features"][:n]
    preds = predict(head, feats, FLOOR)
    reduced = reduce_features(feats, *pca)[:, 0]
    xs, gs, ys = [], [], []
    for i, dets in enumerate(preds):
        if not dets:
            continue
        w, h = d["sizes"][i]
        s = np.array([w, h, w, h], np.float32)
        t = d["boxes"][i].numpy() * s if len(d["boxes"][i]) else np.zeros((0, 4))
        m = pairwise_iou(np.array([p[:4] for p in dets]) * s, t)
        ys.append(torch.as_tensor(m.max(1) if m.shape[1] else np.zeros(len(dets)),
                                  dtype=torch.float32))
        xs.append(roi(reduced[i], [p[:4] for p in dets]).half())
        gs.append(geometry(dets))
    return torch.cat(xs), torch.cat(gs), torch.cat(ys), preds


class Verifier(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(d), nn.Dropout(0.2), nn.Linear(d, 256), nn.GELU(),
                                 nn.Dropout(0.2), nn.Linear(256, 1))
        self.mix = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1) + self.mix(g).squeeze(1)


def train(x: torch.Tensor, g: torch.Tensor, y: torch.Tensor, epochs: int = 30) -> Verifier:
    torch.manual_seed(0)
    v = Verifier(x.shape[1])
    opt = torch.optim.AdamW(v.parameters(), 1e-3, weight_decay=0.05)
    steps = epochs * math.ceil(len(x) / 256)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=steps)
    target = (y >= 0.5).float()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(256):
            loss = F.binary_cross_entropy_with_logits(v(x[idx].float(), g[idx]), target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return v.eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/loro_mc")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--refiners", default="runs/refine_q")
    ap.add_argument("--views", type=int, default=200, help="training views per region")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    run = Path(args.run)
    loro.DATA, loro.REFINERS = Path(args.data), [Path(args.refiners)]
    variants = {"old": lambda o, n: o, "new": lambda o, n: n, "geo": lambda o, n: (o * n) ** 0.5}
    curves: dict[str, dict[str, dict]] = {v: {} for v in variants}
    for held in AERIAL:
        others = [r for r in REGIONS if r != held]
        pca = principal_components(torch.cat(
            [loro._load(run, r, "train")["features"][:40] for r in others]), 64)
        # Out of fold: region r's proposals come from the head that never saw r.
        parts = [samples(run, r, r, "train", pca, args.views)[:3] for r in others]
        verifier = train(*(torch.cat(p) for p in zip(*parts, strict=True)))
        x, g, _, old = samples(run, held, held, "eval", pca, None)
        with torch.no_grad():
            p = torch.sigmoid(verifier(x.float(), g)).tolist()
        test = loro._load(run, held, "eval")
        images, refiner = loro.held_out_images(run, held), loro.fold_refiner(held)
        for name, mix in variants.items():
            k, preds = 0, []
            for dets in old:
                scored = [(*d[:4], mix(d[4], p[k + j])) for j, d in enumerate(dets)]
                preds.append([d for d in scored if d[4] >= 0.1])
                k += len(dets)
            preds = refined_predictions(refiner, images, preds)
            curves[name][held] = {t: score_detections(preds, test["boxes"], test["sizes"], t)
                                  for t in THRESHOLDS}
    print("| scores | " + " | ".join(AERIAL) + " | mean |\n|---|" + "---|" * (len(AERIAL) + 1))
    for name in variants:
        f1 = []
        for held in AERIAL:
            t = max(THRESHOLDS[1:], key=lambda t, h=held: np.mean(
                [curves[name][o][t]["f1"] for o in AERIAL if o != h]))
            f1.append(curves[name][held][t]["f1"])
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in f1) + f" | {np.mean(f1):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
