"""Heads on the patch grid and heads on the grid twice as fine, read as one: the coarse heads'
heatmaps and box edges resampled to the fine grid and averaged with the fine heads'.

    python scripts/experiments/mixed_grids.py --coarse runs/loro_p2 --fine runs/loro_up2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rsvlm.detector import box_edges, edges_to_box  # noqa: E402


class MixedGrids(nn.Module):
    def __init__(self, coarse: nn.Module, fine: nn.Module, weight: float = 0.5) -> None:
        super().__init__()
        self.coarse, self.fine, self.weight = coarse, fine, weight

    def forward(self, levels):
        hc, bc = self.coarse(levels)
        hf, bf = self.fine(levels)
        g = hf.shape[-1]
        r = g / hc.shape[-1]
        pc = F.interpolate(hc.sigmoid(), size=(g, g), mode="bilinear", align_corners=False)
        ec = F.interpolate(box_edges(bc) * r, size=(g, g), mode="bilinear", align_corners=False)
        w = self.weight
        prob = (w * pc + (1 - w) * hf.sigmoid()).clamp(1e-6, 1 - 1e-6)
        edges = w * ec + (1 - w) * box_edges(bf)
        return torch.logit(prob), edges_to_box(edges)


def main() -> None:
    import loro
    from feature_tta import held_out_scores

    ap = argparse.ArgumentParser()
    ap.add_argument("--coarse", default="runs/loro_p2")
    ap.add_argument("--fine", default="runs/loro_up2")
    ap.add_argument("--regions", default="banepa_np,catanduanes_ph,kampala_ug,zanzibar_tz")
    ap.add_argument("--weights", default="0,0.5,1")
    args = ap.parse_args()
    regions = args.regions.split(",")
    weights = [float(w) for w in args.weights.split(",")]
    result = {}
    for held in regions:
        coarse = loro._fold_head(Path(args.coarse), held)[0].eval()
        fine = loro._fold_head(Path(args.fine), held)[0].eval()
        for w in weights:
            r = held_out_scores(Path(args.fine), held, regions, MixedGrids(coarse, fine, w).eval())
            s, c = r["boxes"], r["counts"]
            result[(held, w)] = (s["f1"], c["counting"]["within_20pct"])
            print(f"{held:15s} coarse weight {w:.2f}: threshold {r['threshold']:.2f} "
                  f"F1 {s['f1']:.3f} P {s['precision']:.3f} R {s['recall']:.3f} | count "
                  f"threshold {r['count_threshold']:.2f} within20 "
                  f"{c['counting']['within_20pct']:.3f}", flush=True)
    for w in weights:
        f = [result[(r, w)][0] for r in regions]
        c = [result[(r, w)][1] for r in regions]
        print(f"coarse weight {w:.2f}: mean F1 {sum(f) / len(f):.3f}  "
              f"mean within20 {sum(c) / len(c):.3f}")


if __name__ == "__main__":
    main()
