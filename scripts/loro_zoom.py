"""Does reading a tile zoomed in help the detector? Each leave-one-region-out fold's head on its
held-out tiles read whole (as shipped), on four overlapping crops of the tile, each read at
``--input-size`` (the chat path's `DetectorConfig.zoom_input_size`), and on both merged
(`rsvlm.detector.suppress`); find-all F1 at the fold's threshold, counts within 20 % and presence
at its counting threshold.

    python scripts/loro_zoom.py --run runs/loro --regions rio,atlanta,kampala_ug
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loro import _fold_head, _load, eval_tile_size  # noqa: E402

from rsvlm.detector import Detection, decode, suppress  # noqa: E402
from rsvlm.perception import DetectorConfig, crop_frames, detector_refiner, from_crop  # noqa: E402
from rsvlm.refine import refine_detections  # noqa: E402
from training.detection import INPUT_SIZE, FrozenTower, score_detections  # noqa: E402
from training.labelled import load_sets, tiles  # noqa: E402


def zoomed(head: torch.nn.Module, tower: FrozenTower, image, crop: float) -> list[Detection]:
    """Detections of the crops (`rsvlm.perception.crop_frames`), in 0-1 of the whole tile (not
    yet suppressed)."""
    h, w = image.shape[:2]
    frames = crop_frames(crop)
    crops = [image[int(oy * h):int((oy + crop) * h), int(ox * w):int((ox + crop) * w)]
             for ox, oy in frames]
    f = tower(crops).float()
    with torch.inference_mode():
        heat, box = head([f[:, j] for j in range(f.shape[1])])
    out = []
    # The building heatmap (the first class) of a detector of several classes.
    found = decode(heat[:, :1], box, ["building"], 0.1, nms=False)
    for dets, frame in zip(found, frames, strict=True):
        out += from_crop(dets, frame, crop)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/loro", help="a scripts/loro.py --out folder")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--regions", required=True, help="comma list of held-out regions")
    ap.add_argument("--crop", type=float, default=0.6, help="crop side, a fraction of the tile")
    ap.add_argument("--input-size", type=int,
                    default=DetectorConfig().zoom_input_size or INPUT_SIZE,
                    help="the tower's input for each crop (default: the chat path's)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    run = Path(args.run)
    tower = None
    print("| held-out region | read | F1 | P | R | counts within 20 % | presence |\n"
          "|---|---|---|---|---|---|---|")
    for held in args.regions.split(","):
        head, config = _fold_head(run, held)
        # the levels the folds' heads read (one set a run: `loro.py --levels`)
        tower = tower or FrozenTower(size=args.input_size, layers=config.layers)
        # The fold's box refiner, when `loro.py --refiners` gave it one: read as the chat
        # path reads (`rsvlm.perception.Perception.refined`).
        refiner = detector_refiner(run / "folds" / held, config)
        test = _load(run, held, "eval")
        items = load_sets(args.data, [held]).get(held)
        if not items:
            raise SystemExit(f"{held}: its labelled set is not under {args.data}")
        images = [im for it in items for _, im, _ in tiles(it, eval_tile_size(items[0].gsd))]
        if len(images) != len(test["boxes"]):
            raise SystemExit(f"{held}: {len(images)} tiles, the cache holds {len(test['boxes'])}")
        reads: dict[str, list] = {"whole": [], f"{args.crop:g} crops": [], "both": []}
        for k, image in enumerate(images):
            x = test["features"][k:k + 1].float()
            with torch.inference_mode():
                heat, box = head([x[:, j] for j in range(x.shape[1])])
            whole = decode(heat[:, :1], box, ["building"], 0.1, nms=False)[0]
            crops = zoomed(head, tower, image, args.crop)
            for name, dets in zip(reads, (whole, crops, whole + crops), strict=True):
                kept = suppress(dets)
                if refiner is not None:
                    kept = refine_detections(refiner, image, kept)
                reads[name].append([(*d.box, d.score) for d in kept])
        for name, preds in reads.items():
            r = score_detections(preds, test["boxes"], test["sizes"], config.threshold)
            c = score_detections(preds, test["boxes"], test["sizes"],
                                 config.count_threshold or config.threshold)
            print(f"| {held} | {name} | {r['f1']:.3f} | {r['precision']:.3f} | "
                  f"{r['recall']:.3f} | {c['counting']['within_20pct']:.3f} | "
                  f"{c['presence']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
