"""Grounding and region samples: referring expressions from OSM objects -> boxes.

Every expression must pick out exactly one object, so each rule checks uniqueness with a margin:
size rank ("the largest building": 20% larger than the runner-up), position ("the building in the
top left": the only one of its class in that cell), relation ("the building closest to the
parking lot": clearly nearer than the next), or the only instance of a class. "Find all X" asks
for every instance, capped so answers stay short. Region samples give a box as input.
"""

from __future__ import annotations

import random

from training.osm import article, plural_of
from training.region import ChipContext, ChipObject
from training.samples import (
    Sample,
    area_phrase,
    format_box,
    position_name,
    position_phrase,
    with_region,
)

_ASK = ("Where is {expr}?", "Locate {expr}.", "Give the bounding box of {expr}.",
        "Find {expr} in the image.", "Output the bounding box of {expr}.")
_ASK_ALL = ("Find all {plural} in the image.", "Locate every {cls} in this image.",
            "Detect all {plural} and give their bounding boxes.")


def _eligible(ctx: ChipContext, min_side: float = 4.0, min_visible: float = 0.6) -> list[ChipObject]:
    return [o for o in ctx.objects if o.kind in {"area", "point"} and o.visible >= min_visible
            and o.box[2] - o.box[0] >= min_side and o.box[3] - o.box[1] >= min_side]


def referring_expressions(ctx: ChipContext) -> list[tuple[str, str, ChipObject]]:
    """(rule, expression, object) for every unambiguous expression in the chip."""
    objs = _eligible(ctx)
    out: list[tuple[str, str, ChipObject]] = []
    by_cls: dict[str, list[ChipObject]] = {}
    for o in objs:
        by_cls.setdefault(o.cls, []).append(o)
    for cls, group in sorted(by_cls.items()):
        # Every object of the class in the chip, visible enough or not: uniqueness is about
        # what a reader of the image could confuse it with.
        all_of_cls = [o for o in ctx.objects if o.cls == cls]
        if len(all_of_cls) == 1:
            out.append(("unique", f"the {cls}", group[0]))
            continue
        if group[0].kind == "area" and len(group) == len(all_of_cls):
            ranked = sorted(group, key=lambda o: -o.area_m2)
            if ranked[0].area_m2 >= 1.2 * ranked[1].area_m2:
                out.append(("size", f"the largest {cls}", ranked[0]))
            if ranked[-2].area_m2 >= 1.2 * ranked[-1].area_m2:
                out.append(("size", f"the smallest {cls}", ranked[-1]))
        cells: dict[str, list[ChipObject]] = {}
        for o in all_of_cls:
            cells.setdefault(position_name(*o.center, ctx.width, ctx.height), []).append(o)
        for name, members in sorted(cells.items()):
            if len(members) == 1 and members[0] in group:
                out.append(("position", f"the {cls} {position_phrase(name)}", members[0]))
    # Relations to a unique anchor of another class.
    for anchor_cls, anchors in sorted(by_cls.items()):
        if len([o for o in ctx.objects if o.cls == anchor_cls]) != 1:
            continue
        anchor = anchors[0]
        for cls, group in sorted(by_cls.items()):
            if cls == anchor_cls or len(group) < 2:
                continue
            dists = sorted(((o.geom.distance(anchor.geom), i) for i, o in enumerate(group)))
            (d0, i0), (d1, _) = dists[0], dists[1]
            if d1 > 0 and d0 <= 0.6 * d1:
                out.append(("relation", f"the {cls} closest to the {anchor_cls}", group[i0]))
    return out


def grounding_samples(ctx: ChipContext, rng: random.Random, max_refs: int = 4,
                      max_boxes: int = 12) -> list[Sample]:
    out: list[Sample] = []
    refs = referring_expressions(ctx)
    for rule, expr, obj in rng.sample(refs, min(max_refs, len(refs))):
        q = rng.choice(_ASK).format(expr=expr)
        out.append(Sample("grounding", q, format_box(obj.cls, obj.box, ctx.width, ctx.height),
                          {"type": "refer", "rule": rule, "expression": expr, "cls": obj.cls,
                           "boxes_px": [_round(obj.box)]}))
    by_cls: dict[str, list[ChipObject]] = {}
    for o in ctx.objects:
        if o.kind in {"area", "point"}:
            by_cls.setdefault(o.cls, []).append(o)
    for cls, group in sorted(by_cls.items()):
        if not 1 <= len(group) <= max_boxes:
            continue
        group = sorted(group, key=lambda o: (o.box[1], o.box[0]))
        answer = "".join(format_box(cls, o.box, ctx.width, ctx.height) for o in group)
        q = rng.choice(_ASK_ALL).format(plural=plural_of(cls), cls=cls)
        out.append(Sample("grounding", q, answer, {"type": "find_all", "cls": cls,
                                                   "boxes_px": [_round(o.box) for o in group]}))
    return out


def _round(box: tuple[float, float, float, float]) -> list[float]:
    return [round(v, 2) for v in box]


def region_samples(ctx: ChipContext, rng: random.Random, max_items: int = 2) -> list[Sample]:
    """Questions about a box given as input: what is in it, how many X are inside."""
    out: list[Sample] = []
    objs = _eligible(ctx)
    for o in rng.sample(objs, min(max_items, len(objs))):
        words = " ".join([*o.attributes[:2], o.detail])
        size = f" of {area_phrase(o.area_m2)}" if o.kind == "area" else ""
        q = rng.choice(["What is this object?", "What is in this region?",
                        "Describe the object in this region."])
        out.append(Sample("region", with_region(q, o.box, ctx.width, ctx.height),
                          f"{article(words)[0].upper()}{article(words)[1:]} {words}{size}.",
                          {"type": "describe", "cls": o.cls, "box_px": _round(o.box)}))
    counts = sorted({o.cls for o in ctx.objects if o.kind != "line"})
    if counts:
        cls = rng.choice(counts)
        w, h = ctx.width, ctx.height
        bw, bh = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
        x1, y1 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        box = (x1, y1, x1 + bw, y1 + bh)
        n = sum(1 for o in ctx.of_class(cls)
                if box[0] <= o.center[0] <= box[2] and box[1] <= o.center[1] <= box[3])
        q = with_region(f"How many {plural_of(cls)} are there?", box, w, h)
        out.append(Sample("region", q, str(n), {"type": "count", "cls": cls,
                                                "box_px": _round(box)}))
    return out
