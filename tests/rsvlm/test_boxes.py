"""The box grammar: canonical round trips, peer formats, robustness on arbitrary text, IoU."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rsvlm.boxes import (
    CANONICAL,
    GEOCHAT,
    LHRS_BOT,
    PLAIN_1000,
    QWEN25_JSON,
    QWEN_VL,
    ParsedBox,
    box_iou,
    format_box,
    format_region_box,
    obb_iou,
    parse_boxes,
    strip_boxes,
)

coord = st.integers(min_value=0, max_value=1000)


@st.composite
def canonical_boxes(draw: st.DrawFn) -> tuple[int, int, int, int]:
    x1, x2 = sorted(draw(st.lists(coord, min_size=2, max_size=2, unique=True)))
    y1, y2 = sorted(draw(st.lists(coord, min_size=2, max_size=2, unique=True)))
    return x1, y1, x2, y2


labels = st.one_of(
    st.none(),
    st.text(min_size=1, max_size=40).filter(
        lambda s: " ".join(s.replace("<", "").replace(">", "").split())
    ),
)

# Text made of the grammar's own pieces reaches the parser's corner cases far more often than
# uniformly random characters.
fragments = st.sampled_from(
    [
        "<ref>", "</ref>", "<box>", "</box>", "[", "]", "(", ")", ",", "{", "}", "<", ">", "|",
        "<|box_start|>", "<|box_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
        '"bbox_2d": ', '"label": "x"', "0.5", "1000", "-3", "1e9", "99999999999999", "nan", " ",
        "building", "\n", ".", "+", "-",
    ]
)  # fmt: skip
grammar_soup = st.lists(st.one_of(fragments, st.integers(-50, 2000).map(str)), max_size=60).map(
    "".join
)


# ---------------------------------------------------------------------------------------- fuzz
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=st.one_of(st.text(max_size=300), grammar_soup),
    size=st.none() | st.tuples(st.integers(-5, 4000), st.integers(-5, 4000)),
)
def test_parse_never_raises_and_boxes_are_valid(text: str, size: tuple[int, int] | None) -> None:
    boxes = parse_boxes(text, image_size=size)
    for box in boxes:
        x1, y1, x2, y2 = box.box_norm
        assert 0 <= x1 < x2 <= 1000 and 0 <= y1 < y2 <= 1000
        assert all(math.isfinite(v) for v in box.box_norm)
        assert box.angle is None or -180 < box.angle <= 180
        assert 0 <= box.span[0] < box.span[1] <= len(text)
    spans = [b.span for b in boxes]
    assert spans == sorted(spans)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), "overlapping matches"


def test_parse_accepts_non_strings() -> None:
    assert parse_boxes(None) == []  # type: ignore[arg-type]
    assert parse_boxes(b"<box>[1,2,3,4]</box>") == []  # type: ignore[arg-type]


def test_pathological_input_is_fast() -> None:
    import time

    text = "<ref>" * 20000 + "<box>[" * 20000 + "{<1>" * 20000
    start = time.perf_counter()
    assert parse_boxes(text) == []
    assert time.perf_counter() - start < 5


# ---------------------------------------------------------------------------------- round trip
@settings(max_examples=200, deadline=None)
@given(box=canonical_boxes(), label=labels, angle=st.none() | st.integers(-179, 180))
def test_format_parse_round_trip(
    box: tuple[int, ...], label: str | None, angle: int | None
) -> None:
    text = format_box(label, box, angle)
    parsed = parse_boxes(f"Answer: {text}.")
    assert len(parsed) == 1
    (p,) = parsed
    assert p.format == CANONICAL
    assert p.box_norm == tuple(float(v) for v in box)
    assert p.angle == (None if angle is None else float(angle))
    expected_label = (
        None if label is None else " ".join(label.replace("<", "").replace(">", "").split())[:200]
    )
    assert p.label == (expected_label or None)
    assert p.format_canonical() == text


def test_format_box_clamps_orders_and_rounds() -> None:
    assert format_box("roof", (300.4, 900, 100, -5)) == "<ref>roof</ref><box>[100,0,300,900]</box>"
    assert format_box(None, (0, 0, 10, 10), angle=540) == "<box>[0,0,10,10,180]</box>"
    assert format_box(None, (0, 0, 10, 10), angle=-190) == "<box>[0,0,10,10,170]</box>"
    with pytest.raises(ValueError, match="4 coordinates"):
        format_box("x", (1, 2, 3))
    with pytest.raises(ValueError, match="finite"):
        format_box("x", (1, 2, 3, float("nan")))


def test_several_boxes_share_a_ref() -> None:
    text = "<ref>cars</ref><box>[1,2,30,40]</box><box>[50,60,70,80]</box>, <box>[5,5,9,9]</box>. Then <box>[1,1,2,2]</box>"
    labels_found = [b.label for b in parse_boxes(text)]
    assert labels_found == ["cars", "cars", "cars", None]


def test_degenerate_and_out_of_range_boxes() -> None:
    assert parse_boxes("<box>[10,10,10,50]</box>") == []  # zero width
    (box,) = parse_boxes("<box>[1200,-5,300,400]</box>")
    assert box.box_norm == (300.0, 0.0, 1000.0, 400.0)


# ---------------------------------------------------------------------------------- peer formats
def test_geochat() -> None:
    (a, b) = parse_boxes("There is a plane {<10><20><30><40>|-45} and a ship {<5><6><15><16>}")
    assert a.format == GEOCHAT and a.box_norm == (100.0, 200.0, 300.0, 400.0) and a.angle == -45.0
    assert b.angle is None and b.box_norm == (50.0, 60.0, 150.0, 160.0)
    (c,) = parse_boxes("{<10><20><30><40>|<90>}")
    assert c.angle == 90.0


def test_lhrs_bot_and_plain_lists() -> None:
    (a,) = parse_boxes("the pond is at [0.12, 0.5, 0.3, 0.75].")
    assert a.format == LHRS_BOT
    assert a.box_norm == pytest.approx((120.0, 500.0, 300.0, 750.0))
    (b,) = parse_boxes("[120, 340, 560, 780]")
    assert b.format == PLAIN_1000 and b.box_norm == (120.0, 340.0, 560.0, 780.0)
    # Lists that are not boxes: values beyond the scale, or not four numbers.
    assert parse_boxes("scores [1.5, 2, 3000, 4]") == []
    assert parse_boxes("[1, 2, 3]") == []


def test_qwen_vl() -> None:
    text = "<|object_ref_start|>the white car<|object_ref_end|><|box_start|>(100,200),(300,400)<|box_end|>"
    (a,) = parse_boxes(text)
    assert (a.format, a.label, a.box_norm) == (
        QWEN_VL,
        "the white car",
        (100.0, 200.0, 300.0, 400.0),
    )
    (b,) = parse_boxes("<ref>tank</ref><box>(300,400),(100,200)</box>")
    assert (b.label, b.box_norm) == ("tank", (100.0, 200.0, 300.0, 400.0))
    (c,) = parse_boxes("<|box_start|>(1,2),(3,4)<|box_end|>")
    assert c.label is None


def test_qwen25_json_needs_image_size() -> None:
    text = '```json\n[{"bbox_2d": [50, 100, 150, 300], "label": "pool"}, {"bbox_2d": [0, 0, 10, 10]}]\n```'
    assert parse_boxes(text) == []
    a, b = parse_boxes(text, image_size=(500, 1000))
    assert (a.format, a.label) == (QWEN25_JSON, "pool")
    assert a.box_norm == pytest.approx((100.0, 100.0, 300.0, 300.0))
    assert a.to_pixels(500, 1000) == pytest.approx((50, 100, 150, 300))
    assert b.label is None
    # Single quotes (not JSON) still read.
    (c,) = parse_boxes("{'bbox_2d': [5, 5, 50, 50], 'label': 'hut'}", image_size=(100, 100))
    assert c.label == "hut" and c.box_norm == pytest.approx((50.0, 50.0, 500.0, 500.0))


def test_canonical_list_is_not_reparsed_as_lhrs() -> None:
    boxes = parse_boxes("<box>[0,0,1,1]</box>")
    assert [b.format for b in boxes] == [CANONICAL]
    assert boxes[0].box_norm == (0.0, 0.0, 1.0, 1.0)


# ------------------------------------------------------------------------------------ geometry
def test_to_pixels_and_obb() -> None:
    box = ParsedBox("ship", (100.0, 200.0, 300.0, 400.0), angle=90.0)
    assert box.to_pixels(500, 250) == pytest.approx((50, 50, 150, 100))
    cx, cy, w, h, angle = box.to_obb_pixels(500, 250)
    assert (cx, cy, w, h, angle) == pytest.approx((100, 75, 100, 50, 90))
    corners = box.corners_px(500, 250)
    # Turned 90 degrees clockwise on screen: the unrotated top-left corner goes to top-right.
    assert corners[0] == pytest.approx((125, 25))
    xs, ys = zip(*corners, strict=True)
    assert (max(xs) - min(xs), max(ys) - min(ys)) == pytest.approx((50, 100))


def test_format_region_box() -> None:
    assert format_region_box((10, 20, 30, 40), 100, 200) == "<box>[100,100,300,200]</box>"
    with pytest.raises(ValueError):
        format_region_box((0, 0, 1, 1), 0, 100)


def test_strip_boxes() -> None:
    text = "A <ref>building</ref><box>[1,2,3,4]</box> near {<1><1><2><2>}."
    assert strip_boxes(text) == "A building near ."


def test_box_iou_is_plain_pixel_iou() -> None:
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0
    # The "+1" convention on 0-1 coordinates would call these two disjoint tiny boxes a match
    # ((1.1*1.1 overlap...) > 0.5); plain IoU does not.
    assert box_iou((0.1, 0.1, 0.2, 0.2), (0.3, 0.3, 0.4, 0.4)) == 0.0


def test_obb_iou() -> None:
    assert obb_iou((50, 50, 20, 10, 0), (50, 50, 20, 10, 0)) == pytest.approx(1.0)
    # A square turned by 90 degrees is itself.
    assert obb_iou((0, 0, 10, 10, 0), (0, 0, 10, 10, 90)) == pytest.approx(1.0)
    # A 20x10 box turned by 90 degrees overlaps its original in a 10x10 square.
    assert obb_iou((0, 0, 20, 10, 0), (0, 0, 20, 10, 90)) == pytest.approx(100 / 300)
