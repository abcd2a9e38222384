"""The model card's examples from leave-one-region-out: per held-out region, the fold's detector
(which never saw that region) on its best and worst tiles, with its real answers.

For each fold of `scripts/loro.py --out RUN`: the held-out region's tiles are scored one by one
(find-all F1 at IoU 0.5), and the best and the worst tile with objects are written out: the
detections (red) against the labelled boxes (green), and what the chat path answers from those
detections to "Are there any buildings?", "How many buildings are there?", "Is it a rural or an
urban area?" and "Find all buildings". Images are written only for the OpenAerialMap demo areas
(CC BY 4.0, redistributable); the other sets' licences keep their pixels out of the repo, so
their examples are text.

    python scripts/loro_examples.py --run runs/loro --out assets/models/embedded/examples/loro \\
        --card assets/models/embedded/MODEL_CARD.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loro import _fold_head as fold_head  # noqa: E402
from loro import _load, write_card  # noqa: E402

from rsvlm.detector import Detection  # noqa: E402
from rsvlm.perception import detector_refiner, perception_answer  # noqa: E402
from training.detection import predict  # noqa: E402
from training.labelled import DEMO_AREAS, load_sets, tiles  # noqa: E402
from training.metrics import match_boxes  # noqa: E402
from training.refine import refined_predictions  # noqa: E402

START, END = "<!-- loro-examples:start -->", "<!-- loro-examples:end -->"
ATTRIBUTION = ("Imagery © OpenAerialMap contributors (CC BY 4.0), buildings © OpenStreetMap "
               "contributors (ODbL).")


def tile_f1(pred: list, truth: np.ndarray) -> float:
    tp = match_boxes(pred, list(truth))
    return 2 * tp / max(len(pred) + len(truth), 1)


def draw(image: np.ndarray, truth: np.ndarray, pred: list, path: Path, side: int = 384) -> None:
    from PIL import Image, ImageDraw

    im = Image.fromarray(image).convert("RGB")
    k = side / max(im.size)
    im = im.resize((round(im.width * k), round(im.height * k)), Image.BICUBIC)
    pen = ImageDraw.Draw(im)
    for b in truth:
        pen.rectangle([v * k for v in b], outline=(40, 230, 60), width=2)
    for b in pred:
        pen.rectangle([v * k for v in b], outline=(240, 40, 40), width=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, quality=80)


def region_examples(run: Path, held: str, items: list, out: Path, rel: str) -> list[str]:
    head, config = fold_head(run, held)
    meta = torch.load(run / "cache" / f"{held}.pt", weights_only=False)
    data = _load(run, held, "eval")  # the levels the run's folds read (`loro.py --levels`)
    gsd = meta.get("gsd", items[0].gsd)
    size = 512 if gsd < 0.3 else 450  # scripts/loro.py's eval tiles
    views = [(n, im, b) for it in items for n, im, b in tiles(it, size)]
    if [v[0] for v in views] != data["names"]:
        raise SystemExit(f"{held}: the cached tiles are not the tiles of the data found")
    preds = predict(head, data["features"], min(config.threshold, config.count_threshold
                                                or config.threshold))
    refiner = detector_refiner(run / "folds" / held, config)
    if refiner is not None:  # boxes as the chat path gives them (`Perception.refined`)
        preds = refined_predictions(refiner, [v[1] for v in views], preds)
    rows = []
    for (name, image, truth), pred in zip(views, preds, strict=True):
        h, w = image.shape[:2]
        dets = [Detection("building", d[4], tuple(d[:4])) for d in pred]
        boxes = [np.array(d.box) * [w, h, w, h] for d in dets if d.score >= config.threshold]
        rows.append((tile_f1(boxes, truth) if len(truth) else -1.0, name, image, truth,
                     boxes, dets))
    scored = sorted((r for r in rows if r[0] >= 0), key=lambda r: -r[0])
    if not scored:
        return []
    picks = [("best", scored[0])] + ([("worst", scored[-1])] if len(scored) > 1 else [])
    lines = [f"### {held} (fold trained on {', '.join(config.notes.get('trained_on', []))})", ""]
    for kind, (f1, name, image, truth, boxes, dets) in picks:
        h, w = image.shape[:2]
        ground = w * h * gsd * gsd
        count_dets = [d for d in dets if d.score >= (config.count_threshold or config.threshold)]
        box_dets = [d for d in dets if d.score >= config.threshold]

        def said(kind_: str, pool: list, size: tuple = (w, h), ground: float = ground) -> str:
            return perception_answer(kind_, "building", pool, size, None, ground)

        lines.append(f"**{kind} tile** `{name}` ({w} x {h} px at {gsd} m; {len(truth)} labelled "
                     f"buildings): find-all F1 {f1:.2f} at IoU 0.5")
        lines.append("")
        if held in DEMO_AREAS:
            file = f"{held}_{kind}.jpg"
            draw(image, truth, boxes, out / file)
            lines += [f"![{held} {kind}]({rel}/{file})", ""]
        lines += [
            f"- Are there any buildings? -> **{said('presence', count_dets)}** "
            f"(truth: {'yes' if len(truth) else 'no'})",
            f"- How many buildings are there? -> **{said('count', count_dets)}** "
            f"(truth: {len(truth)})",
            f"- Is it a rural or an urban area? -> **{said('rural_urban', count_dets)}**",
            f"- Find all buildings in the image. -> {len(box_dets)} boxes, "
            f"{match_boxes(boxes, list(truth))} of them on a labelled building at IoU 0.5",
            "",
        ]
    return lines


def class_examples(run: Path) -> list[str]:
    """Text examples for the held-out sets of other classes (`scripts/loro.py` class folds):
    per set, its best and worst tile under the fold's head that never saw it, at the
    thresholds the other held-out sets of its class favour. No pixels: NEON's and Airbus's
    imagery stays out of the repo."""
    import json

    from loro import held_out_thresholds

    from rsvlm.perception import load_detector, plural

    reports = [json.loads(p.read_text()) for p in sorted((run / "class_folds").glob("*.json"))]
    lines = []
    for r in reports:
        name, label = r["held_out"], r["class"]
        head, config = load_detector(run / "class_folds" / r["fold"])
        t, ct = held_out_thresholds(r, reports)
        cache = _load(run, name, "eval")
        preds = predict(head, cache["features"], min(t, ct), cls=config.labels.index(label))
        rows = []
        for tile, truth, (w, h), pred in zip(cache["names"], cache["boxes"], cache["sizes"],
                                            preds, strict=True):
            if not len(truth):
                continue
            scale = np.array([w, h, w, h])
            boxes = [np.array(d[:4]) * scale for d in pred if d[4] >= t]
            rows.append((tile_f1(boxes, truth.numpy() * scale), tile, truth, boxes, pred, (w, h)))
        rows.sort(key=lambda x: -x[0])
        picks = [("best", rows[0])] + ([("worst", rows[-1])] if len(rows) > 1 else [])
        lines += [f"### {name} ({plural(label)}; fold trained on {', '.join(r['trained_on'])})",
                  ""]
        for kind, (f1, tile, truth, boxes, pred, size) in picks:
            counted = [Detection(label, d[4], tuple(d[:4])) for d in pred if d[4] >= ct]
            scale = np.array([*size, *size])
            lines += [f"**{kind} tile** `{tile}` ({size[0]} x {size[1]} px; {len(truth)} labelled "
                      f"{plural(label)}): find-all F1 {f1:.2f} at IoU 0.5", "",
                      f"- How many {plural(label)} are there? -> "
                      f"**{perception_answer('count', label, counted, size)}** (truth: "
                      f"{len(truth)})",
                      f"- Find all {plural(label)} in the image. -> {len(boxes)} boxes, "
                      f"{match_boxes(boxes, list(truth.numpy() * scale))} of them on a labelled "
                      f"one at IoU 0.5", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/loro")
    ap.add_argument("--data", default="/work/shared/data")
    ap.add_argument("--out", default="assets/models/embedded/examples/loro")
    ap.add_argument("--card", default=None, help="write the section into this MODEL_CARD.md")
    args = ap.parse_args(argv)
    run, out = Path(args.run), Path(args.out)
    helds = sorted(p.stem for p in (run / "folds").glob("*.json"))
    if not helds:
        raise SystemExit(f"no folds in {run}/folds: run scripts/loro.py first")
    sets = load_sets(args.data, helds)
    rel = Path(args.out).relative_to(Path(args.card).parent) if args.card else out
    lines = [START, "## Examples from leave-one-region-out (regions the detector never saw)", "",
             "Each held-out region's best and worst tile (find-all F1) under its fold's detector, "
             "and the answers the chat path gives from those detections "
             "(`scripts/loro_examples.py`). Green: labelled buildings; red: the boxes answered "
             "to \"Find all buildings\". Only the OpenAerialMap areas are pictured; SpaceNet's "
             "pixels stay out of the repo. " + ATTRIBUTION, ""]
    for held in helds:
        if held in sets:
            lines += region_examples(run, held, sets[held], out, str(rel))
    if (run / "class_folds").is_dir():
        lines += class_examples(run)
    lines.append(END)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.card:
        card = Path(args.card)
        # scripts/model_card.py puts this file back when it re-renders the card.
        (card.parent / "eval").mkdir(exist_ok=True)
        (card.parent / "eval" / "loro_examples.md").write_text(text)
        write_card(card, text, START, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
