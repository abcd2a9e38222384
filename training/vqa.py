"""RSVQA-style questions from the OSM objects of a chip, with balanced answers.

Question types follow RSVQA (Lobry et al. 2020): presence, counting, comparison, area and
rural/urban. Presence questions ask as many absent classes (taken from the region's vocabulary)
as present ones; `balance_answers` then evens out the yes/no and rural/urban answers over the
whole dataset, because a per-chip balance still leaves e.g. "is there a building?" mostly "yes".
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable

from rsvlm.perception import area_bucket  # the chat path answers in the same classes
from rsvlm.prompting import ONE_WORD
from training.captions import RegionStats, scene_kind
from training.osm import plural_of
from training.region import ChipContext
from training.samples import Sample, rng_for

SHORT = ONE_WORD  # the chat path asks a yes/no or either/or question's words the same way
YES_NO_TYPES = {"presence", "comparison"}


def _countable(ctx: ChipContext) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for o in ctx.objects:
        if o.kind != "line":
            counts[o.cls] += 1
    return dict(counts)


def _q(qtype: str, question: str, answer: str, **meta: object) -> Sample:
    return Sample("vqa", f"{question} {SHORT}", answer, {"type": qtype, **meta})


def vqa_samples(ctx: ChipContext, stats: RegionStats, rng: random.Random,
                per_type: int = 2) -> list[Sample]:
    out: list[Sample] = []
    present = ctx.classes
    absent = [c for c in stats.vocabulary if c not in present]

    # presence: as many absent as present classes, so answers start out balanced.
    asked = rng.sample(present, min(per_type, len(present)))
    asked_absent = rng.sample(absent, min(max(len(asked), 1), len(absent)))
    for cls in asked + asked_absent:
        q = rng.choice([f"Is there a {cls} in the image?", f"Are there any {plural_of(cls)}?",
                        f"Is a {cls} present in this image?"])
        out.append(_q("presence", q, "yes" if cls in present else "no", cls=cls))

    counts = _countable(ctx)
    countable_vocab = [c for c in stats.vocabulary if c in counts or c not in present]
    # counting: classes present, plus sometimes an absent one (answer 0).
    for cls in rng.sample(sorted(counts), min(per_type, len(counts))):
        q = rng.choice([f"How many {plural_of(cls)} are there?",
                        f"How many {plural_of(cls)} are in the image?",
                        f"What is the number of {plural_of(cls)}?"])
        out.append(_q("counting", q, str(counts[cls]), cls=cls))
    if absent and rng.random() < 0.3:
        cls = rng.choice(absent)
        out.append(_q("counting", f"How many {plural_of(cls)} are there?", "0", cls=cls))

    # comparison between two countable classes (an absent one counts 0).
    pool = sorted(set(countable_vocab))
    for _ in range(min(per_type, len(pool) * (len(pool) - 1) // 2)):
        a, b = rng.sample(pool, 2)
        na, nb = counts.get(a, 0), counts.get(b, 0)
        form = rng.choice(["more", "fewer", "equal"])
        if form == "more":
            q, ans = f"Are there more {plural_of(a)} than {plural_of(b)}?", na > nb
        elif form == "fewer":
            q, ans = f"Are there fewer {plural_of(a)} than {plural_of(b)}?", na < nb
        else:
            q = f"Is the number of {plural_of(a)} equal to the number of {plural_of(b)}?"
            ans = na == nb
        out.append(_q("comparison", q, "yes" if ans else "no", classes=[a, b]))

    # area covered by a class of areas (buildings, parking lots, ...).
    area_cls = sorted({o.cls for o in ctx.objects if o.kind == "area"})
    for cls in rng.sample(area_cls, min(1, len(area_cls))):
        total = sum(o.area_m2 for o in ctx.of_class(cls))
        q = rng.choice([f"What is the area covered by {plural_of(cls)}?",
                        f"What area do the {plural_of(cls)} cover?"])
        out.append(_q("area", q, area_bucket(total), cls=cls, area_m2=round(total, 1)))

    # Rural or urban rests on the building footprints: a region that maps none (SpaceNet-3
    # Las Vegas labels roads only) would call its shopping centres rural.
    if "building" in stats.vocabulary:
        q = rng.choice(["Is it a rural or an urban area?", "Is this an urban or a rural area?"])
        out.append(_q("rural_urban", q, scene_kind(ctx)))
    return out


def balance_answers(samples: Iterable[tuple[str, Sample]], seed: int) -> list[tuple[str, Sample]]:
    """Drop the surplus of the majority answer per (split, type) for binary question types.

    Input and output are (key, sample) pairs; the order of kept items is preserved. Which items
    are dropped depends only on the seed and the keys.
    """
    items = list(samples)
    groups: dict[tuple[str, str], dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, (_key, s) in enumerate(items):
        qtype = s.meta.get("type")
        if s.task == "vqa" and (qtype in YES_NO_TYPES or qtype == "rural_urban"):
            groups[(s.meta.get("split", ""), qtype)][s.answer].append(i)
    drop: set[int] = set()
    for (split, qtype), by_answer in sorted(groups.items()):
        if len(by_answer) < 2:
            continue  # one answer only (e.g. an all-urban region): nothing to balance against
        target = min(len(v) for v in by_answer.values())
        for answer, idx in sorted(by_answer.items()):
            if len(idx) > target:
                keep = set(rng_for(seed, "balance", split, qtype, answer).sample(idx, target))
                drop.update(i for i in idx if i not in keep)
    return [item for i, item in enumerate(items) if i not in drop]
