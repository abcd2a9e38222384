"""Referring questions replayed offline: every detection a chip's read gives (down to the
referring floor) recorded once per question, then the rules that pick one box scored on them.

    python scripts/experiments/refer_replay.py record --data runs/rio_region \
        --model runs/parts_r13/rio --chip-size 200 --limit 300 --out runs/exp/replay/rio.pkl
    python scripts/experiments/refer_replay.py score runs/exp/replay/*.pkl

`record` asks nothing of the language model: the chip's detections are what the chat path's
detector answer is made from (`ChatSession._detections`), so a rule scored here is the answer
the chat path would give with it (the shipped rule reproduces `rsvlm-train eval`'s acc@0.5).
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from training.metrics import box_iou  # noqa: E402  (the IoU `rsvlm-train eval` scores with)


def record(args: argparse.Namespace) -> None:
    from rsvlm.engine import ChatEngine
    from rsvlm.loading import load
    from training.evaluate import _region_items
    from training.region import load_region

    loaded = load(args.model)
    engine = ChatEngine(loaded, max_cached_sessions=1)
    perception = engine.perception
    overrides = {"val_fraction": 0.0, "chip_size": args.chip_size}
    spec = load_region(args.data, **{k: v for k, v in overrides.items() if v is not None})
    _, items = _region_items(spec, "grounding", args.seed, args.limit, False)
    rows, seen = [], {}
    for _, chip, s in items:
        if s.meta["type"] != "refer":
            continue
        key = id(chip)
        if key not in seen:
            session = engine.session(chip)
            seen[key] = session._detections(perception)
        rows.append({"question": s.question, "rule": s.meta["rule"],
                     "truth": tuple(s.meta["boxes_px"][0]), "size": (chip.width, chip.height),
                     "detections": seen[key], "chip": chip if args.keep_chips else None})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "wb") as f:
        pickle.dump({"config": perception.config, "rows": rows, "data": args.data}, f)
    print(f"{len(rows)} referring questions on {len(seen)} chips -> {args.out}")


def shipped(row: dict, config) -> tuple | None:
    """The chat path's own rule (`Perception.select` then `perception_reply`)."""
    from rsvlm.perception import answered_detections, referred_detection

    det = referred_detection(row["question"], "building", answered_detections(
        "building", _selected(row["detections"], config, row["question"]), row["size"]))
    return det.box if det else None


def _selected(detections, config, question):
    from rsvlm.perception import Perception

    return Perception.select(type("P", (), {"config": config})(), detections, "refer", question)


def _area(d) -> float:
    return (d.box[2] - d.box[0]) * (d.box[3] - d.box[1])


def cell_rule(key, size_cut: float = 1.0):
    """A position question: of every detection centred in the named cell (down to the floor),
    the one ``key`` ranks first; a size question: the largest or smallest of those scoring
    ``size_cut`` x the find-all threshold or more; anything else as shipped."""
    from rsvlm.perception import _cell_of, referred

    def rule(row: dict, config) -> tuple | None:
        asked = referred(row["question"], "building")
        dets = [d for d in row["detections"] if d.label == "building"]
        if not asked or not dets:
            return shipped(row, config)
        size, cell = asked
        if size:
            cut = config.cut("building", "find_all") * size_cut
            pool = [d for d in dets if d.score >= cut] or dets
            return (max if size == "largest" else min)(pool, key=_area).box
        if cell:
            pool = [d for d in dets if _cell_of(d) == cell]
            return max(pool, key=key).box if pool else shipped(row, config)
        return shipped(row, config)
    return rule


def best_of(pool_of):
    """An oracle: the detection of the pool with the truth's best IoU (what no rule can beat)."""
    def rule(row: dict, config) -> tuple | None:
        w, h = row["size"]
        pool = pool_of(row, config)
        if not pool:
            return None
        return max(pool, key=lambda d: box_iou([d.box[0] * w, d.box[1] * h, d.box[2] * w,
                                                 d.box[3] * h], row["truth"])).box
    return rule


def _in_cell(row: dict, config) -> list:
    from rsvlm.perception import _cell_of, referred

    asked = referred(row["question"], "building")
    dets = [d for d in row["detections"] if d.label == "building"]
    if asked and asked[1]:
        return [d for d in dets if _cell_of(d) == asked[1]]
    return dets


RULES = {
    "shipped": shipped,
    "score x sqrt(area)": cell_rule(lambda d: d.score * _area(d) ** 0.5),
    "score x area^0.25": cell_rule(lambda d: d.score * _area(d) ** 0.25),
    "size among >= 0.5 x threshold": cell_rule(lambda d: d.score, 0.5),
    "size among >= 2 x threshold": cell_rule(lambda d: d.score, 2.0),
    "oracle: the shipped candidates": best_of(lambda r, c: [
        d for d in _selected(r["detections"], c, r["question"]) if d.label == "building"]),
    "oracle: the cell's detections": best_of(_in_cell),
    "oracle: every detection": best_of(lambda r, c: [d for d in r["detections"]
                                                     if d.label == "building"]),
}


def score(paths: list[str], rules: dict) -> None:
    for path in paths:
        with open(path, "rb") as f:
            rec = pickle.load(f)
        config, rows = rec["config"], rec["rows"]
        print(f"{Path(path).stem}: {len(rows)} referring questions")
        for name, rule in rules.items():
            hits: dict[str, list[int]] = {}
            total = 0
            for row in rows:
                box = rule(row, config)
                w, h = row["size"]
                iou = box_iou([box[0] * w, box[1] * h, box[2] * w, box[3] * h],
                              row["truth"]) if box else 0.0
                ok = iou >= 0.5
                total += ok
                got = hits.setdefault(row["rule"], [0, 0])
                got[0] += ok
                got[1] += 1
            per = ", ".join(f"{k} {a}/{b}" for k, (a, b) in sorted(hits.items()))
            print(f"  {name:32s} {total / len(rows):.3f} ({per})")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("--data", required=True)
    r.add_argument("--model", required=True)
    r.add_argument("--chip-size", type=int)
    r.add_argument("--limit", type=int, default=60)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--keep-chips", action="store_true")
    r.add_argument("--out", required=True)
    s = sub.add_parser("score")
    s.add_argument("paths", nargs="+")
    args = ap.parse_args()
    if args.cmd == "record":
        record(args)
    else:
        score(args.paths, RULES)


if __name__ == "__main__":
    main()
