"""LHRS-Align style captions and semantic-database descriptions from the OSM objects of a chip.

LHRS-Align builds captions from pruned OSM attributes and balances the semantics so that the
frequent classes (buildings, roads) do not drown the rare ones. Here:

- attribute pruning happens in `training.osm` (only visual tags reach a caption);
- semantic balancing: rare classes are mentioned first, and chips holding rare classes get more
  caption variants (`caption_repeats`), while a chip of only common classes gets one;
- variety: every sentence comes from one of several templates, chosen per chip by a seeded RNG;
- an optional `rewrite(caption, facts) -> str` hook lets a local LLM paraphrase (LHRS-Bot used
  Vicuna); its output is kept only when it is a non-empty string.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from rsvlm.perception import DENSE_COVERAGE, built_phrase, urban_or_rural
from training.osm import article, number_word, plural_of
from training.region import ChipContext, ChipObject
from training.samples import (
    Sample,
    area_phrase,
    length_phrase,
    position_name,
    position_phrase,
    size_word,
)

Rewriter = Callable[[str, dict], str]

CAPTION_PROMPTS = (
    "Describe this remote sensing image.",
    "Write a short caption for this aerial image.",
    "What does this image show? Describe it in a few sentences.",
    "Give a brief description of the scene in this satellite image.",
    "Describe the main objects and land use in this image.",
)
_OPENINGS = (
    "An aerial image of {scene}.",
    "This overhead image shows {scene}.",
    "A high-resolution remote sensing image of {scene}.",
    "The image shows {scene} seen from above.",
)


@dataclass
class RegionStats:
    """How often each class occurs over the region's chips (for balancing and absent classes)."""

    chip_counts: dict[str, int] = field(default_factory=dict)
    n_chips: int = 0

    def add(self, ctx: ChipContext) -> None:
        self.n_chips += 1
        for cls in ctx.classes:
            self.chip_counts[cls] = self.chip_counts.get(cls, 0) + 1

    @property
    def vocabulary(self) -> list[str]:
        return sorted(self.chip_counts)


def caption_repeats(ctx: ChipContext, stats: RegionStats, max_repeats: int = 3) -> int:
    """Number of caption variants for a chip: more for chips with rare classes."""
    if not ctx.objects or not stats.chip_counts:
        return 1
    common = max(stats.chip_counts.values())
    rarest = min(stats.chip_counts.get(c, 1) for c in ctx.classes)
    return int(min(max_repeats, 1 + math.floor(math.log2(max(common / rarest, 1.0)) / 2)))


def scene_kind(ctx: ChipContext) -> str:
    """'urban' or 'rural' from building coverage and density (RSVQA's rural/urban question)."""
    buildings = ctx.of_class("building")
    chip_m2 = ctx.width * ctx.height * ctx.gsd**2
    coverage = sum(o.area_m2 for o in buildings) / max(chip_m2, 1e-9)
    per_ha = len(buildings) / max(chip_m2 / 10000, 1e-9)
    return urban_or_rural(coverage, per_ha)  # the detector answers by the same rule


def scene_phrase(ctx: ChipContext) -> str:
    chip_m2 = ctx.width * ctx.height * ctx.gsd**2
    areas = [o for o in ctx.objects if o.kind == "area" and o.cls != "building"]
    dominant = max(areas, key=lambda o: o.area_m2, default=None)
    buildings = ctx.of_class("building")
    coverage = sum(o.area_m2 for o in buildings) / max(chip_m2, 1e-9)
    if dominant is not None and dominant.area_m2 > 0.4 * chip_m2:
        return f"{article(dominant.detail)} {dominant.detail}"
    if not buildings and not ctx.objects:
        return "an open area without buildings"
    return built_phrase(len(buildings), coverage >= DENSE_COVERAGE, scene_kind(ctx) == "urban")


def _spread(objs: list[ChipObject], ctx: ChipContext) -> str | None:
    """Where most objects of a class sit, if they are concentrated."""
    cells: dict[str, int] = {}
    for o in objs:
        name = position_name(*o.center, ctx.width, ctx.height)
        cells[name] = cells.get(name, 0) + 1
    name, n = max(sorted(cells.items()), key=lambda kv: kv[1])
    if len(objs) >= 3 and n / len(objs) >= 0.5 and name != "center":
        return position_phrase(name)
    if len(objs) >= 6 and len(cells) >= 6:
        return "spread across the image"
    return None


def _class_sentence(cls_objs: list[ChipObject], ctx: ChipContext, rng: random.Random) -> str:
    first = cls_objs[0]
    n = len(cls_objs)
    if first.kind == "line":
        detail_counts: dict[str, int] = {}
        for o in cls_objs:
            label = " ".join([*o.attributes[:1], o.detail])
            detail_counts[label] = detail_counts.get(label, 0) + 1
        parts = [f"{article(d)} {d}" if c == 1 else f"{number_word(c)} {plural_of(d)}"
                 for d, c in sorted(detail_counts.items())]
        where = position_phrase(position_name(*first.center, ctx.width, ctx.height))
        total = sum(o.length_m for o in cls_objs)
        verb = rng.choice(["runs", "passes", "can be seen"]) if n == 1 else "cross the image"
        if n == 1:
            return f"{_cap(parts[0])} {verb} {where}, {length_phrase(total)} of it visible."
        return f"{_cap(_join(parts))} {verb}, {length_phrase(total)} in total."
    if n == 1:
        o = first
        words = " ".join([*o.attributes[:2], o.detail])
        where = position_phrase(position_name(*o.center, ctx.width, ctx.height))
        size = f" covering {area_phrase(o.area_m2)}" if o.kind == "area" else ""
        return rng.choice([
            f"There is {article(words)} {words} {where}{size}.",
            f"{_cap(article(words))} {words}{size} is visible {where}.",
        ])
    sizes = [size_word(o.area_m2) for o in cls_objs if o.kind == "area"]
    size_text = ""
    if sizes:
        common = max(sorted(set(sizes)), key=sizes.count)
        size_text = f", mostly {common}" if sizes.count(common) / len(sizes) >= 0.6 else \
            ", of varied sizes"
    where = _spread(cls_objs, ctx)
    where_text = f" {where}" if where else ""
    count = number_word(n)
    plural = first.plural
    sentence = rng.choice([
        f"There are {count} {plural}{where_text}{size_text}.",
        f"{_cap(count)} {plural} can be seen{where_text}{size_text}.",
        f"The image contains {count} {plural}{where_text}{size_text}.",
    ])
    if first.kind == "area" and n >= 2:
        largest = max(cls_objs, key=lambda o: o.area_m2)
        pos = position_phrase(position_name(*largest.center, ctx.width, ctx.height))
        sentence += f" The largest one, {pos}, covers {area_phrase(largest.area_m2)}."
    return sentence


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _ordered_classes(ctx: ChipContext, stats: RegionStats) -> list[str]:
    # Rare classes first (semantic balancing): the model sees them where captions are short.
    return sorted(ctx.classes, key=lambda c: (stats.chip_counts.get(c, 0), c))


def make_caption(ctx: ChipContext, stats: RegionStats, rng: random.Random,
                 max_classes: int = 5) -> str:
    sentences = [rng.choice(_OPENINGS).format(scene=scene_phrase(ctx))]
    for cls in _ordered_classes(ctx, stats)[:max_classes]:
        sentences.append(_class_sentence(ctx.of_class(cls), ctx, rng))
    if not ctx.objects:
        sentences.append(rng.choice([
            "No mapped objects are visible.", "OpenStreetMap records no features here.",
        ]))
    return " ".join(sentences)


def caption_samples(ctx: ChipContext, stats: RegionStats, rng: random.Random,
                    rewrite: Rewriter | None = None, max_repeats: int = 3) -> list[Sample]:
    out = []
    for k in range(caption_repeats(ctx, stats, max_repeats)):
        text = make_caption(ctx, stats, rng)
        meta = {"variant": k, "classes": ctx.classes, "rewritten": False}
        if rewrite is not None:
            new = rewrite(text, {"classes": ctx.classes, "chip_id": ctx.chip_id})
            if isinstance(new, str) and new.strip():
                text, meta["rewritten"] = new.strip(), True
        out.append(Sample("caption", rng.choice(CAPTION_PROMPTS), text, meta))
    return out


def object_description(o: ChipObject, ctx: ChipContext) -> str:
    words = " ".join([*o.attributes[:2], o.detail])
    where = position_phrase(position_name(*o.center, ctx.width, ctx.height))
    if o.kind == "area":
        size = f" of {area_phrase(o.area_m2)}"
    elif o.kind == "line":
        size = f", {length_phrase(o.length_m)} long"
    else:
        size = ""
    extra = [f"{k.split(':')[-1]} {v.replace('_', ' ')}" for k, v in sorted(o.tags.items())
             if k in {"surface", "building:levels", "roof:material", "lanes", "sport", "crop"}]
    tail = f" ({', '.join(extra)})" if extra else ""
    return f"{_cap(article(words))} {words}{size} {where} of the image{tail}."


def descriptions(ctx: ChipContext, stats: RegionStats, rng: random.Random,
                 max_objects: int = 8) -> list[dict]:
    """Scene- and object-level texts for the semantic database (seed 003's multi-level texts)."""
    rows = [{"text": make_caption(ctx, stats, rng), "level": "scene", "chip_id": ctx.chip_id,
             "classes": ctx.classes, "scene": scene_kind(ctx)}]
    objs = sorted(ctx.objects, key=lambda o: -(o.area_m2 or o.length_m))[:max_objects]
    for o in objs:
        rows.append({"text": object_description(o, ctx), "level": "object",
                     "chip_id": ctx.chip_id, "class": o.cls, "osm_id": o.osm_id})
    return rows
