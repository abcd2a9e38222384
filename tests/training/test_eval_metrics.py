import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from training.build import BuildConfig, build_dataset
from training.evaluate import eval_classification, run_eval
from training.metrics import (
    box_iou,
    caption_scores,
    match_boxes,
    match_choice,
    normalize,
    vqa_correct,
)
from training.region import load_region

CLASSES = ["bare land", "dense residential", "forest", "medium residential", "residential"]


@pytest.mark.parametrize("answer, expected", [
    ("forest", "forest"), ("Forest.", "forest"), ("The image shows a FOREST area", "forest"),
    ("forests", "forest"), ("dense residential", "dense residential"),
    ("This is a dense residential area.", "dense residential"), ("bareland", "bare land"),
    ("Bare_Land", "bare land"), ("forrest", "forest"), ("I am not sure", None), ("", None),
    ("residential, not forest", "residential"),
])
def test_match_choice(answer: str, expected: str | None) -> None:
    assert match_choice(answer, CLASSES) == expected


@pytest.mark.parametrize("pred, truth, qtype, ok", [
    ("Yes, there is.", "yes", "presence", True), ("no", "yes", "presence", False),
    ("There are three buildings.", "3", "counting", True), ("3 or 4", "4", "counting", False),
    ("It is an urban area.", "urban", "rural_urban", True), ("rural", "urban", "rural_urban", False),
    ("between 100 m2 and 1000 m2", "between 100 m² and 1000 m²", "area", True),
    ("more than 1000 m²", "between 100 m² and 1000 m²", "area", False),
    ("Nope, none.", "no", "comparison", True),
])
def test_vqa_correct(pred: str, truth: str, qtype: str, ok: bool) -> None:
    assert vqa_correct(pred, truth, qtype) is ok


def test_iou_is_plain_pixel_iou() -> None:
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(1 / 3)
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0  # touching: no +1 overlap
    assert box_iou([0, 0, 1, 1], [1, 1, 2, 2]) == 0.0
    assert match_boxes([[0, 0, 10, 10], [0, 0, 10, 10]], [[0, 0, 10, 10], [50, 50, 60, 60]]) == 1
    assert normalize("There are Three buildings!") == "there are 3 buildings"


def test_caption_scores_rank_good_above_bad() -> None:
    refs = {"a": ["a dense area with many small buildings", "many small buildings close together"],
            "b": ["a road crosses farmland", "farmland with a road"]}
    good = caption_scores({"a": "a dense area with many small buildings",
                           "b": "a road crosses farmland"}, refs, meteor=False)
    bad = caption_scores({"a": "a ship in a harbor", "b": "snow on a mountain"}, refs,
                         meteor=False)
    assert good["BLEU-4"] > 0.9 and bad["BLEU-4"] < 0.1
    assert good["CIDEr"] > bad["CIDEr"] and good["ROUGE-L"] > bad["ROUGE-L"]
    assert good["METEOR"] is None


def _color_classifier(image, question: str) -> str:
    r, g, _ = np.asarray(image).reshape(-1, 3).mean(0)
    label = "Forest" if g > r else ("bare land" if r > 180 else "Dense Residential")
    assert "Choose the best category" in question and "forest" in question
    return f"The answer is {label}."


def test_classification_eval_with_fake_answers(image_folder: Path) -> None:
    report = eval_classification(image_folder, _color_classifier)
    assert report["n"] == 12 and report["accuracy"] == 1.0 and report["unmatched"] == 0
    const = eval_classification(image_folder, lambda im, q: "bare land")
    assert const["accuracy"] == pytest.approx(1 / 3)
    assert const["per_class"] == {"bare land": 1.0, "dense residential": 0.0, "forest": 0.0}
    limited = eval_classification(image_folder, _color_classifier, limit=5)
    assert limited["n"] == 5 and len(limited["per_class"]) == 3
    assert report["retrieval_top1"] is None  # an answer function that retrieves nothing


def test_classification_eval_scores_the_retriever_apart_from_the_answer(
        image_folder: Path) -> None:
    """An engine-like answer function exposes what it retrieved; the report scores its top hit."""
    def answer(image, question: str) -> str:
        truth = _color_classifier(image, question).removeprefix("The answer is ").rstrip(".")
        # The retriever is right about forests only; the answer is always right.
        cls = "forest" if truth == "Forest" else "airport"
        answer.retrieved = [{"text": f"an aerial image of a {cls}", "cls": cls}]
        return truth

    report = eval_classification(image_folder, answer)
    assert report["accuracy"] == 1.0
    assert report["retrieval_top1"] == pytest.approx(1 / 3)  # 4 of the 12 images are forests


@pytest.fixture(scope="module")
def oracle(small_region: Path, tmp_path_factory: pytest.TempPathFactory):
    """Answers looked up in a dataset built with the same seed (val_fraction 0)."""
    out = tmp_path_factory.mktemp("oracle")
    spec = load_region(small_region, chip_size=256, val_fraction=0.0)
    build_dataset(out, [spec], [], BuildConfig(seed=0, balance=False), progress=False)
    chips = {json.loads(line)["id"].split("/")[-1]: json.loads(line)
             for line in (out / "chips.jsonl").read_text().splitlines()}
    by_bounds = {tuple(round(v, 1) for v in c["bounds"]): c["image"] for c in chips.values()}
    table = {}
    for line in (out / "train.jsonl").read_text().splitlines():
        r = json.loads(line)
        q = r["conversations"][0]["value"].removeprefix("<image>\n")
        table[(r["image"], q)] = r["conversations"][1]["value"]

    def lookup(chip, question: str) -> str:
        image = by_bounds[tuple(round(v, 1) for v in chip.bounds)]
        return table[(image, question)]

    return small_region, lookup


def test_vqa_eval_oracle_and_constant(oracle) -> None:
    region, lookup = oracle
    verbose = run_eval("vqa", region, lambda c, q: f"I think: {lookup(c, q)}.",
                       region_overrides={"chip_size": 256}, progress=False)
    assert verbose["accuracy"] == 1.0 and verbose["n"] > 20
    assert {"presence", "counting", "rural_urban"} <= set(verbose["per_type"])
    yes = run_eval("vqa", region, lambda c, q: "yes", region_overrides={"chip_size": 256},
                   progress=False)
    assert 0 < yes["per_type"]["presence"] < 1 and yes["per_type"]["counting"] == 0


def test_grounding_eval_oracle_and_shifted(oracle) -> None:
    region, lookup = oracle
    exact = run_eval("grounding", region, lookup, region_overrides={"chip_size": 256},
                     progress=False)
    assert exact["n"] > 5 and exact["acc@0.5"] == 1.0 and exact["mean_iou"] > 0.9
    assert exact["find_all"]["f1"] == pytest.approx(1.0)

    def shifted(chip, q):  # every box moved right by its own width: IoU 0
        def move(m):
            x1, y1, x2, y2 = map(int, m.groups()[1:])
            w = x2 - x1
            return f"<ref>{m.group(1)}</ref><box>[{x1 + w},{y1},{x2 + w},{y2}]</box>"
        return re.sub(r"<ref>([^<]*)</ref><box>\[(\d+),(\d+),(\d+),(\d+)\]</box>", move,
                      lookup(chip, q))

    off = run_eval("grounding", region, shifted, region_overrides={"chip_size": 256},
                   progress=False)
    assert off["acc@0.5"] == 0.0 and off["mean_iou"] < 0.05
    none = run_eval("grounding", region, lambda c, q: "no idea",
                    region_overrides={"chip_size": 256}, progress=False)
    assert none["no_box"] == none["n"] and none["acc@0.5"] == 0.0


def test_captioning_eval(oracle) -> None:
    from training.evaluate import eval_captioning

    region, _ = oracle
    spec = load_region(region, chip_size=256, val_fraction=0.0)
    parrot = eval_captioning(spec, lambda c, q: "a dense area of buildings", meteor=False)
    assert parrot["n"] == 4 and 0 <= parrot["BLEU-4"] < 0.5
    assert set(parrot) >= {"BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    assert parrot["METEOR"] is None


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR runs a Java jar")
def test_meteor_through_java() -> None:
    refs = {"a": ["a dense area with many small buildings"], "b": ["a road crosses farmland"]}
    good = caption_scores({"a": "a dense area with many small buildings",
                           "b": "a road crosses farmland"}, refs)
    bad = caption_scores({"a": "a ship in a harbor", "b": "snow on a mountain"}, refs)
    assert isinstance(good["METEOR"], float) and good["METEOR"] > 0.9 > bad["METEOR"]


@pytest.fixture(scope="module")
def split_dataset(small_region: Path, image_folder: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("split")
    spec = load_region(small_region, chip_size=128, val_fraction=0.3, block_chips=1)
    build_dataset(out, [spec], [image_folder], BuildConfig(seed=0, balance=False),
                  folder_val_fraction=0.4, progress=False)
    return out


def _split_table(data: Path, split: str) -> dict:
    """(image pixels, question) -> the dataset's own answer."""
    from PIL import Image

    table = {}
    for line in (data / f"{split}.jsonl").read_text().splitlines():
        r = json.loads(line)
        with Image.open(data / r["image"]) as im:
            key = im.convert("RGB").tobytes()
        table[(key, r["conversations"][0]["value"].removeprefix("<image>\n"))] = (
            r["conversations"][1]["value"])
        if r["task"] == "caption":
            table.setdefault(("caption", key), r["conversations"][1]["value"])
    return table


def _bytes(image) -> bytes:
    """The pixels of what an answer function is given: a region chip or a plain image."""
    return (image.to_image() if hasattr(image, "to_image") else image).tobytes()


def test_eval_scores_exactly_the_held_back_split(split_dataset: Path) -> None:
    val = _split_table(split_dataset, "val")
    train = _split_table(split_dataset, "train")

    def oracle(image, question: str) -> str:
        return val[(_bytes(image), question)]  # a KeyError if a training item were asked

    for task in ("classification", "vqa", "grounding"):
        report = run_eval(task, split_dataset, oracle, progress=False)
        assert report["split"] == "val" and report["n"] > 0, task
        score = report["acc@0.5"] if task == "grounding" else report["accuracy"]
        assert score == 1.0, task
    cls = run_eval("classification", split_dataset, lambda im, q: "forest", progress=False)
    assert 0 < cls["accuracy"] < 1 and set(cls["classes"]) == {
        "bare land", "dense residential", "forest"}
    caps = run_eval("captioning", split_dataset, oracle_caption(val), progress=False)
    assert caps["n"] > 0 and caps["CIDEr"] > 1.0
    on_train = run_eval("vqa", split_dataset, lambda im, q: train[(_bytes(im), q)],
                        split="train", progress=False)
    assert on_train["accuracy"] == 1.0
    limited = run_eval("vqa", split_dataset, oracle, limit=3, progress=False)
    assert limited["n"] == 3


def oracle_caption(table: dict):
    return lambda image, q: table[("caption", _bytes(image))]


def test_held_back_region_chips_are_asked_on_their_ground(split_dataset: Path) -> None:
    """The app asks about a GeoTIFF's chip with its georeference (answers in m², zoom by
    ground resolution); the held-back split's region chips are asked the same way, at the
    ground resolution build-data recorded, and an ImageFolder photo stays a plain image."""
    from rsvlm.answer import ground_sample_distance
    from training.dataset_files import read_chips

    gsd = {c["image"]: c["gsd_m"] for c in read_chips(split_dataset) if c.get("gsd_m")}
    seen: dict[str, list] = {"chip": [], "plain": []}

    def answer(image, question: str) -> str:
        if hasattr(image, "to_image"):
            seen["chip"].append(ground_sample_distance(image, (image.width, image.height)))
        else:
            seen["plain"].append(image)
        return "yes"

    run_eval("vqa", split_dataset, answer, progress=False)
    assert seen["chip"] and not seen["plain"]
    assert min(seen["chip"]) == pytest.approx(min(gsd.values()), rel=0.02)
    assert max(seen["chip"]) == pytest.approx(max(gsd.values()), rel=0.02)
    seen["chip"].clear()
    run_eval("captioning", split_dataset, answer, progress=False)
    assert seen["chip"] and seen["plain"]  # region chips and ImageFolder photos


def test_inference_time_ablations_switch_parts_off() -> None:
    from types import SimpleNamespace

    import torch

    from rsvlm.experts import expert_modules
    from rsvlm.testing import tiny_model
    from training.evaluate import ablate

    model = tiny_model(seed=0, experts_enabled=True)
    for wrapper in expert_modules(model):
        for expert in wrapper.experts:
            torch.nn.init.normal_(expert.expand.weight)  # as if trained
    loaded = SimpleNamespace(model=model, database=object())
    wrapper = expert_modules(model)[0]
    h = torch.randn(1, 5, model.config.text_config.hidden_size)
    assert not torch.allclose(wrapper(h), wrapper.base_layer(h))
    ablate(loaded, {"experts", "retrieval"})
    torch.testing.assert_close(wrapper(h), wrapper.base_layer(h))
    assert loaded.database is None
    with pytest.raises(ValueError, match="unknown ablation"):
        ablate(loaded, {"connector"})
    loaded.perception = object()
    ablate(loaded, {"detector"})
    assert loaded.perception is None
    with pytest.raises(ValueError, match="no detector"):
        ablate(loaded, {"detector"})
    with pytest.raises(ValueError, match="no semantic experts"):
        ablate(SimpleNamespace(model=tiny_model(seed=0, experts_enabled=False), database=None),
               {"experts"})


def test_count_scores_exact_mape_and_within_20_percent() -> None:
    from training.metrics import count_scores

    s = count_scores([(10, 10), (12, 10), (5, 10), (None, 4), (0, 0), (1, 0)])
    assert s["n"] == 6 and s["exact"] == pytest.approx(2 / 6)
    # within 20 %: 10/10, 12/10, 0/0 (a true 0 needs a 0)
    assert s["within_20pct"] == pytest.approx(3 / 6)
    # over true counts > 0: 0, 0.2, 0.5, 1.0 (no number)
    assert s["mape"] == pytest.approx((0 + 0.2 + 0.5 + 1.0) / 4) and s["no_number"] == 1
    assert count_scores([])["exact"] is None


def test_findall_eval_on_a_region_scores_boxes_and_counts(small_region: Path) -> None:
    from training.evaluate import findall_items, score_findall
    from training.samples import format_box

    spec = load_region(small_region, chip_size=256, val_fraction=0.0)
    items = findall_items(spec)
    assert any(m["boxes_px"] for _, _, m, _ in items) and all(
        q == "Find all buildings in the image." for _, q, _, _ in items)
    truth = {id(chip): (m["boxes_px"], size) for chip, _, m, size in items}

    def oracle(chip, q, dx=0.0):
        boxes, (w, h) = truth[id(chip)]
        return "".join(format_box("building", (b[0] + dx * (b[2] - b[0]), b[1],
                                               b[2] + dx * (b[2] - b[0]), b[3]), w, h)
                       for b in boxes)

    exact = score_findall(items, oracle)
    assert exact["f1"] == pytest.approx(1.0, abs=0.02) and exact["counting"]["exact"] == 1.0
    off = score_findall(items, lambda c, q: oracle(c, q, dx=1.0))
    # (a moved box can land on a neighbour)
    assert off["precision"] < 0.2 and off["recall"] < 0.2
    none = run_eval("findall", small_region, lambda c, q: "no idea",
                    region_overrides={"chip_size": 256}, progress=False)
    assert none["no_box"] == none["n"] == len(items) and none["recall"] == 0.0
    assert none["counting"]["within_20pct"] < 1.0


def test_findall_eval_on_a_held_back_split(split_dataset: Path) -> None:
    val = _split_table(split_dataset, "val")
    report = run_eval("findall", split_dataset, lambda im, q: val[(_bytes(im), q)],
                      progress=False)
    assert report["task"] == "findall" and report["n"] > 0 and report["f1"] == pytest.approx(1.0)
