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

    from training.detection import choose_threshold, predict, score_detections

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
            model = MixedGrids(coarse, fine, w).eval()
            with torch.inference_mode():
                sel_p, sel_t, sel_s = [], [], []
                for other in regions:
                    if other == held:
                        continue
                    d = loro._load(Path(args.fine), other, "eval")
                    sel_p += predict(model, d["features"], 0.1)
                    sel_t += d["boxes"]
                    sel_s += d["sizes"]
                thr = choose_threshold(sel_p, sel_t, sel_s)
                cthr = choose_threshold(sel_p, sel_t, sel_s, metric="count")
                test = loro._load(Path(args.fine), held, "eval")
                preds = predict(model, test["features"], 0.1)
            s = score_detections(preds, test["boxes"], test["sizes"], thr)
            c = score_detections(preds, test["boxes"], test["sizes"], cthr)
            result[(held, w)] = (s["f1"], c["counting"]["within_20pct"])
            print(f"{held:15s} coarse weight {w:.2f}: threshold {thr:.2f} F1 {s['f1']:.3f} "
                  f"P {s['precision']:.3f} R {s['recall']:.3f} | count threshold {cthr:.2f} "
                  f"within20 {c['counting']['within_20pct']:.3f}", flush=True)
    for w in weights:
        f = [result[(r, w)][0] for r in regions]
        c = [result[(r, w)][1] for r in regions]
        print(f"coarse weight {w:.2f}: mean F1 {sum(f) / len(f):.3f}  "
              f"mean within20 {sum(c) / len(c):.3f}")


if __name__ == "__main__":
    main()
