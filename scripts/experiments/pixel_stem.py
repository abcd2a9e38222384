"""Leave-one-region-out: does the detector place boxes better when it also sees the pixels?

The dense detector reads the frozen tower's patch tokens (14 px of a 448 px read) and draws
its maps twice as fine (7 px a cell). Many of its boxes sit on a roof with their edges off: on
the shipped recipe's folds (`runs/loro_up2`), the four OAM areas' mean find-all F1 is 0.535 at
IoU 0.5, 0.611 at 0.3 and 0.648 at 0.1 (`scripts/experiments/misses.py`). A patch token says
little about where, inside its 14 px, a roof's edge runs.
Here the head gains a small stem on the pixels themselves: a 7 x 7 stride-7 convolution (one
vector per cell of the finer maps) and a 3 x 3 convolution, concatenated with the upsampled
tower features before the layer that reads them at the finer grid. It is trained with the
head, on the same augmented views, cut again from the cache's seeds (`--check`: the tower on
a cut-again view gives the cached features, cosine 1.0000).

For each held-out OAM area, one head (seed 0) is trained as the `runs/loro_up2` fold's was
(the same sets, views, PCA, dropout, epochs) with the stem, and compared with that fold's
seed-0 head (`members/FOLD/seed0.safetensors`). Both are scored the same way: find-all F1 on
the area's tiles at the threshold the other building regions' tiles favour, and at that
threshold on the area's 300 augmented views, which no fold trained on either.

    python scripts/experiments/pixel_stem.py --run runs/loro_up2 --out runs/exp/pixel_stem
    python scripts/experiments/pixel_stem.py --check   # the cut-again pixels are the cache's

Tried, not adopted (issue 18, round 15). Find-all F1, seed-0 head against seed-0 head with the
stem: tiles Banepa 0.479 / 0.487, Catanduanes 0.535 / 0.550, Kampala 0.453 / 0.426, Zanzibar
0.617 / 0.546 (mean 0.521 / 0.502); held-out augmented views 0.387 / 0.340, 0.551 / 0.552,
0.375 / 0.331, 0.569 / 0.530 (mean 0.471 / 0.438). A head trains 1.5-1.8 times as long. The
stem learns the training regions' roofs as pixels, and that does not carry to a new region's
colours, blur and compression; the tower's features do.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rsvlm.detector import DenseDetector, box_edges, edges_to_box  # noqa: E402
from training.detection import (  # noqa: E402
    View,
    choose_threshold,
    decode,
    detection_loss,
    detection_targets,
    principal_components,
    reduce_features,
    score_detections,
)

log = logging.getLogger("pixel_stem")
OAM = ["banepa_np", "catanduanes_ph", "kampala_ug", "zanzibar_tz"]
SIZE = 448
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class PixelDetector(DenseDetector):
    """`DenseDetector` whose finer maps also read the pixels: per cell of the finer grid (7 px
    of a 448 px read), a vector of that cell's pixels and its neighbours', concatenated with
    the upsampled tower features before the 3 x 3 convolution that reads them there."""

    def __init__(self, hidden: int, levels: int, classes: int = 1, dim: int = 64,
                 convs: int = 3, upsample: int = 2, width: int = 24, cell: int = 7) -> None:
        super().__init__(hidden, levels, classes=classes, dim=dim, convs=convs,
                         upsample=upsample)
        self.stem = nn.Sequential(nn.Conv2d(3, width, cell, stride=cell), nn.GELU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(4, width),
                                  nn.GELU())
        self.up = nn.Upsample(scale_factor=upsample, mode="bilinear", align_corners=False)
        self.fuse = nn.Sequential(nn.Conv2d(dim + width, dim, 3, padding=1),
                                  nn.GroupNorm(8, dim), nn.GELU())

    def forward(self, levels: list[torch.Tensor], pixels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat(levels, dim=-1)
        b, n, _ = x.shape
        grid = int(round(n ** 0.5))
        x = self.proj(x).transpose(1, 2).reshape(b, -1, grid, grid)
        x = self.up(self.body(x))
        x = self.fuse(torch.cat([x, self.stem(pixels)], 1))
        return self.heat(x), self.box(x)


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels.float() / 255.0 - MEAN) / STD


def read_pixels(views: list[View]) -> torch.Tensor:
    from PIL import Image

    return torch.from_numpy(np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(
        v.image)).resize((SIZE, SIZE), Image.BICUBIC)) for v in views])).permute(0, 3, 1, 2)


def cut_again(run: Path, name: str, part: str) -> list[View]:
    """``name``'s cached views of ``part`` cut again (`loro.cut_again`), their boxes checked
    against the cache's as well."""
    import loro

    views = loro.cut_again(run, name, part)
    cached = loro._load(run, name, part)
    if not all(torch.allclose(torch.from_numpy(v.boxes.reshape(-1, 4) / np.array(
            [v.image.shape[1], v.image.shape[0]] * 2, np.float32)), b.reshape(-1, 4), atol=1e-4)
               for v, b in zip(views, cached["boxes"], strict=True)):
        raise SystemExit(f"{name}.{part}: the views cut again are not the cached ones")
    return views


def cached_pixels(run: Path, store: Path, name: str, part: str) -> torch.Tensor:
    """The pixels of ``name``'s cached views of ``part`` as the tower read them (uint8, 448
    px), `cut_again`."""
    path = store / f"{name}.{part}.pt"
    if path.is_file():
        return torch.load(path)
    views = cut_again(run, name, part)
    pixels = read_pixels(views)
    store.mkdir(parents=True, exist_ok=True)
    torch.save(pixels, path)
    log.info("pixels of %s.%s: %d views", name, part, len(views))
    return pixels


def check_features(run: Path, store: Path, name: str, part: str, tower: Any) -> float:
    """Cosine between ``tower`` (a `training.detection.FrozenTower`) on the first cut-again
    view and the cache's features of it, every level."""
    import loro

    image = cached_pixels(run, store, name, part)[0].permute(1, 2, 0).numpy()
    got = tower([image])[0].float()
    want = loro._load(run, name, part)["features"][0].float()
    return float(nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0))


def stack(run: Path, store: Path, names: list[str], classes: list[str]) -> tuple:
    import loro

    from training.labelled import known_classes, set_class

    feats, pixels, boxes, view_classes, known = [], [], [], [], []
    for n in names:
        own = classes.index(set_class(n))
        row = [c in known_classes(n) for c in classes]
        for part in loro._stack_parts(run, n, 3):
            d = loro._load(run, n, part)
            feats.append(d["features"])
            pixels.append(cached_pixels(run, store, n, part))
            boxes += d["boxes"]
            view_classes += [own] * len(d["boxes"])
            known += [row] * len(d["boxes"])
    return (torch.cat(feats), torch.cat(pixels), boxes, view_classes,
            torch.tensor(known, dtype=torch.bool))


def train(features: torch.Tensor, pixels: torch.Tensor, boxes: list, view_classes: list[int],
          known: torch.Tensor, classes: int, *, seed: int, epochs: int = 8, lr: float = 2e-3,
          batch_size: int = 16, input_dropout: float = 0.3, width: int = 24
          ) -> tuple[PixelDetector, tuple]:
    torch.manual_seed(seed)
    pca = principal_components(features, 128, seed=seed)
    x_all = reduce_features(features, *pca)
    head = PixelDetector(128, 1, classes=classes, width=width)
    n = len(x_all)
    grid = 32 * head.upsample
    steps = epochs * math.ceil(n / batch_size)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    t0, step = time.perf_counter(), 0
    head.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).tolist()
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            x = nn.functional.dropout(x_all[idx].float(), input_dropout)
            heat, box = head([x[:, 0]], normalise(pixels[idx]))
            tb = [boxes[j] for j in idx]
            th, tt, tm = detection_targets(tb, [torch.full((len(b),), view_classes[j],
                                                           dtype=torch.long)
                                                for b, j in zip(tb, idx, strict=True)],
                                           grid, classes)
            loss = detection_loss(heat, box, th, tt, tm, known[idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if step % 100 == 0:
                log.info("step %d/%d loss %.3f (%.0f s)", step, steps, loss.item(),
                         time.perf_counter() - t0)
    return head.eval(), pca


@torch.inference_mode()
def predict_maps(head, features: torch.Tensor, pixels: torch.Tensor | None, pca: tuple | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-0 probabilities and box edges of every view."""
    probs, edges = [], []
    for i in range(0, len(features), 32):
        x = features[i:i + 32]
        if pca is not None:
            x = reduce_features(x, *pca)
        x = x.float()
        levels = [x[:, j] for j in range(x.shape[1])]
        heat, box = (head(levels, normalise(pixels[i:i + 32])) if pixels is not None
                     else head(levels))
        probs.append(heat[:, :1].sigmoid())
        edges.append(box_edges(box))
    return torch.cat(probs), torch.cat(edges)


def to_preds(prob: torch.Tensor, edges: torch.Tensor) -> list:
    heat = torch.logit(prob.clamp(1e-6, 1 - 1e-6))
    return [[(*d.box, d.score) for d in dets]
            for dets in decode(heat, edges_to_box(edges), ["object"], 0.1)]


def scores(maps: dict[str, tuple], truths: dict[str, tuple], held: str) -> dict:
    """``held``'s tiles at the find-all / counting thresholds the other regions' tiles favour."""
    sel_p, sel_t, sel_s = [], [], []
    for name, m in maps.items():
        if name != held:
            sel_p += to_preds(*m)
            sel_t += truths[name][0]
            sel_s += truths[name][1]
    thr = choose_threshold(sel_p, sel_t, sel_s)
    cthr = choose_threshold(sel_p, sel_t, sel_s, metric="count")
    preds = to_preds(*maps[held])
    return {"threshold": thr, "boxes": score_detections(preds, *truths[held], thr),
            "counts": score_detections(preds, *truths[held], cthr)["counting"]}


def main() -> None:
    import loro
    from safetensors.torch import load_file

    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/loro_up2")
    ap.add_argument("--out", default="runs/exp/pixel_stem")
    ap.add_argument("--pixels", default=None, help="pixel store (default: RUN/cache/pixels448)")
    ap.add_argument("--folds", default=",".join(OAM))
    ap.add_argument("--width", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="only check the cut-again pixels")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    run, out = Path(args.run), Path(args.out)
    store = Path(args.pixels) if args.pixels else run / "cache" / "pixels448"
    if args.check:
        from training.detection import FrozenTower

        tower = FrozenTower()
        for name in OAM + ["rio"]:
            log.info("%s: cosine to the cache %.4f", name,
                     check_features(run, store, name, "train1", tower))
        return
    out.mkdir(parents=True, exist_ok=True)
    bsets = OAM + ["rio", "atlanta"]
    truths = {n: (loro._load(run, n, "eval")["boxes"], loro._load(run, n, "eval")["sizes"])
              for n in bsets}
    results = json.loads((out / "results.json").read_text()) if (
        out / "results.json").is_file() else {}
    for held in args.folds.split(","):
        key = f"{held}:w{args.width}:s{args.seed}"
        if key in results:
            continue
        report = json.loads((run / "folds" / f"{held}.json").read_text())
        others = report["trained_on"]
        classes = report["classes"]
        member = next((run / "members").glob(f"{held}*")) / f"seed{args.seed}.safetensors"
        base = DenseDetector(384, 3, classes=len(classes), dim=report["dim"],
                             convs=report["convs"], upsample=report["upsample"])
        base.load_state_dict(load_file(str(member)))
        base.eval()
        feats, pixels, boxes, view_classes, known = stack(run, store, others, classes)
        log.info("%s: %d views", held, len(feats))
        t0 = time.perf_counter()
        head, pca = train(feats, pixels, boxes, view_classes, known, len(classes),
                          seed=args.seed, width=args.width)
        train_s = time.perf_counter() - t0
        del feats, pixels
        row = {"train_s": round(train_s)}
        for label, model, with_pixels, p in (("base", base, False, None),
                                             ("pixels", head, True, pca)):
            maps = {}
            for n in bsets:
                d = loro._load(run, n, "eval")
                px = cached_pixels(run, store, n, "eval") if with_pixels else None
                maps[n] = predict_maps(model, d["features"], px, p)
            row[label] = scores(maps, truths, held)
            b = row[label]["boxes"]
            log.info("%s %s: F1 %.3f P %.3f R %.3f at %.2f, counts within 20%% %.3f", held,
                     label, b["f1"], b["precision"], b["recall"], row[label]["threshold"],
                     row[label]["counts"]["within_20pct"])
        # The held-out area's own augmented views: no fold trained on them, and a few hundred
        # of them say more than its 2-32 tiles (harder: colour, blur and JPEG changes).
        parts = loro._train_parts(run, held, 3)
        v_feats = torch.cat([loro._load(run, held, p)["features"] for p in parts])
        v_px = torch.cat([cached_pixels(run, store, held, p) for p in parts])
        v_truth = ([b for p in parts for b in loro._load(run, held, p)["boxes"]],
                   [s for p in parts for s in loro._load(run, held, p)["sizes"]])
        for label, model, with_pixels, p in (("base", base, False, None),
                                             ("pixels", head, True, pca)):
            preds = to_preds(*predict_maps(model, v_feats, v_px if with_pixels else None, p))
            got = score_detections(preds, *v_truth, row[label]["threshold"])
            row[label]["views"] = {"f1": got["f1"], "precision": got["precision"],
                                   "recall": got["recall"], "n": got["n"]}
            log.info("%s %s, its %d augmented views: F1 %.3f", held, label, got["n"], got["f1"])
        torch.save({"state": head.state_dict(), "pca": pca, "width": args.width},
                   out / f"{key.replace(':', '_')}.pt")
        results[key] = row
        (out / "results.json").write_text(json.dumps(results, indent=2))
    for key, row in results.items():
        print(key, " | ".join(f"{k} F1 {row[k]['boxes']['f1']:.3f} counts "
                              f"{row[k]['counts']['within_20pct']:.3f} views F1 "
                              f"{row[k].get('views', {}).get('f1', float('nan')):.3f}"
                              for k in ("base", "pixels")))


if __name__ == "__main__":
    main()
