"""Golden cases of each pretrained family's box convention, computed by hand.

Every case names the chip size and what the family wrote, and the expected canonical box
(0-1000 of the chip) or chip pixels, with the arithmetic in a comment."""

from __future__ import annotations

import math

import pytest

from rsvlm.backends import conventions as cv
from rsvlm.backends.florence2 import florence_task
from rsvlm.backends.qwen_vl import MAX_PIXELS, MIN_PIXELS


def _close(a, b, tol=1e-6):
    return all(math.isclose(x, y, abs_tol=tol) for x, y in zip(a, b, strict=True))


def test_qwen25_non_square_chip_scaled_up_by_the_pixel_budget() -> None:
    # 500 x 300: 308 x 504 (rounded to 28) is below min_pixels (256 * 28 * 28 = 200704), so
    # beta = sqrt(200704 / 150000) = 1.15673; h = ceil(300 * beta / 28) * 28 = 13 * 28 = 364,
    # w = ceil(500 * beta / 28) * 28 = 21 * 28 = 588.
    assert cv.smart_resize(300, 500, 28, MIN_PIXELS, MAX_PIXELS) == (364, 588)
    text = '```json\n[{"bbox_2d": [147, 91, 294, 182], "label": "building"}]\n```'
    (box,) = cv.qwen25_boxes(text, (588, 364))
    # 147 / 588 = 0.25, 91 / 364 = 0.25, 294 / 588 = 0.5, 182 / 364 = 0.5
    assert box.label == "building" and _close(box.box_norm, (250, 250, 500, 500))
    assert _close(box.to_pixels(500, 300), (125, 75, 250, 150))


def test_qwen25_large_chip_scaled_down_and_clipped() -> None:
    # 2000 x 1000: 1008 x 1988 exceeds max_pixels (1280 * 28 * 28 = 1003520), so
    # beta = sqrt(2e6 / 1003520) = 1.41173; h = floor(1000 / beta / 28) * 28 = 25 * 28 = 700,
    # w = floor(2000 / beta / 28) * 28 = 50 * 28 = 1400.
    assert cv.smart_resize(1000, 2000, 28, MIN_PIXELS, MAX_PIXELS) == (700, 1400)
    boxes = cv.qwen25_boxes('[{"bbox_2d": [350, 175, 700, 350]}, '
                            '{"bbox_2d": [1300, 600, 1500, 800], "label": "pool"}]', (1400, 700))
    assert _close(boxes[0].to_pixels(2000, 1000), (500, 250, 1000, 500))
    # x2 = 1500 > 1400 and y2 = 800 > 700 clip to the image: 1300/1400 -> 928.571, 600/700 -> 857.143
    assert _close(boxes[1].box_norm, (1300 / 1400 * 1000, 600 / 700 * 1000, 1000, 1000))
    assert _close(boxes[1].to_pixels(2000, 1000), (1857.142857, 857.142857, 2000, 1000), 1e-5)


def test_qwen_resized_size_comes_from_the_processor_grid() -> None:
    # image_grid_thw (1, 26, 42) of 14-pixel patches: 42 * 14 = 588 wide, 26 * 14 = 364 high
    assert cv.qwen_resized_size((1, 26, 42), 14) == (588, 364)
    assert cv.qwen_resized_size((1, 20, 30), 16) == (480, 320)  # Qwen3-VL: 16-pixel patches


def test_qwen3_relative_grid() -> None:
    (box,) = cv.qwen3_boxes('[{"bbox_2d": [250, 100, 750, 400], "label": "field"}]')
    # 0-1000 of the image whatever its size: 500 x 300 -> (125, 30, 375, 120)
    assert box.label == "field" and _close(box.to_pixels(500, 300), (125, 30, 375, 120))
    (clipped,) = cv.qwen3_boxes('{"bbox_2d": [900, -20, 1100, 50]}')
    assert _close(clipped.box_norm, (900, 0, 1000, 50))


def test_florence_location_bins_are_bin_centres() -> None:
    boxes = cv.florence_boxes("building<loc_100><loc_200><loc_299><loc_399>car<loc_0><loc_0>"
                              "<loc_999><loc_999>", (640, 480))
    # bin b -> (b + 0.5) / 1000 of the side: 100.5, 200.5, 299.5, 399.5 (x 0.64 / x 0.48 px)
    assert [b.label for b in boxes] == ["building", "car"]
    assert _close(boxes[0].box_norm, (100.5, 200.5, 299.5, 399.5))
    assert _close(boxes[0].to_pixels(640, 480), (64.32, 96.24, 191.68, 191.76))
    assert _close(boxes[1].box_norm, (0.5, 0.5, 999.5, 999.5))


def test_florence_quad_becomes_an_oriented_box_square_chip() -> None:
    # bins -> px on a 1000 px chip: b + 0.5. Corners (299.5, 499.5) (499.5, 299.5)
    # (599.5, 399.5) (399.5, 599.5): first edge (200, -200) -> 282.84 px at -45 deg, next edge
    # (100, 100) -> 141.42 px; centre (449.5, 449.5).
    (box,) = cv.florence_boxes("ship<loc_299><loc_499><loc_499><loc_299><loc_599><loc_399>"
                               "<loc_399><loc_599>", (1000, 1000))
    cx, cy, w, h, angle = box.to_obb_pixels(1000, 1000)
    assert _close((cx, cy, w, h, angle), (449.5, 449.5, 200 * math.sqrt(2), 100 * math.sqrt(2), -45), 1e-4)
    expected = {(299.5, 499.5), (499.5, 299.5), (599.5, 399.5), (399.5, 599.5)}
    corners = {(round(x, 3), round(y, 3)) for x, y in box.corners_px(1000, 1000)}
    assert corners == expected


def test_florence_quad_angle_is_measured_in_pixels_on_a_non_square_chip() -> None:
    # A 400 x 200 px rectangle turned 30 deg about (1000, 500) on a 2000 x 1000 chip; its
    # corners go into bins (x / 2, y / 1, minus the half bin) and come back within a bin.
    t = math.radians(30)
    corners = [(1000 + dx * math.cos(t) - dy * math.sin(t), 500 + dx * math.sin(t) + dy * math.cos(t))
               for dx, dy in ((-200, -100), (200, -100), (200, 100), (-200, 100))]
    locs = "".join(f"<loc_{round(x / 2 - 0.5)}><loc_{round(y - 0.5)}>" for x, y in corners)
    (box,) = cv.florence_boxes(f"storage tank{locs}", (2000, 1000))
    cx, cy, w, h, angle = box.to_obb_pixels(2000, 1000)
    assert abs(cx - 1000) < 2 and abs(cy - 500) < 1
    assert abs(w - 400) < 3 and abs(h - 200) < 3 and abs(angle - 30) < 0.5
    # on the 0-1000 grid this box would be 200 x 200 at 49 deg: the pixel frame matters


def test_falcon_box_spelling_and_unparseable_text() -> None:
    (box,) = cv.florence_boxes("stadium<box><855><297><891><355></box>", (1000, 1000))
    assert box.label == "stadium" and _close(box.box_norm, (855.5, 297.5, 891.5, 355.5))
    assert cv.florence_boxes("no boxes here <loc_1><loc_2>", (100, 100)) == []


def test_geochat_grid_and_angle() -> None:
    (box,) = cv.geochat_boxes("There is a plane {<10><20><50><60>|<30>} on the apron.")
    # 0-100 grid: (10, 20, 50, 60) -> (100, 200, 500, 600) of 1000; 640 x 480 -> (64, 96, 320, 288)
    assert box.angle == 30 and _close(box.to_pixels(640, 480), (64, 96, 320, 288))


def test_canonical_text_keeps_words_and_rewrites_boxes() -> None:
    text = 'Two: [{"bbox_2d": [0, 0, 294, 182], "label": "roof"}] done'
    boxes = cv.qwen25_boxes(text, (588, 364))
    assert cv.to_canonical_text(text, boxes) == "Two: <ref>roof</ref><box>[0,0,500,500]</box> done"
    fenced = ('Here:\n```json\n[\n  {"bbox_2d": [0, 0, 294, 182], "label": "roof"},\n'
              '  {"bbox_2d": [294, 182, 588, 364], "label": "pool"}\n]\n```')
    out = cv.to_canonical_text(fenced, cv.qwen25_boxes(fenced, (588, 364)))
    assert out == ("Here:\n<ref>roof</ref><box>[0,0,500,500]</box> "
                   "<ref>pool</ref><box>[500,500,1000,1000]</box>")
    words = "a tank at [1, 2] and {<10><20><50><60>|<30>}"  # a non-box list stays as written
    assert cv.to_canonical_text(words, cv.geochat_boxes(words)) == \
        "a tank at [1, 2] and <box>[100,200,500,600,30]</box>"


@pytest.mark.parametrize(("question", "region", "prompt"), [
    ("find all buildings", None, "<CAPTION_TO_PHRASE_GROUNDING>buildings"),
    ("How many storage tanks are there?", None, "<CAPTION_TO_PHRASE_GROUNDING>storage tanks"),
    ("how many are there?", None, "<OD>"),
    ("Describe the image", None, "<MORE_DETAILED_CAPTION>"),
    ("<OD>", None, "<OD>"),
    ("what is here?", "<loc_1><loc_2><loc_3><loc_4>", "<REGION_TO_DESCRIPTION><loc_1><loc_2><loc_3><loc_4>"),
])
def test_florence_task_of_a_question(question: str, region: str | None, prompt: str) -> None:
    assert florence_task(question, region, instruction_following=False)[0] == prompt


@pytest.mark.parametrize(("question", "region", "prompt"), [
    # Falcon's README task prompts
    ("Find all stadiums", None, "Detect all stadiums in the image.\nUse horizontal bounding boxes."),
    ("How many ships are there?", None, "Count the number of ships."),
    ("Classify the image", None, "Classify the image.\nUse one or a few words."),
    ("Describe this image.", None, "Describe the image."),
    ("Is the number of roads equal to the number of residential areas?", None,
     "Is the number of roads equal to the number of residential areas?"),
    ("What is this?", "<box><1><2><3><4></box>", "Describe the <box><1><2><3><4></box> in this image."),
    ("Classify this region", "<box><1><2><3><4></box>",
     "Classify the region of <box><1><2><3><4></box>.\nUse one or a few words."),
])
def test_falcon_questions_become_its_documented_instructions(question, region, prompt) -> None:
    assert florence_task(question, region, instruction_following=True)[0] == prompt
