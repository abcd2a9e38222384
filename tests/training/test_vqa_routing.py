"""Every question `rsvlm-train eval --task vqa` asks about a class the detector answers reaches
the detector: a phrasing the question parser misses falls to the language model, which answered
"1" to "What is the number of buildings?" and "no" to "Is a building present in this image?"."""

import random

import shapely

from rsvlm.perception import object_question
from training.captions import RegionStats
from training.region import ChipContext, ChipObject
from training.vqa import vqa_samples

ROUTED = {"presence": "presence", "counting": "count", "rural_urban": "rural_urban",
          "area": "area"}


def _building(x: float) -> ChipObject:
    return ChipObject(cls="building", plural="buildings", detail="", attributes=[], tags={},
                      kind="area", geom=shapely.box(x, 10, x + 20, 30), box=(x, 10, x + 20, 30),
                      area_m2=100.0, length_m=0.0, visible=1.0)


def test_every_generated_question_about_buildings_reaches_the_detector() -> None:
    stats = RegionStats()
    with_buildings = ChipContext("a", 512, 512, 0.15, [_building(10), _building(60)])
    empty = ChipContext("b", 512, 512, 0.15, [])
    stats.add(with_buildings)
    stats.add(empty)
    asked: dict[str, set[str]] = {}
    for seed in range(200):  # the generator picks one of several phrasings per question
        for ctx in (with_buildings, empty):
            for s in vqa_samples(ctx, stats, random.Random(seed)):
                kind = s.meta["type"]
                if kind in ROUTED and s.meta.get("cls", "building") == "building":
                    asked.setdefault(kind, set()).add(s.question)
    assert set(asked) == set(ROUTED)
    assert len(asked["counting"]) >= 3 and len(asked["presence"]) >= 3
    for kind, questions in asked.items():
        for q in questions:
            assert object_question(q, ["building"]) == (ROUTED[kind], "building"), q


def test_rural_or_urban_is_asked_only_where_buildings_are_mapped() -> None:
    road = ChipObject(cls="road", plural="roads", detail="", attributes=[], tags={}, kind="line",
                      geom=shapely.LineString([(0, 0), (512, 512)]), box=(0, 0, 512, 512),
                      area_m2=0.0, length_m=100.0, visible=1.0)
    roads_only = RegionStats()
    ctx = ChipContext("vegas", 512, 512, 0.3, [road])
    roads_only.add(ctx)
    kinds = {s.meta["type"] for seed in range(20)
             for s in vqa_samples(ctx, roads_only, random.Random(seed))}
    assert "rural_urban" not in kinds and "presence" in kinds
    mapped = RegionStats()
    mapped.add(ChipContext("a", 512, 512, 0.15, [_building(10)]))
    mapped.add(ctx)
    answers = {s.answer for s in vqa_samples(ctx, mapped, random.Random(0))
               if s.meta["type"] == "rural_urban"}
    assert answers == {"rural"}  # a region that maps buildings and has none here


def test_every_referring_and_find_all_question_reaches_the_detector() -> None:
    from training.grounding import _ASK, _ASK_ALL

    exprs = ["the building", "the largest building", "the smallest building",
             "the building in the top left", "the building at the top",
             "the building on the right", "the building in the center"]
    for template in _ASK:
        for expr in exprs:
            q = template.format(expr=expr)
            assert object_question(q, ["building"]) == ("refer", "building"), q
    for template in _ASK_ALL:
        q = template.format(plural="buildings", cls="building")
        assert object_question(q, ["building"]) == ("find_all", "building"), q
