"""Every referring question of a region through the chat path, drawn: the truth (green), the
answered box (red) and every detection (yellow, its score). For looking at why referring fails on
a region, not a benchmark (`rsvlm-train eval --task grounding` is the measure).

    python scripts/experiments/refer_diag.py --data REGION --model PARTS --out DIR [--chip-size N]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import ImageDraw

from rsvlm.engine import ChatEngine
from rsvlm.loading import load
from training.evaluate import _pred_boxes, _region_items
from training.metrics import box_iou
from training.region import load_region


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--chip-size", type=int, default=None)
    ap.add_argument("--limit", type=int, default=60)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = {"val_fraction": 0.0}
    if args.chip_size:
        overrides["chip_size"] = args.chip_size
    spec = load_region(args.data, **overrides)
    _, items = _region_items(spec, "grounding", 0, args.limit, False)
    engine = ChatEngine(load(args.model), max_cached_sessions=1)
    rows = []
    for i, (_, chip, s) in enumerate(items):
        if s.meta["type"] != "refer":
            continue
        session = engine.session(chip)
        for _ in session.ask(s.question, max_new_tokens=64):
            pass
        text = session.last.text
        dets = session.detections or []
        w, h = chip.width, chip.height
        boxes = _pred_boxes(text, w, h)
        truth = tuple(s.meta["boxes_px"][0])
        iou = box_iou(boxes[0], truth) if boxes else 0.0
        im = session.image.copy()
        draw = ImageDraw.Draw(im)
        for d in dets:
            b = [d.box[0] * w, d.box[1] * h, d.box[2] * w, d.box[3] * h]
            draw.rectangle(b, outline=(255, 255, 0))
            draw.text((b[0], b[1]), f"{d.score:.2f}", fill=(255, 255, 0))
        draw.rectangle(truth, outline=(0, 255, 0), width=2)
        if boxes:
            draw.rectangle(boxes[0], outline=(255, 0, 0), width=2)
        im.save(out / f"{i:03d}.png")
        rows.append({"i": i, "question": s.question, "rule": s.meta["rule"], "truth": truth,
                     "answer": text, "iou": round(iou, 3),
                     "true_area_px": round((truth[2] - truth[0]) * (truth[3] - truth[1])),
                     "dets": len(dets)})
        print(json.dumps(rows[-1]))
    (out / "rows.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
