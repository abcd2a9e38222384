"""Leave-one-region-out runs compared on more than the held-out tiles.

An OAM area's scoring tiles are few (2 in Catanduanes, 4 in Banepa, 6 in Kampala, 32 in
Zanzibar), so two recipes' folds differ there by a handful of roofs. The area's augmented
training views are held out of its fold as well: 300 views of its imagery, cut, turned,
recoloured, blurred and compressed. No fold that scores the area trained on them. Here each
run's fold heads read both, at the find-all and counting thresholds the other OAM areas'
tiles favour (`feature_tta.held_out_scores`).

    python scripts/experiments/views_scores.py --runs runs/loro_up2,runs/loro_up4,runs/loro_p4
    python scripts/experiments/views_scores.py --runs runs/loro_up2 --count-curves
    python scripts/experiments/views_scores.py --runs runs/loro_up2 --read-sizes 392,504

``--count-curves``: the share of tiles and of views counted within 20 % at each threshold,
per area (each read by the fold that never saw it). ``--read-sizes``: the tiles and views
read by the tower at other sizes than the cache's 448 px (cut again from the cache's seeds,
`pixel_stem.cut_again`), find-all F1 at the same thresholds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.detection import predict, score_detections  # noqa: E402

OAM = ["banepa_np", "catanduanes_ph", "kampala_ug", "zanzibar_tz"]


CURVE = [0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45]


def _reads(run: Path, area: str, head: object, parts: list[str]) -> tuple[list, list, list]:
    import loro

    preds, boxes, sizes = [], [], []
    with torch.inference_mode():
        for part in parts:
            d = loro._load(run, area, part)
            preds += predict(head, d["features"], 0.1)
            boxes += d["boxes"]
            sizes += d["sizes"]
    return preds, boxes, sizes


def count_curves(run: Path) -> None:
    import loro

    print("| held-out area | read | objects a read | " + " | ".join(map(str, CURVE)) + " |")
    print("|---|---|---|" + "---|" * len(CURVE))
    for area in OAM:
        head = loro._fold_head(run, area)[0].eval()
        for label, parts in (("tiles", ["eval"]), ("views", loro._train_parts(run, area, 3))):
            preds, boxes, sizes = _reads(run, area, head, parts)
            within = [score_detections(preds, boxes, sizes, t)["counting"]["within_20pct"]
                      for t in CURVE]
            print(f"| {area} | {label} | {sum(len(b) for b in boxes) / len(boxes):.1f} | "
                  + " | ".join(f"{v:.2f}" for v in within) + " |", flush=True)


def read_sizes(run: Path, sizes: list[int]) -> None:
    import loro
    from feature_tta import held_out_scores
    from pixel_stem import cut_again

    from training.detection import FrozenTower

    # the levels the folds' heads read (one set a run: `loro.py --levels`)
    layers = loro._fold_head(run, OAM[0])[1].layers
    towers = {size: FrozenTower(size=size, layers=layers) for size in sizes}
    print("| held-out area | read | 448 px (cached) | " + " | ".join(f"{s} px" for s in sizes)
          + " |")
    print("|---|---|---|" + "---|" * len(sizes))
    for area in OAM:
        head = loro._fold_head(run, area)[0].eval()
        thr = held_out_scores(run, area, OAM, head)["threshold"]
        for label, parts in (("tiles", ["eval"]), ("views", loro._train_parts(run, area, 3))):
            preds, boxes, sizes_px = _reads(run, area, head, parts)
            row = [score_detections(preds, boxes, sizes_px, thr)["f1"]]
            images = [v.image for part in parts for v in cut_again(run, area, part)]
            for tower in towers.values():
                with torch.inference_mode():
                    feats = torch.cat([tower(images[i:i + 8]) for i in range(0, len(images), 8)])
                    row.append(score_detections(predict(head, feats, 0.1), boxes, sizes_px,
                                                thr)["f1"])
            print(f"| {area} | {label} | " + " | ".join(f"{v:.3f}" for v in row) + " |",
                  flush=True)


def main() -> None:
    import loro
    from feature_tta import held_out_scores

    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="runs/loro_up2,runs/loro_up4,runs/loro_p4,runs/loro_p2")
    ap.add_argument("--count-curves", action="store_true")
    ap.add_argument("--read-sizes", default=None, help="e.g. 392,504")
    ap.add_argument("--areas", default=",".join(OAM),
                    help="the held-out areas to score (runs whose folds are not all done)")
    args = ap.parse_args()
    if args.count_curves:
        count_curves(Path(args.runs.split(",")[0]))
        return
    if args.read_sizes:
        read_sizes(Path(args.runs.split(",")[0]), [int(s) for s in args.read_sizes.split(",")])
        return
    areas = args.areas.split(",")
    print("| run | " + " | ".join(areas) + " | mean F1 | counts within 20 % |")
    print("|---|" + "---|" * (len(areas) + 2))
    for run in map(Path, args.runs.split(",")):
        tiles, views, tile_counts, view_counts = [], [], [], []
        for area in areas:
            head = loro._fold_head(run, area)[0].eval()
            got = held_out_scores(run, area, OAM, head)
            tiles.append(got["boxes"]["f1"])
            tile_counts.append(got["counts"]["counting"]["within_20pct"])
            preds, boxes, sizes = _reads(run, area, head, loro._train_parts(run, area, 3))
            views.append(score_detections(preds, boxes, sizes, got["threshold"])["f1"])
            view_counts.append(score_detections(preds, boxes, sizes, got["count_threshold"])[
                "counting"]["within_20pct"])
        for label, f1, counts in (("tiles", tiles, tile_counts), ("views", views, view_counts)):
            print(f"| {run.name}, {label} | " + " | ".join(f"{v:.3f}" for v in f1)
                  + f" | **{sum(f1) / len(f1):.3f}** | {sum(counts) / len(counts):.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
