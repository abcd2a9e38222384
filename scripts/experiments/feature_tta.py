"""Test-time augmentation in feature space: the detector's heads read the tower's patch grid
mirrored and turned (the tower runs once), their maps turned back and averaged.

    python scripts/experiments/feature_tta.py --run runs/loro_up2 --views 1,2,4,8
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rsvlm.detector import box_edges, edges_to_box  # noqa: E402

# (transpose, hflip, vflip) of the 8 dihedral views, identity first; 2 = the mirror.
VIEWS = [(False, False, False), (False, True, False), (False, False, True), (False, True, True),
         (True, False, False), (True, True, False), (True, False, True), (True, True, True)]


def _grid(x: torch.Tensor, t: bool, h: bool, v: bool) -> torch.Tensor:
    if t:
        x = x.transpose(-1, -2)
    if h:
        x = x.flip(-1)
    if v:
        x = x.flip(-2)
    return x


def _edges_back(e: torch.Tensor, t: bool, h: bool, v: bool) -> torch.Tensor:
    g = e.shape[-1]
    x1, y1, x2, y2 = e.unbind(1)
    if v:
        y1, y2 = (g - y2).flip(-2), (g - y1).flip(-2)
        x1, x2 = x1.flip(-2), x2.flip(-2)
    if h:
        x1, x2 = (g - x2).flip(-1), (g - x1).flip(-1)
        y1, y2 = y1.flip(-1), y2.flip(-1)
    if t:
        x1, y1, x2, y2 = (y1.transpose(-1, -2), x1.transpose(-1, -2), y2.transpose(-1, -2),
                          x2.transpose(-1, -2))
    return torch.stack([x1, y1, x2, y2], 1)


class FeatureTTA(nn.Module):
    def __init__(self, head: nn.Module, views: int) -> None:
        super().__init__()
        self.head, self.views = head, VIEWS[:views]

    def forward(self, levels: list[torch.Tensor]):
        b, n, c = levels[0].shape
        g = int(round(n ** 0.5))
        probs, edges = [], []
        for t, h, v in self.views:
            moved = [_grid(x.transpose(1, 2).reshape(b, c, g, g), t, h, v).reshape(b, c, n)
                     .transpose(1, 2) for x in levels]
            heat, box = self.head(moved)
            # the maps back: inverse of (t, h, v) is v, h, t in reverse
            p = heat.sigmoid()
            if v:
                p = p.flip(-2)
            if h:
                p = p.flip(-1)
            if t:
                p = p.transpose(-1, -2)
            probs.append(p)
            edges.append(_edges_back(box_edges(box), t, h, v))
        prob = torch.stack(probs).mean(0).clamp(1e-6, 1 - 1e-6)
        return torch.logit(prob), edges_to_box(torch.stack(edges).mean(0))


def held_out_scores(out: Path, held: str, regions: list[str], model: nn.Module) -> dict:
    """``model`` (heads read as one) on ``held``'s cached tiles, at the find-all and counting
    thresholds the other ``regions``' tiles favour read the same way: {"threshold",
    "count_threshold", "boxes": find-all scores, "counts": scores at the counting one}."""
    import loro

    from training.detection import choose_threshold, predict, score_detections

    with torch.inference_mode():
        sel_p, sel_t, sel_s = [], [], []
        for other in regions:
            if other != held:
                d = loro._load(out, other, "eval")
                sel_p += predict(model, d["features"], 0.1)
                sel_t += d["boxes"]
                sel_s += d["sizes"]
        thr = choose_threshold(sel_p, sel_t, sel_s)
        cthr = choose_threshold(sel_p, sel_t, sel_s, metric="count")
        test = loro._load(out, held, "eval")
        preds = predict(model, test["features"], 0.1)
    return {"threshold": thr, "count_threshold": cthr,
            "boxes": score_detections(preds, test["boxes"], test["sizes"], thr),
            "counts": score_detections(preds, test["boxes"], test["sizes"], cthr)}


def main() -> None:
    import loro

    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/loro_up2")
    ap.add_argument("--regions", default="banepa_np,catanduanes_ph,kampala_ug,zanzibar_tz")
    ap.add_argument("--views", default="1,2,8")
    args = ap.parse_args()
    out = Path(args.run)
    regions = args.regions.split(",")
    result = {}
    for held in regions:
        head = loro._fold_head(out, held)[0].eval()
        for k in map(int, args.views.split(",")):
            r = held_out_scores(out, held, regions, FeatureTTA(head, k).eval())
            s = r["boxes"]
            result[(held, k)] = s["f1"]
            print(f"{held:15s} views {k}: threshold {r['threshold']:.2f} F1 {s['f1']:.3f} "
                  f"P {s['precision']:.3f} R {s['recall']:.3f} "
                  f"within20 {s['counting']['within_20pct']:.3f}", flush=True)
    for k in map(int, args.views.split(",")):
        vals = [result[(r, k)] for r in regions]
        print(f"views {k}: mean F1 {sum(vals) / len(vals):.3f}")
    print(json.dumps({f"{r}:{k}": v for (r, k), v in result.items()}))


if __name__ == "__main__":
    main()
