"""Presence of buildings on a city no model here trained on: Dubai (MBRSC satellite RGB, ~0.5-2 m,
no georeference), asked through the chat path as an analyst's plain JPEG is asked.

Its masks are block-level (several buildings merged), so only presence is scored: a chip of
`--chip` px is "yes" where building pixels cover at least `--min-share` of it in a blob of at
least `--min-blob` px, "no" where it has none and no unlabelled pixel either (the labellers left
many sheds, jetties and building sites unlabelled), and left out in between or where more than
5 % is unlabelled. `--rescore` scores a saved report's answers again under these rules. Reads ``../shared/data/labelled_more/dubai_hitl_semseg`` (says so when absent).

    python scripts/experiments/dubai_presence.py [--model PARTS] [--out runs/exp/dubai.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from training.metrics import yes_no

BUILDING = (60, 16, 152)
UNLABELLED = (155, 155, 155)


def chips(root: Path, size: int):
    for img_path in sorted(root.glob("Tile */images/*.jpg")):
        mask_path = img_path.parent.parent / "masks" / (img_path.stem + ".png")
        image = Image.open(img_path).convert("RGB")
        mask = np.asarray(Image.open(mask_path).convert("RGB"))
        w, h = image.size
        for y in range(0, max(h - size // 2, 1), size):
            for x in range(0, max(w - size // 2, 1), size):
                box = (x, y, min(x + size, w), min(y + size, h))
                yield (f"{img_path.parent.parent.name}/{img_path.stem}@{x},{y}",
                       image.crop(box), mask[box[1]:box[3], box[0]:box[2]])


def truth(mask: np.ndarray, min_share: float, min_blob: int) -> bool | None:
    from scipy import ndimage

    unlabelled = np.all(mask == UNLABELLED, axis=-1)
    if unlabelled.mean() > 0.05:
        return None
    building = np.all(mask == BUILDING, axis=-1)
    if not building.any():
        return None if unlabelled.any() else False
    labels, n = ndimage.label(building)
    biggest = np.bincount(labels.ravel())[1:].max() if n else 0
    return True if building.mean() >= min_share and biggest >= min_blob else None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--model", default=None)
    ap.add_argument("--chip", type=int, default=512)
    ap.add_argument("--min-share", type=float, default=0.01)
    ap.add_argument("--min-blob", type=int, default=150)
    ap.add_argument("--out", default="runs/exp/dubai_presence.json")
    ap.add_argument("--rescore", default=None, help="a saved report: its answers, scored again")
    args = ap.parse_args()
    root = Path(args.data) / "labelled_more" / "dubai_hitl_semseg"
    if not root.is_dir():
        print(f"{root} is absent: no Dubai presence measure", file=sys.stderr)
        return 1
    saved = {}
    if args.rescore:
        saved = {r["chip"]: r for r in json.loads(Path(args.rescore).read_text())["rows"]}
    else:
        from rsvlm.engine import ChatEngine
        from rsvlm.loading import load

        engine = ChatEngine(load(args.model), max_cached_sessions=1)
    rows = []
    for name, image, mask in chips(root, args.chip):
        true = truth(mask, args.min_share, args.min_blob)
        if true is None or (args.rescore and name not in saved):
            continue
        if args.rescore:
            rows.append({**saved[name], "truth": true})
            continue
        session = engine.session(image)
        for _ in session.ask("Is there a building in the image?"):
            pass
        text = session.last.text
        said = yes_no(text) == "yes"
        n = sum(d.label == "building" for d in session.detections or [])
        rows.append({"chip": name, "truth": true, "said": said, "answer": text,
                     "detections": n})
        print(json.dumps(rows[-1]), flush=True)
    pos = [r for r in rows if r["truth"]]
    neg = [r for r in rows if not r["truth"]]
    report = {
        "chips": len(rows), "with_buildings": len(pos), "without": len(neg),
        "presence": sum(r["truth"] == r["said"] for r in rows) / max(len(rows), 1),
        "recall_yes": sum(r["said"] for r in pos) / max(len(pos), 1),
        "specificity_no": sum(not r["said"] for r in neg) / max(len(neg), 1),
        "model": args.model or "shipped", "chip_px": args.chip, "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print({k: v for k, v in report.items() if k != "rows"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
