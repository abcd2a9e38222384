"""Object questions answered from the detector: which questions, what the answer says (the
count it states is the number of detections it was given), and the chat path around it."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from affine import Affine
from PIL import Image

from rsvlm.boxes import parse_boxes
from rsvlm.detector import Detection
from rsvlm.perception import (
    DetectorConfig,
    Perception,
    area_answer,
    area_question,
    detections_summary,
    object_question,
    perception_answer,
    save_detector,
)


@pytest.mark.parametrize("question, expected", [
    ("Are there any buildings? Answer with a single word or number.", ("presence", "building")),
    ("Is there a building in the image?", ("presence", "building")),
    ("How many buildings are there? Answer with a single word or number.", ("count", "building")),
    # every phrasing of `training.vqa`'s questions, as `rsvlm-train eval --task vqa` asks them
    ("What is the number of buildings? Answer with a single word or number.",
     ("count", "building")),
    ("What's the total number of buildings in this image?", ("count", "building")),
    ("Number of buildings in the image?", ("count", "building")),
    ("Count the buildings.", ("count", "building")),
    ("Is a building present in this image? Answer with a single word.", ("presence", "building")),
    ("Are any buildings visible?", ("presence", "building")),
    ("Can you see a building?", ("presence", "building")),
    ("Does this picture include any buildings?", ("presence", "building")),
    ("Is the number of buildings equal to the number of roads?", None),  # the LM's comparison
    ("Is a road present in this image?", None),
    ("What is the area covered by buildings? Answer with a single word or number.",
     ("area", "building")),
    ("What area do the buildings cover?", ("area", "building")),
    ("How much ground do the buildings cover?", ("area", "building")),
    ("What is the area covered by parking lots?", None),
    # an analyst's own words for buildings, and polite forms
    ("How many houses are there?", ("count", "building")),
    ("Please count the number of buildings.", ("count", "building")),
    ("Could you find all the roofs in this image?", ("find_all", "building")),
    ("Can you see any houses?", ("presence", "building")),
    ("Can you locate the largest house?", ("refer", "building")),
    ("Find all buildings in the image.", ("find_all", "building")),
    ("Locate every building in this image.", ("find_all", "building")),
    ("Detect all buildings and give their bounding boxes.", ("find_all", "building")),
    ("Describe this remote sensing image.", None),
    ("How many roads are there?", None),
    ("Is it a rural or an urban area?", ("rural_urban", "building")),
    ("Is this an urban or a rural area? Answer with a single word.", ("rural_urban", "building")),
    ("Where is the largest building?", ("refer", "building")),
    ("Locate the building in the top left.", ("refer", "building")),
    ("Give the bounding box of the smallest building.", ("refer", "building")),
    ("Output the bounding box of the building.", ("refer", "building")),
    ("Where are the houses?", ("find_all", "building")),
    ("Show me the buildings in the top left.", ("find_all", "building")),
    ("Highlight the roofs.", ("find_all", "building")),
    ("Locate the buildings.", ("find_all", "building")),
    ("Find the buildings closest to the road.", None),  # a relation: the LM's
    ("Where are the buildings of the school?", None),
    ("What is the size of the largest building?", ("measure", "building")),
    ("How big is the building in the top left?", ("measure", "building")),
    ("How big is the building closest to the road?", None),
    ("What is the largest building's area?", ("measure", "building")),
    ("Which is the largest building?", ("refer", "building")),
    ("Are there more than 5 buildings?", ("compare", "building")),
    ("Are there at least 3 houses in the top left?", ("compare", "building")),
    ("Are there more buildings than roads?", None),  # the VQA generator's comparison: the LM's
    ("Is the top left rural or urban?", ("rural_urban", "building")),
    ("Where is the building closest to the parking lot?", None),  # a relation: the LM's
    ("Where is the largest parking lot?", None),
])
def test_object_questions(question, expected) -> None:
    assert object_question(question, ["building"]) == expected


def _dets(n: int) -> list[Detection]:
    return [Detection("building", 0.9, (0.1 * i, 0.1 * i, 0.1 * i + 0.05, 0.1 * i + 0.05))
            for i in range(n)] + [Detection("aircraft", 0.8, (0.5, 0.5, 0.6, 0.6))]


@pytest.mark.parametrize("question, place", [
    ("How many houses are in the top left?", "top-left quarter"),
    ("Is there a building in the top-right corner?", "top-right quarter"),
    ("Find all buildings in the left half of the image.", "left half"),
    ("Count the buildings at the bottom of the picture.", "bottom half"),
    ("How many buildings are in the upper half?", "top half"),
    ("How many buildings in the middle?", "central quarter"),
    ("Are there buildings on the right side?", "right half"),
    ("How many buildings are there?", None),
    ("How many buildings are on the left of the road?", None),  # relative to something else
    ("Describe the bottom half.", "bottom half"),
    ("Is the top left rural or urban?", "top-left quarter"),
])
def test_the_part_of_the_image_a_question_names(question: str, place: str | None) -> None:
    from rsvlm.perception import asked_place

    found = asked_place(question)
    assert (found[1] if found else None) == place


@pytest.mark.parametrize("question, size", [
    ("How many buildings are larger than 200 m²?", (True, 200.0)),
    ("Find all buildings bigger than 150 square meters.", (True, 150.0)),
    ("How many houses under 50 m2?", (False, 50.0)),
    ("Count the buildings of at least 1,000 m².", (True, 1000.0)),
    ("How many buildings are there?", None),
])
def test_the_size_a_question_asks_about(question: str, size: tuple | None) -> None:
    from rsvlm.perception import asked_size, box_sides_m, footprint_m2

    assert asked_size(question) == size
    # Half of each side of a 1536 x 1024 px image at 0.15 m (230 m x 154 m), and 0.6 of it.
    half = Detection("building", 1.0, (0.0, 0.0, 0.5, 0.5))
    ground = 1536 * 1024 * 0.15 ** 2
    assert box_sides_m(half, ground, (1536, 1024)) == "a box of 115 m x 77 m"
    assert footprint_m2(half, ground) == pytest.approx(0.25 * ground * 0.6)


@pytest.mark.parametrize("n", [0, 1, 7])
def test_the_answer_states_the_detections_it_was_given(n: int) -> None:
    dets = _dets(n)
    assert perception_answer("count", "building", dets, (200, 200)) == str(n)
    assert perception_answer("presence", "building", dets, (200, 200)) == ("yes" if n else "no")
    boxes = parse_boxes(perception_answer("find_all", "building", dets, (200, 200)))
    assert len(boxes) == n and all(b.label == "building" for b in boxes)
    # Inside a drawn box: the detections whose centre it holds.
    inside = perception_answer("count", "building", dets, (200, 200), (0, 0, 61, 61))
    assert inside == str(sum(1 for i in range(n) if (0.1 * i + 0.025) * 200 <= 61))
    summary = detections_summary(dets, ["building"])
    assert summary.startswith(f"Detected: {n} building")


def test_a_referring_question_picks_one_detection() -> None:
    from rsvlm.perception import referred, referred_detection

    big_top_left = Detection("building", 0.5, (0.05, 0.05, 0.30, 0.25))
    small_top_left = Detection("building", 0.9, (0.20, 0.02, 0.26, 0.08))
    centre = Detection("building", 0.7, (0.40, 0.40, 0.60, 0.55))
    tiny_bottom = Detection("building", 0.6, (0.45, 0.90, 0.48, 0.93))
    dets = [big_top_left, small_top_left, centre, tiny_bottom]
    assert referred("Where is the largest building?", "building") == ("largest", None)
    assert referred("Locate the biggest building in the top left.", "building") == (
        "largest", "top left")
    assert referred("Where is the building in the centre?", "building") == (None, "center")
    assert referred("Locate the largest building in the top left of the image.", "building") == (
        "largest", "top left")
    assert referred("Where is the building with the red roof?", "building") is None

    def pick(q: str) -> Detection | None:
        return referred_detection(q, "building", dets)

    assert pick("Where is the largest building?") is big_top_left
    assert pick("Where is the smallest building?") is tiny_bottom
    assert pick("Where is the smallest building in the top left?") is small_top_left
    assert pick("Locate the building in the center.") is centre
    assert pick("Locate the building at the bottom.") is tiny_bottom
    assert pick("Where is the building?") is small_top_left  # the surest
    # None is centred there: the one nearest the cell, not the surest on the other side.
    assert pick("Where is the building on the right?") is centre
    edge = Detection("building", 0.2, (0.55, 0.10, 0.75, 0.20))  # centre just left of the line
    assert referred_detection("Where is the building in the top right?", "building",
                              dets + [edge]) is edge
    assert referred_detection("Where is the largest building?", "building", []) is None
    text = perception_answer("refer", "building", dets, (1000, 1000),
                             question="Where is the largest building?")
    assert [b.box_norm for b in parse_boxes(text)] == [(50, 50, 300, 250)]
    # Below the score "find all" reports from, the box stays and the answer says it is weak.
    from rsvlm.perception import perception_reply

    sure, _ = perception_reply("refer", "building", dets, (1000, 1000),
                               question="Where is the largest building?", sure_from=0.5)
    assert sure == text
    weak, stated = perception_reply("refer", "building", dets, (1000, 1000),
                                    question="Where is the largest building?", sure_from=0.6)
    assert stated == [big_top_left]
    assert [b.box_norm for b in parse_boxes(weak)] == [(50, 50, 300, 250)]
    assert "weak candidate" in weak and "0.50" in weak and "0.60" in weak


def test_a_description_ends_with_what_the_detector_found() -> None:
    from rsvlm.perception import asks_description, detections_sentence

    assert asks_description("Describe this remote sensing image.")
    assert asks_description("What can you see in this image?")
    assert not asks_description("How many buildings are there?")
    assert not asks_description("Where is the largest building?")
    two = [Detection("building", 0.9, (0.0, 0.0, 0.2, 0.2)),
           Detection("building", 0.8, (0.05, 0.1, 0.25, 0.3)),
           Detection("building", 0.7, (0.4, 0.4, 0.5, 0.5))]
    assert detections_sentence(two, ["building"]) == (
        "The detector finds 3 buildings mostly in the top left and in the center.")
    assert detections_sentence(two[2:], ["building"]) == (
        "The detector finds 1 building in the center.")
    assert detections_sentence([], ["building"]) == "The detector finds no buildings."
    assert detections_summary(two, ["building"]) == "Detected: 3 buildings (2 top left, 1 center)."
    assert detections_sentence(two, ["building"], where=False) == (
        "The detector finds 3 buildings here.")


def test_a_referring_question_looks_below_the_threshold_in_the_cell_it_names() -> None:
    """The question says its building is there: with none above the threshold in that cell,
    the likeliest one below it there answers; otherwise only the sure ones count."""
    config = DetectorConfig(hidden=8, layers=[11], dim=8, convs=1, threshold=0.4,
                            count_threshold=0.3)
    perception = Perception(config.build(), config, None, [0, 0, 0], [1, 1, 1])
    sure = Detection("building", 0.8, (0.05, 0.05, 0.25, 0.25))  # top left
    unsure = Detection("building", 0.2, (0.75, 0.75, 0.95, 0.95))  # bottom right
    faint = Detection("building", 0.12, (0.70, 0.72, 0.80, 0.80))  # bottom right
    dets = [sure, unsure, faint]

    def refer(q: str) -> list[Detection]:
        return perception.select(dets, "refer", q)

    assert refer("Where is the building in the bottom right?") == [unsure, faint]
    assert referred_detection_of(perception, dets, "Where is the building in the bottom right?"
                                 ) is unsure
    assert refer("Locate the building in the top left.") == [sure]
    assert refer("Where is the largest building?") == [sure]
    assert refer("Where is the building in the center?") == [sure]  # nothing there at all
    assert perception.select(dets, "find_all") == [sure]
    assert perception.select(dets, "count") == [sure]
    assert perception.select([unsure], "refer", "Where is the largest building?") == [unsure]


def referred_detection_of(perception: Perception, dets: list[Detection], q: str
                          ) -> Detection | None:
    from rsvlm.perception import referred_detection

    return referred_detection(q, "building", perception.select(dets, "refer", q))


def test_rural_or_urban_follows_the_training_datas_rule() -> None:
    from tiles import Chip

    def grid(n: int, side: float) -> list[Detection]:  # n x n buildings of side (0-1) each
        return [Detection("building", 0.9, (i / n, j / n, i / n + side, j / n + side))
                for i in range(n) for j in range(n)]

    size = (500, 500)
    # 9 buildings covering 9 % of the chip: rural, unless the ground says 9 per 0.5 ha.
    sparse = grid(3, 0.1)
    assert perception_answer("rural_urban", "building", sparse, size) == "rural"
    assert perception_answer("rural_urban", "building", sparse, size, None, 20_000) == "rural"
    assert perception_answer("rural_urban", "building", sparse, size, None, 5_000) == "urban"
    assert perception_answer("rural_urban", "building", grid(4, 0.1), size) == "urban"  # 16 %
    assert perception_answer("rural_urban", "building", [], size, None, 5_000) == "rural"
    # A drawn box over the top-left building alone: 1 % of the chip holds 100 % of it... urban.
    assert perception_answer("rural_urban", "building", sparse, size, (0, 0, 50, 50)) == "urban"
    # The ground area of a 100 m x 100 m UTM chip.
    chip = Chip(np.zeros((100, 100, 3), np.uint8), "EPSG:32636",
                Affine(1.0, 0, 455_000, 0, -1.0, 40_000))
    assert chip.ground_area_m2 == pytest.approx(10_000, rel=0.01)
    assert Chip(np.zeros((10, 10, 3), np.uint8), None, Affine.identity()).ground_area_m2 is None


def test_coarse_imagery_is_read_zoomed_in(tmp_path: Path) -> None:
    """At 0.3 m a pixel or coarser the detector reads four overlapping crops of 0.6 of the chip
    (each at `zoom_input_size`), and their boxes come back in the chip's frame; finer or
    unknown: the chip whole."""
    from rsvlm.answer import OnChip, ground_sample_distance
    from tiles import Chip

    perception, _ = _tiny_perception(tmp_path, bias=3.0)
    seen = []
    read = perception.features

    def spy(image, size=None):
        seen.append(([im.size for im in image] if isinstance(image, list) else [image.size],
                     size))
        return read(image, size)

    perception.features = spy
    perception.config.zoom_input_size = 28  # each crop read as 2 x 2 patches (the chip: 4 x 4)
    image = Image.new("RGB", (100, 100), (120, 110, 100))
    whole = perception.detect(image, gsd=0.15)
    assert seen == [([(100, 100)], 56)] and perception.detect(image) == whole
    zoomed = perception.detect(image, gsd=0.5)
    assert seen[-1] == ([(60, 60)] * 4, 28)
    # Each patch's own box: a quarter of the chip whole, half of 0.6 of it zoomed in,
    # placed over the whole chip.
    assert {round(d.box[2] - d.box[0], 2) for d in whole} == {0.25}
    assert {round(d.box[2] - d.box[0], 2) for d in zoomed} == {0.3}
    assert min(d.box[0] for d in zoomed) == pytest.approx(0, abs=2e-3)
    assert max(d.box[3] for d in zoomed) == pytest.approx(1, abs=2e-3)
    perception.config.zoom_gsd = None
    assert perception.detect(image, gsd=0.5) == whole
    # The chip's ground sample distance: its geodesic area over its pixels.
    chip = Chip(np.zeros((100, 100, 3), np.uint8), "EPSG:32636",
                Affine(0.5, 0, 455_000, 0, -0.5, 40_000))
    assert OnChip(chip).gsd == pytest.approx(0.5, rel=0.01)
    assert ground_sample_distance(image, image.size) is None


def test_a_chip_finer_than_the_training_views_is_read_at_their_scale(tmp_path: Path) -> None:
    """The detector learnt roofs at about 0.17 m a pixel as the tower reads them (512 px at
    0.15 m, read at 448). A 256 px chip at 0.15 m is read at 224 px, not blown up to 448; a
    512 px one, coarser imagery and imagery of unknown ground stay at the input size."""
    from rsvlm.perception import read_size

    assert read_size(256, 0.15, 448) == 224
    assert read_size(512, 0.15, 448) == 448
    assert read_size(400, 0.15, 448) == 350  # 25 x 25 patches
    assert read_size(1000, 0.3, 448) == 448
    assert read_size(100, 0.05, 448) == 224  # never below half the input size
    assert read_size(256, None, 448) == read_size(256, 0.15, 448, trained_gsd=None) == 448
    perception, _ = _tiny_perception(tmp_path, bias=3.0)
    seen = []
    read = perception.features

    def spy(image, size=None):
        seen.append(size)
        return read(image, size)

    perception.features = spy
    image = Image.new("RGB", (100, 100), (120, 110, 100))
    coarse, fine = perception.detect(image, gsd=0.15), perception.detect(image, gsd=0.06)
    assert seen == [56, 28]  # the tiny tower's 4 x 4 patches, and 2 x 2 at the finer ground
    # Each patch's own box: a quarter of the chip read at 56 px, half of it read at 28.
    assert {round(d.box[2] - d.box[0], 2) for d in coarse} == {0.25}
    assert {round(d.box[2] - d.box[0], 2) for d in fine} == {0.5}


def _tiny_perception(tmp_path: Path, bias: float) -> tuple[Perception, object]:
    from rsvlm.testing import tiny_image_processor, tiny_model

    model = tiny_model()
    cfg = DetectorConfig(labels=["building"], input_size=56, layers=[1, 2], hidden=32, dim=8,
                         convs=1, threshold=0.5)
    head = cfg.build()
    with torch.no_grad():
        head.heat.weight.zero_()
        head.heat.bias.fill_(bias)  # a flat map: every patch a peak when above the threshold
        head.box.weight.zero_()
        head.box.bias.fill_(-0.7)  # a box of 1 patch around each centre: none overlap
    save_detector(head, cfg, tmp_path)
    perception = Perception.load(tmp_path, model.vision_tower.model, tiny_image_processor())
    return perception, model


def test_the_chat_path_answers_object_questions_from_the_detector(tmp_path: Path) -> None:
    from rsvlm.engine import ChatEngine
    from rsvlm.loading import LoadedModel
    from rsvlm.testing import tiny_processor

    perception, model = _tiny_perception(tmp_path, bias=3.0)
    assert Perception.load(tmp_path / "nothing", model.vision_tower.model, None) is None
    engine = ChatEngine(LoadedModel(model, tiny_processor(model.config), perception=perception),
                        max_new_tokens=4, decode_backend="torch")
    image = Image.new("RGB", (64, 64), (120, 110, 100))
    session = engine.session(image)
    count = "".join(session.ask("How many buildings are there?"))
    assert session.detections is not None and count == str(len(session.detections)) == "16"
    found = "".join(session.ask("Find all buildings in the image."))
    assert len(session.last.boxes) == len(session.detections)
    # Each box carries its detection's score (the table's filter and the exports read it), and
    # retrieval ran for the semantics panel although the LM never did.
    assert sorted(b.score for b in session.last.boxes) == pytest.approx(
        sorted(d.score for d in session.detections))
    assert session.retrieved is not None
    assert len(parse_boxes(found)) == 16
    # 16 boxes of 1/16 of the image each (-0.7 = log 0.5 patch to every edge): all built up.
    assert "".join(session.ask("Is it a rural or an urban area?")) == "urban"
    # One box for a referring question: the detection in the named cell (the 4 x 4 grid's
    # top-left patch lies in the top-left third), with its score.
    (box,) = parse_boxes("".join(session.ask("Where is the building in the top left?")))
    assert box.box_norm == pytest.approx((0, 0, 250, 250), abs=2) and len(session.last.boxes) == 1
    assert session.last.boxes[0].score == pytest.approx(session.detections[0].score)
    # Counts and presence at their own threshold; boxes at the find-all one.
    perception.config.count_threshold = 0.99  # above every score (sigmoid(3) = 0.95)
    strict = engine.session(image)
    assert "".join(strict.ask("How many buildings are there?")) == "0"
    assert len(parse_boxes("".join(strict.ask("Find all buildings in the image.")))) == 16
    perception.config.count_threshold = None
    # A count factor (chosen on the folds) says how many there are by the detections; the
    # boxes, and what a description says the detector finds, stay the detections.
    perception.config.count_factor = 1.35
    scaled = engine.session(image)
    assert "".join(scaled.ask("How many buildings are there?")) == "22"  # 16 x 1.35 = 21.6
    assert "x 1.35, rounded" in scaled.last.prompt
    assert "".join(scaled.ask("Are there more than 20 buildings?")) == (
        "yes: about 22 buildings (16 detected)")
    assert len(parse_boxes("".join(scaled.ask("Find all buildings in the image.")))) == 16
    perception.config.count_factor = 1.0
    # Anything else goes to the language model; a description ends with what the detector
    # found, its count the detections' at the counting threshold.
    other = engine.session(image)
    list(other.ask("What is the land use here?"))
    assert other.detections is None and "detector" not in other.last.timing
    described = "".join(other.ask("Describe this remote sensing image."))
    assert "detector" not in other.last.timing and other.last.text == described.strip()
    assert described.endswith(" The detector finds 16 buildings spread over the image.")
    # The language model's own claims about buildings are left out: the detector's stand.
    real = other._stream
    other._stream = lambda *a: iter(["There's one building", " here. A small town. "])
    assert "".join(other.ask("Describe this image.")) == (
        "A small town. The detector finds 16 buildings spread over the image.")
    other._stream = real
    # Of a drawn region: the detections centred in it.
    region = "".join(other.ask("Describe this area.", region_box_px=(0, 0, 32, 32)))
    assert region.endswith(" The detector finds 4 buildings here.")
    # A part of the image named: the detections centred there (the 4 x 4 grid's top-left
    # 2 x 2 patches in the top-left quarter; the right half's 8), said with the answer.
    assert "".join(other.ask("How many houses are in the top left?")) == (
        "4 (in the top-left quarter of the image)")
    assert len(parse_boxes("".join(other.ask("Find all buildings on the right side.")))) == 8
    assert len(other.last.boxes) == 8 and all(b.box_norm[0] >= 500 for b in parse_boxes(
        other.last.text))
    assert "".join(other.ask("Is there a building in the centre?")).startswith("yes (in the ")
    # ... of a drawn box, that part of the box.
    assert "".join(other.ask("How many buildings are in the top half?",
                             region_box_px=(0, 0, 32, 64))) == "4 (in the top half of the drawn box)"
    # A description or rural/urban of a named part: that part, as if drawn.
    assert "".join(other.ask("Describe the top left of the image.")).endswith(
        " The detector finds 4 buildings here.")
    assert "".join(other.ask("Is the top left rural or urban?")).endswith(
        " (in the top-left quarter of the image)")
    # A number to compare the count with: yes or no, and the count.
    assert "".join(other.ask("Are there more than 15 buildings?")) == "yes: 16 buildings found"
    assert "".join(other.ask("Are there at least 5 houses in the top left?")) == (
        "no: 4 buildings found (in the top-left quarter of the image)")
    # A size asked about: by the ground each box suggests (none without a ground resolution).
    assert "".join(other.ask("How many buildings are larger than 200 m²?")) == (
        "16 (of every size: this image has no ground resolution to measure them by)")
    from tiles import Chip

    metres = Chip(pixels=np.asarray(image), crs="EPSG:32636",  # 1 m pixels: 64 m x 64 m
                  transform=Affine(1, 0, 455000, 0, -1, 39000), source="t")
    # Read whole, as the plain picture was (not zoomed in, not at the training views' scale).
    perception.config.zoom_gsd = perception.config.trained_gsd = None
    sized = engine.session(metres)  # each box 16 m x 16 m, a footprint of about 154 m²
    assert "".join(sized.ask("How many buildings are larger than 100 m²?")) == (
        "16 (buildings of more than 100 m², each estimated from its box)")
    assert "".join(sized.ask("How many buildings are bigger than 200 square metres?")).startswith(
        "0 (")
    assert "".join(sized.ask("Are there buildings smaller than 200 m2 in the top left?")) == (
        "yes (buildings of less than 200 m², each estimated from its box; in the top-left "
        "quarter of the image)")
    (box,) = parse_boxes(said := "".join(sized.ask("How big is the largest building?")))
    # 0.6 of a 16 m x 16 m box (the chip's geodesic area is a little over 64 m x 64 m).
    assert re.search(r"</box> About 15\d m² \(estimated from its box, a box of 16 m x 16 m\)\.$",
                     said), said
    assert sized.last.boxes and "weak" not in said
    plain = "".join(other.ask("What is the size of the building in the top left?"))
    assert plain.endswith("It spans 6.2% of the image; with no ground resolution I cannot give "
                          "its size in metres.")
    perception.config.zoom_gsd, perception.config.trained_gsd = DetectorConfig().zoom_gsd, (
        DetectorConfig().trained_gsd)
    # Nothing above the threshold: "no", "0".
    quiet, _ = _tiny_perception(tmp_path / "quiet", bias=-6.0)
    engine.perception = quiet
    s = engine.session(image)
    assert "".join(s.ask("Are there any buildings?")) == "no"
    assert "".join(s.ask("How many buildings are there?")) == "0"
    # A building asked for that the detector does not see at all: said so, not made up.
    assert "".join(s.ask("Where is the largest building?")) == (
        "I find no building like that in this image.") and not s.last.boxes


def test_a_scan_asks_the_detector_for_every_chip(tmp_path: Path) -> None:
    from rsvlm.engine import ChatEngine
    from rsvlm.loading import LoadedModel
    from rsvlm.scan import engine_answer_fn
    from rsvlm.testing import tiny_processor

    perception, model = _tiny_perception(tmp_path, bias=3.0)
    engine = ChatEngine(LoadedModel(model, tiny_processor(model.config), perception=perception),
                        max_new_tokens=4, decode_backend="torch")
    answer = engine_answer_fn(engine, max_new_tokens=4)
    chips = [Image.new("RGB", (64, 64), (c, c, c)) for c in (50, 150)]
    texts = answer(chips, "find all buildings")
    assert [len(parse_boxes(t)) for t in texts] == [16, 16]
    # A scan counts its merged boxes (`area_question`): every chip answers a count with them.
    assert [len(parse_boxes(t)) for t in answer(chips, "how many buildings are there?")] == \
        [16, 16]
    # A size asked about: each chip keeps the boxes whose footprint passes (16 m boxes on a
    # 64 m chip, read whole: about 154 m² each).
    from tiles import Chip

    perception.config.zoom_gsd = perception.config.trained_gsd = None
    metres = [Chip(pixels=np.asarray(c), crs="EPSG:32636", source="t",
                   transform=Affine(1, 0, 455000, 0, -1, 39000)) for c in chips]
    assert [len(parse_boxes(t)) for t in answer(metres, "find all buildings larger than 100 m²")
            ] == [16, 16]
    assert [len(parse_boxes(t)) for t in answer(metres, "how many buildings larger than 200 m²?")
            ] == [0, 0]


def test_an_area_question_asks_the_tiles_to_find_and_counts_once() -> None:
    labels = ["building"]
    assert area_question("How many buildings are there?", labels) == (
        "count", "building", "Find all buildings in the image.")
    assert area_question("Are there any buildings in the image?", labels)[:2] == (
        "presence", "building")
    assert area_question("Find all buildings in the image.", labels) is None  # boxes already
    assert area_question("Where is the largest building?", labels) is None
    assert area_question("How many roads are there?", labels) is None
    assert area_answer("count", "building", 12) == "12 buildings in this area"
    assert area_answer("count", "building", 1) == "1 building in this area"
    assert area_answer("presence", "building", 0) == "No buildings found in this area"
    assert area_answer("presence", "building", 3) == "Yes: 3 buildings in this area"


def test_what_kind_of_area_smaller_than_the_scene_classifiers_scenes(tmp_path: Path) -> None:
    # The scene classifier learnt AID (scenes 300 m to 4.8 km across): a chip of 10 m is
    # answered from the detector (rural/urban and what it finds), one of 320 m by the classifier.
    from rsvlm.engine import ChatEngine
    from rsvlm.loading import LoadedModel
    from rsvlm.scene import SceneClassifier, SceneConfig, SceneReader
    from rsvlm.testing import tiny_image_processor, tiny_processor
    from tiles import Chip

    perception, model = _tiny_perception(tmp_path, bias=3.0)
    hidden = model.config.vision_config.hidden_size
    clf = SceneClassifier(SceneConfig(classes=["forest", "resort"], layers=[1, 2],
                                      hidden=hidden))
    with torch.no_grad():
        clf.linear.weight.zero_()
        clf.linear.bias.copy_(torch.tensor([0.0, 5.0]))
    reader = SceneReader(clf, model.vision_tower.model, tiny_image_processor())
    engine = ChatEngine(LoadedModel(model, tiny_processor(model.config), perception=perception,
                                    scene=reader), max_new_tokens=4, decode_backend="torch")
    pixels = np.full((64, 64, 3), 110, np.uint8)
    question = "Classify the scene: what kind of area is this?"
    fine = engine.session(Chip(pixels, "EPSG:32636", Affine(0.15, 0, 455_000, 0, -0.15, 40_000)))
    said = "".join(fine.ask(question))
    assert said == ("An urban area, by its buildings. The detector finds 16 buildings spread "
                    "over the image.") and fine.last.timing["detector"] == 1.0
    # 64 px at 5 m: 320 m across, a scene of AID's size.
    coarse = engine.session(Chip(pixels, "EPSG:32636", Affine(5.0, 0, 455_000, 0, -5.0, 40_000)))
    assert "".join(coarse.ask(question)).startswith("It looks like a resort (probability ")


@pytest.mark.parametrize("question, expected", [
    ("How many planes are there?", ("count", "aircraft")),
    ("How many aircraft are on the apron?", ("count", "aircraft")),
    ("Find all trees in the image.", ("find_all", "tree")),
    ("Are there any airplanes?", ("presence", "aircraft")),
    ("Where is the largest plane?", ("refer", "aircraft")),
    ("Where is the largest tree crown?", ("refer", "tree")),
    ("How many buildings are there?", ("count", "building")),
    ("Find all buildings near the trees.", ("find_all", "building")),
    ("How many cars are there?", None),
])
def test_object_questions_of_several_classes(question, expected) -> None:
    assert object_question(question, ["building", "tree", "aircraft"]) == expected


def test_each_class_answers_at_its_own_thresholds() -> None:
    """A class's thresholds were chosen on its own held-out sets: a tree of 0.35 is a tree
    where a building of 0.35 is not, and a referring question looks among its class only."""
    from rsvlm.perception import detections_sentence

    config = DetectorConfig(labels=["building", "tree", "aircraft"], hidden=8, layers=[11], dim=8,
                            convs=1, threshold=0.4, count_threshold=0.3,
                            class_thresholds={"tree": [0.3, 0.25]})
    perception = Perception(config.build(), config, None, [0, 0, 0], [1, 1, 1])
    roof = Detection("building", 0.35, (0.05, 0.05, 0.25, 0.25))  # top left
    crown = Detection("tree", 0.35, (0.75, 0.75, 0.95, 0.95))  # bottom right
    shrub = Detection("tree", 0.27, (0.40, 0.40, 0.50, 0.50))  # center
    dets = [roof, crown, shrub]
    assert perception.select(dets, "find_all") == [crown]
    assert perception.select(dets, "count") == [roof, crown, shrub]
    assert perception.select(dets, "refer", "Where is the building in the bottom right?") == [roof]
    assert perception.select(dets, "refer", "Where is the tree in the center?") == [shrub]
    # A description names what was found, and of the other classes nothing that was not.
    assert detections_sentence([roof], config.labels, where=False) == (
        "The detector finds 1 building here.")
    assert detections_sentence([crown], config.labels, where=False) == (
        "The detector finds no buildings; 1 tree here.")
    assert "aircraft" not in detections_summary([roof, crown], config.labels)
    # Saved and loaded with the detector.
    assert DetectorConfig(**__import__("dataclasses").asdict(config)).cut("tree", "count") == 0.25


def test_a_class_the_detector_learnt_but_does_not_answer_goes_to_the_language_model() -> None:
    config = DetectorConfig(labels=["building", "tree", "aircraft"], hidden=8, layers=[11], dim=8,
                            convs=1, answers=["building", "aircraft"])
    assert config.answered == ["building", "aircraft"]
    assert object_question("How many trees are there?", config.answered) is None
    assert object_question("How many planes are there?", config.answered) == ("count", "aircraft")
    assert DetectorConfig(labels=["building", "tree"]).answered == ["building", "tree"]


def test_a_description_leaves_the_counting_to_the_detector() -> None:
    from rsvlm.perception import claims_about, without_claims

    said = ("This overhead image shows a built-up area seen from above. There's a building of "
            "about 100 m² covered in about 250 m². The largest one, in the bottom left, covers "
            "about 75 m². Roads cross it, 1.5 km in all.")
    pieces = [said[i:i + 7] for i in range(0, len(said), 7)]  # as tokens arrive
    kept = "".join(without_claims(iter(pieces), ["building", "aircraft"]))
    assert kept == ("This overhead image shows a built-up area seen from above. "
                    "Roads cross it, 1.5 km in all.")
    assert claims_about("Two planes stand on the apron.", ["building", "aircraft"])
    assert not claims_about("Two planes stand on the apron.", ["building"])
    assert "".join(without_claims(iter(["There are 7 buildings."]), ["building"])) == ""


def test_the_area_answer_is_the_boxes_union_as_footprints() -> None:
    from rsvlm.perception import FOOTPRINT_SHARE, area_bucket, area_reply, covered_share

    a = Detection("building", 0.9, (0.0, 0.0, 0.5, 0.5))
    overlapping = Detection("building", 0.8, (0.25, 0.0, 0.75, 0.5))
    assert covered_share([a]) == pytest.approx(0.25)
    assert covered_share([a, overlapping]) == pytest.approx(0.375)  # the overlap counts once
    # a 60 m square chip (3600 m²): a quarter in boxes is 900 m² of boxes, 540 m² of roofs
    text = area_reply([a], "building", 3600.0)
    assert text.startswith("between 100 m² and 1000 m²") and f"{900 * FOOTPRINT_SHARE:,.0f} m²" in text
    assert area_reply([a], "building", 36_000.0).startswith("more than 1000 m²")
    assert area_reply([], "building", 3600.0).startswith("0 m²")
    assert "of the image" in area_reply([a], "building", None)  # no ground resolution
    assert [area_bucket(v) for v in (0, 5, 50, 500, 5000)] == [
        "0 m²", "between 0 m² and 10 m²", "between 10 m² and 100 m²",
        "between 100 m² and 1000 m²", "more than 1000 m²"]


def test_rsvqa_scores_the_area_answer_as_its_class() -> None:
    from rsvlm.perception import area_reply
    from training.metrics import vqa_correct

    text = area_reply([Detection("building", 0.9, (0.0, 0.0, 0.5, 0.5))], "building", 3600.0)
    assert vqa_correct(text, "between 100 m² and 1000 m²", "area")
    assert not vqa_correct(text, "more than 1000 m²", "area")


def test_a_description_about_roofs_keeps_its_sentence() -> None:
    from rsvlm.perception import claims_about

    # words a question may use for buildings do not make a description's sentence a claim
    assert not claims_about("Most roofs are made of corrugated metal.", ["building"])
    assert claims_about("There are three buildings.", ["building"])


def test_the_detector_reads_the_towers_blocks_up_to_its_deepest_level_only() -> None:
    """`Perception.features` runs the blocks up to the deepest level it reads and stops: the
    same levels as the whole tower's hidden states, without its last blocks' cost."""
    from PIL import Image
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    vision = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=5, num_attention_heads=2,
                                      intermediate_size=64, patch_size=14, image_size=56)).eval()
    config = DetectorConfig(input_size=56, layers=[1, 3], hidden=32)
    perception = Perception(config.build(), config, vision, [0.5] * 3, [0.25] * 3)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 70, 3), np.uint8))
    ran = []
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: ran.append(k))
             for k, b in enumerate(vision.encoder.layer)]
    with torch.inference_mode():
        got = perception.features(image)
        for h in hooks:
            h.remove()
        x = (torch.from_numpy(np.array(image.resize((56, 56), Image.BICUBIC))).float()
             .permute(2, 0, 1)[None] / 255.0 - 0.5) / 0.25
        full = vision(pixel_values=x, output_hidden_states=True).hidden_states
    assert ran == [0, 1, 2]  # blocks 4 and 5 are not run
    for level, tensor in zip([1, 3], got, strict=True):
        torch.testing.assert_close(tensor, full[level][:, -16:])


def test_detections_read_elsewhere_stand_for_the_sessions_own(tmp_path: Path) -> None:
    """`ChatSession.adopt_detections`: a label's detections from a scan of the chip's area
    replace the chip's own, before or after its own read, for every later answer."""
    import re

    from rsvlm.engine import ChatEngine
    from rsvlm.loading import LoadedModel
    from rsvlm.testing import tiny_processor

    perception, model = _tiny_perception(tmp_path, bias=3.0)
    engine = ChatEngine(LoadedModel(model, tiny_processor(model.config), perception=perception),
                        max_new_tokens=4, decode_backend="torch")
    image = Image.new("RGB", (64, 64), (120, 110, 100))
    scanned = [Detection("building", 0.8, (0.15 * i, 0.1, 0.15 * i + 0.1, 0.2)) for i in range(5)]
    before = engine.session(image)
    before.adopt_detections("building", scanned)
    assert "".join(before.ask("How many buildings are there?")) == "5"
    assert re.search(r"The detector finds 5 buildings\b",
                     "".join(before.ask("Describe this remote sensing image.")))
    after = engine.session(image)
    assert "".join(after.ask("How many buildings are there?")) == "16"  # its own read
    after.adopt_detections("building", scanned)
    assert "".join(after.ask("How many buildings are there?")) == "5"
    after.adopt_detections("building", [])  # a scan that found none
    assert "".join(after.ask("Are there any buildings?")) == "no"


def test_a_description_opens_with_the_scene_the_detector_finds() -> None:
    """The language model's scene opening repeats the retrieved neighbour's ("An aerial image
    of an airport." over a suburb it never saw): `grounded_description` puts the detector's
    in its place, and leaves out what the model says the map records (it never sees it)."""
    from rsvlm.perception import grounded_description

    said = ("An aerial image of an airport. OpenStreetMap records no features here. "
            "There are 7 buildings. Trees line the road.")
    pieces = [said[i:i + 5] for i in range(0, len(said), 5)]
    opening = "This overhead image shows a built-up area."
    streamed = list(grounded_description(iter(pieces), ["building"], opening))
    assert streamed[0] == opening  # before the model's first sentence is complete
    assert "".join(streamed) == "This overhead image shows a built-up area. Trees line the road."
    # No detections to say otherwise: the model's own scene stays.
    assert "".join(grounded_description(iter([said]), ["building"], None)) == (
        "An aerial image of an airport. Trees line the road.")
    # Only a first sentence that names the scene gives way.
    later = "Trees line the road. An aerial image of an airport."
    assert "".join(grounded_description(iter([later]), ["building"], opening)) == (
        f"{opening} {later}")
    assert "".join(grounded_description(iter(["No mapped objects are visible."]),
                                        ["building"])) == ""


def test_the_scene_words_agree_with_the_rural_urban_answer() -> None:
    from rsvlm.perception import scene_of_detections, scene_words

    def boxes(n: int, side: float) -> list[Detection]:
        return [Detection("building", 0.9, (0.1 * (i % 9), 0.1 * (i // 9),
                                            0.1 * (i % 9) + side, 0.1 * (i // 9) + side))
                for i in range(n)]

    hectare = 10_000.0
    assert scene_words([], "building", hectare) == "an area without buildings"
    few = boxes(3, 0.05)  # 3 a hectare, 0.75 % of the ground in boxes
    assert scene_of_detections(few, "building", hectare) == "rural"
    assert scene_words(few, "building", hectare) == "a sparsely built area"
    many = boxes(15, 0.05)  # 15 a hectare: urban by number
    assert scene_of_detections(many, "building", hectare) == "urban"
    assert scene_words(many, "building", hectare) == "a built-up area"
    big = boxes(60, 0.1)  # 0.6 of the ground in boxes, 0.36 in footprints
    assert scene_words(big, "building", hectare) == "a densely built-up area"


def test_a_small_chips_description_opens_with_what_the_detector_finds(tmp_path: Path) -> None:
    import re

    from affine import Affine

    from rsvlm.engine import ChatEngine
    from rsvlm.loading import LoadedModel
    from rsvlm.testing import tiny_processor
    from tiles import Chip

    perception, model = _tiny_perception(tmp_path, bias=3.0)
    engine = ChatEngine(LoadedModel(model, tiny_processor(model.config), perception=perception),
                        max_new_tokens=4, decode_backend="torch")
    pixels = np.full((64, 64, 3), 120, np.uint8)

    def chip(px_m: float) -> Chip:  # Web Mercator near the equator: metres on the ground
        return Chip(pixels=pixels, crs="EPSG:3857",
                    transform=Affine(px_m, 0, 3_628_000, 0, -px_m, 39_000))

    small = engine.session(chip(0.5))  # 32 m across; hundreds of small boxes: urban by number
    assert small._scene_opening(None) == "This overhead image shows a built-up area."
    assert small._scene_opening((0, 0, 10, 10)) is None  # a drawn region: its own words
    pieces = list(small.ask("Describe this image."))
    assert pieces[0] == "This overhead image shows a built-up area."  # before the model's words
    assert re.search(r"The detector finds \d+ buildings", small.last.text)
    # Over a chip whose ground is known, how large they are as well.
    assert re.search(r"Most buildings are (?:about )?[\d,-]+ m² \(estimated from their boxes\); the "
                     r"largest, about [\d,]+ m², is [a-z ]+\. Together they cover about \d+% "
                     r"of the ground\.$", small.last.text)
    small.adopt_detections("building", [])
    assert small._scene_opening(None) is None  # nothing found: the model's scene stays
    assert engine.session(chip(10.0))._scene_opening(None) is None  # 640 m: a scene


def test_the_sizes_a_description_gives_are_the_boxes_footprints() -> None:
    from rsvlm.perception import FOOTPRINT_SHARE, sizes_sentence

    hectare = 10_000.0
    # Four boxes of 0.1 x 0.1 (100 m² each, 60 m² as footprints) and one of 0.3 x 0.2 in the
    # bottom right (600 m², 360 m² as a footprint).
    small = [Detection("building", 0.9, (0.1 * i, 0.0, 0.1 * i + 0.1, 0.1)) for i in range(4)]
    large = Detection("building", 0.8, (0.7, 0.75, 1.0, 0.95))
    said = sizes_sentence([*small, large, Detection("tree", 0.9, (0.5, 0.5, 0.9, 0.9))],
                          "building", hectare)
    cover = (4 * 0.01 + 0.06) * FOOTPRINT_SHARE
    assert said == ("Most buildings are about 60 m² (estimated from their boxes); the largest, "
                    f"about 360 m², is in the bottom right. Together they cover about "
                    f"{cover:.0%} of the ground.")
    assert "60-360 m²" in sizes_sentence([*small[:2], large, large, large], "building", hectare)
    # Nothing to say without a ground resolution, or of fewer than two.
    assert sizes_sentence([*small, large], "building", None) is None
    assert sizes_sentence([large], "building", hectare) is None


def test_a_count_is_the_detections_times_the_factor_rounded_half_up() -> None:
    cfg = DetectorConfig(labels=["building", "aircraft"], count_factor=1.1,
                         class_thresholds={"aircraft": [0.35, 0.4]})
    assert [cfg.count_of("building", n) for n in (0, 1, 4, 5, 10, 15)] == [0, 1, 4, 6, 11, 17]
    assert cfg.count_of("aircraft", 10) == 10  # a class of its own thresholds counts 1:1
    assert DetectorConfig().count_of("building", 7) == 7
    # Shrinking never says "none" of what was found.
    assert DetectorConfig(count_factor=0.4).count_of("building", 1) == 1
