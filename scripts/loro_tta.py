"""Does reading a tile in several orientations help the detector? Overhead imagery has no up:
each leave-one-region-out fold's head reads its held-out tiles as shipped and under the flips
and transposes of the tile (the dihedral group, ``--views 1|2|4|8``), every reading's heatmap
and boxes turned back into the tile's frame and averaged before the peaks are read. Thresholds
are chosen again on the other regions' tiles read the same way (never on the held-out one).

    python scripts/loro_tta.py --run runs/loro --views 1,2,4,8

The oriented features of every region's scoring tiles are cached (``NAME.tta.pt``).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loro import (  # noqa: E402
    _cache_levels,
    _fold_head,
    _load,
    cached_layers,
    eval_tile_size,
    read_levels,
)

from rsvlm.detector import Detection, box_edges, decode_maps  # noqa: E402
from training.detection import (  # noqa: E402
    THRESHOLDS,
    FrozenTower,
    choose_threshold,
    score_detections,
)
from training.labelled import SETS, load_sets, tiles  # noqa: E402


@dataclass(frozen=True)
class Orientation:
    """A flip or transpose of an image (transposed first, then mirrored left-right, then
    upside down); overhead imagery has no up, so each is another view of the same ground."""

    transpose: bool = False
    hflip: bool = False
    vflip: bool = False

    def apply(self, image: np.ndarray) -> np.ndarray:
        """The image ((height, width, ...) array) so oriented."""
        if self.transpose:
            image = image.swapaxes(0, 1)
        if self.hflip:
            image = image[:, ::-1]
        if self.vflip:
            image = image[::-1]
        return image

    def undo(self, prob: torch.Tensor, edges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A reading of the oriented image (heatmap (..., grid, grid) and box edges (batch, 4,
        grid, grid) in patches) turned back into the image's frame."""
        g = edges.shape[-1]
        x1, y1, x2, y2 = edges.unbind(1)
        if self.vflip:
            prob, x1, x2 = prob.flip(-2), x1.flip(-2), x2.flip(-2)
            y1, y2 = g - y2.flip(-2), g - y1.flip(-2)
        if self.hflip:
            prob, y1, y2 = prob.flip(-1), y1.flip(-1), y2.flip(-1)
            x1, x2 = g - x2.flip(-1), g - x1.flip(-1)
        if self.transpose:
            prob = prob.transpose(-1, -2)
            x1, y1, x2, y2 = (v.transpose(-1, -2) for v in (y1, x1, y2, x2))
        return prob, torch.stack([x1, y1, x2, y2], 1)


def orientations(n: int) -> list[Orientation]:
    """The first ``n`` (1, 2, 4 or 8) of the image's orientations, the image itself first."""
    every = [Orientation(t, h, v) for t in (False, True) for v in (False, True)
             for h in (False, True)]
    if n not in (1, 2, 4, 8):
        raise ValueError(f"{n} orientations: 1, 2, 4 or 8")
    return every[:n]


def read_oriented(head: torch.nn.Module, levels: list[torch.Tensor], oriented: list[Orientation],
                  labels: list[str], threshold: float, nms: bool = True) -> list[Detection]:
    """Detections of one image from the head's readings of its orientations (``levels``
    batched in the order of ``oriented``): heatmaps and boxes turned back into the image's
    frame and averaged."""
    heat, box = head(levels)
    probs, edges = zip(*(o.undo(heat[i:i + 1].sigmoid(), box_edges(box[i:i + 1]))
                         for i, o in enumerate(oriented)), strict=True)
    return decode_maps(torch.stack(probs).mean(0), torch.stack(edges).mean(0), labels,
                       threshold, nms=nms)[0]


def oriented_features(run: Path, data: str, name: str, tower: FrozenTower | None
                      ) -> torch.Tensor | None:
    """(tiles, 8, levels, patches, hidden) of a region's scoring tiles at the levels the run's
    folds read (`loro.read_levels`); cached with every level the run's cache holds, as its views
    are (`loro._load`)."""
    path = run / "cache" / f"{name}.tta.pt"
    held = cached_layers(run, name)
    feats = torch.load(path, mmap=True) if path.is_file() else None
    if feats is None or feats.shape[2] != len(held):  # absent, or read before the cache's levels
        items = load_sets(data, [name]).get(name)
        if not items:
            return None
        images = [im for it in items for _, im, _ in tiles(it, eval_tile_size(items[0].gsd))]
        tower = tower or FrozenTower(layers=held)
        feats = torch.stack([tower([np.ascontiguousarray(o.apply(im)) for o in orientations(8)])
                             for im in images])
        torch.save(feats, path)
    levels = read_levels(run)
    if levels is not None and not set(levels) <= set(held):
        raise SystemExit(f"{run}'s cache of {name} holds the levels {held}, not {levels}")
    return feats if levels in (None, held) else feats[:, :, [held.index(v) for v in levels]]


def predictions(head: torch.nn.Module, feats: torch.Tensor, views: int
                ) -> list[list[tuple[float, ...]]]:
    out = []
    for k in range(len(feats)):
        x = feats[k, :views].float()
        with torch.inference_mode():
            dets = read_oriented(head, [x[:, j] for j in range(x.shape[1])],
                                 orientations(views), ["building"], 0.1)
        out.append([(*d.box, d.score) for d in dets])
    return out


def rescored(run: Path, held: str, names: list[str], head: torch.nn.Module,
             feats: dict[str, torch.Tensor], views: int) -> str:
    """The held-out region's table cells (F1, P, R, counts within 20 %, presence, thresholds)
    for ``head`` reading every tile in ``views`` orientations, its thresholds chosen again on
    the other regions' tiles read the same way."""
    sel_p, sel_t, sel_s = [], [], []
    for n in names:
        if n != held:
            d = _load(run, n, "eval")
            sel_p += predictions(head, feats[n], views)
            sel_t += d["boxes"]
            sel_s += d["sizes"]
    threshold = choose_threshold(sel_p, sel_t, sel_s)
    count_threshold = choose_threshold(sel_p, sel_t, sel_s, THRESHOLDS, metric="count")
    test = _load(run, held, "eval")
    preds = predictions(head, feats[held], views)
    r = score_detections(preds, test["boxes"], test["sizes"], threshold)
    c = score_detections(preds, test["boxes"], test["sizes"], count_threshold)
    return (f"{r['f1']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | "
            f"{c['counting']['within_20pct']:.3f} | {c['presence']:.3f} | "
            f"{threshold} / {count_threshold}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/loro", help="a scripts/loro.py --out folder")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--regions", default=",".join(SETS), help="comma list of held-out regions")
    ap.add_argument("--views", default="1,2,4,8", help="orientations read, comma list")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    run = Path(args.run)
    names = [n for n in SETS if (run / "cache" / f"{n}.eval.pt").is_file()]
    tower = None
    feats = {}
    for n in names:
        if not (run / "cache" / f"{n}.tta.pt").is_file():
            tower = tower or FrozenTower(layers=_cache_levels(run))  # one set a cache
        f = oriented_features(run, args.data, n, tower)
        if f is None:
            raise SystemExit(f"{n}: its labelled set is not under {args.data}")
        feats[n] = f
    print("| held-out region | orientations | F1 | P | R | counts within 20 % | presence | "
          "thresholds |\n|---|---|---|---|---|---|---|---|")
    for held in args.regions.split(","):
        head, _ = _fold_head(run, held)
        for views in (int(v) for v in args.views.split(",")):
            print(f"| {held} | {views} | {rescored(run, held, names, head, feats, views)} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
