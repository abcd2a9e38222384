"""The box head: shapes, selection, config checks, save/load, and the chat engine placing boxes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rsvlm.box_head import BoxHead, select_boxes, sincos_2d
from rsvlm.boxes import parse_boxes, replace_boxes
from rsvlm.configuration import RSVLMConfig
from rsvlm.engine import ChatEngine
from rsvlm.testing import TINY_IMAGE_TOKEN_ID, tiny_config, tiny_model, tiny_processor
from training.model_setup import set_trainable


def test_head_gives_every_patch_a_logit_and_an_ordered_box_inside_the_image() -> None:
    torch.manual_seed(0)
    head = BoxHead(vision_hidden=8, num_levels=2, text_hidden=12, grid=4, dim=16, layers=1,
                   heads=2).eval()
    levels = [torch.randn(3, 16, 8) for _ in range(2)]
    text, mask = torch.randn(3, 5, 12), torch.ones(3, 5, dtype=torch.long)
    mask[1, 2:] = 0
    logits, boxes = head(levels, text, mask)
    assert logits.shape == (3, 16) and boxes.shape == (3, 16, 4)
    assert boxes.min() >= 0 and boxes.max() <= 1
    assert (boxes[..., 2] >= boxes[..., 0]).all() and (boxes[..., 3] >= boxes[..., 1]).all()
    # Padding is ignored: what stands in the padded positions changes nothing.
    text2 = text.clone()
    text2[1, 2:] = 100.0
    assert torch.allclose(head(levels, text2, mask)[0][1], logits[1], atol=1e-5)
    # The question matters.
    assert not torch.allclose(head(levels, torch.randn(3, 5, 12), mask)[0], logits)
    with pytest.raises(ValueError, match="4x4 patches"):
        head([torch.randn(1, 9, 8)] * 2, text[:1], mask[:1])


def test_position_codes_differ_per_patch() -> None:
    codes = sincos_2d(4, 16)
    assert codes.shape == (16, 16)
    assert torch.cdist(codes, codes).add(torch.eye(16)).min() > 0.1
    with pytest.raises(ValueError):
        sincos_2d(4, 18)


def test_select_one_box_or_every_confident_distinct_box() -> None:
    logits = torch.tensor([3.0, 2.5, -1.0, 1.0])
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.02, 0.0, 0.5, 0.5],  # a duplicate of the first
                          [0.5, 0.5, 1.0, 1.0], [0.6, 0.0, 1.0, 0.3]])
    (only,) = select_boxes(logits, boxes, single=True)
    assert only[1] == pytest.approx([0.0, 0.0, 0.5, 0.5])
    found = select_boxes(logits, boxes, single=False, threshold=0.5)
    assert [b for _, b in found] == [pytest.approx([0.0, 0.0, 0.5, 0.5]),
                                     pytest.approx([0.6, 0.0, 1.0, 0.3])]
    # Nothing confident: still the best one (the LM said there is something to find).
    assert len(select_boxes(logits - 10, boxes, single=False)) == 1
    assert len(select_boxes(logits + 10, boxes, single=False, max_boxes=2)) == 2


def test_replace_boxes_keeps_the_text_and_drops_an_unfinished_box() -> None:
    text = ("Found: <ref>building</ref><box>[1,2,3,4]</box><ref>building</ref>"
            "<box>[5,6,7,8]</box> done <ref>building</ref><box>[0,")
    out = replace_boxes(text, [("building", (100, 200, 300, 400)), ("building", (0, 0, 10, 10))])
    assert out == ("Found: <ref>building</ref><box>[100,200,300,400]</box><ref>building</ref>"
                   "<box>[0,0,10,10]</box> done ")
    assert [b.box_norm for b in parse_boxes(out)] == [(100, 200, 300, 400), (0, 0, 10, 10)]
    assert replace_boxes("no boxes here", [("a", (0, 0, 1, 1))]) == "no boxes here"


def test_config_validates_the_box_head() -> None:
    assert RSVLMConfig().box_head_dim is None
    assert tiny_config(box_head_dim=16).patch_grid == 2
    for bad in ({"box_head_dim": 18}, {"box_head_dim": 16, "box_head_heads": 3},
                {"box_head_dim": 16, "box_head_layers": 0},
                {"box_head_dim": 16, "box_head_threshold": 1.0}):
        with pytest.raises(ValueError, match="box_head"):
            tiny_config(**bad)


def test_model_box_head_saves_loads_and_stays_out_of_models_without_it(tmp_path) -> None:
    from rsvlm.modeling import RSVLMForConditionalGeneration

    assert tiny_model().box_head is None
    with pytest.raises(ValueError, match="no box head"):
        tiny_model().predict_boxes(torch.zeros(1, 3, 28, 28), torch.ones(1, 2, dtype=torch.long),
                                   torch.ones(1, 2, dtype=torch.long))
    model = tiny_model(box_head_dim=16, box_head_layers=1, box_head_heads=2)
    counts = set_trainable(model, vision_tower=False, connector=False, language_model=False,
                                 experts=False, retrieval_projection=False, box_head=True)
    assert counts["box_head"] == sum(p.numel() for p in model.box_head.parameters()) > 0
    assert sum(counts.values()) == counts["box_head"]
    pixels = torch.rand(2, 3, 28, 28)
    ids, mask = torch.tensor([[5, 6, 7], [8, 9, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    logits, boxes = model.predict_boxes(pixels, ids, mask)
    assert logits.shape == (2, 4) and boxes.shape == (2, 4, 4)
    model.save_pretrained(tmp_path)
    again = RSVLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    logits2, boxes2 = again.predict_boxes(pixels, ids, mask)
    assert torch.allclose(logits, logits2, atol=1e-5) and torch.allclose(boxes, boxes2, atol=1e-5)


class _Loaded:
    def __init__(self, box_head: bool) -> None:
        overrides = {"box_head_dim": 16, "box_head_layers": 1, "box_head_heads": 2} if box_head else {}
        self.model = tiny_model(image_token_id=TINY_IMAGE_TOKEN_ID, **overrides)
        self.processor = tiny_processor(self.model.config)
        self.database = None
        self.info = {"preset": "tiny"}


def _session(box_head: bool):
    from affine import Affine
    from pyproj import CRS

    from tiles import Chip

    pixels = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    chip = Chip(pixels=pixels, crs=CRS.from_epsg(32636),
                transform=Affine(1, 0, 455000, 0, -1, 39000), source="t")
    engine = ChatEngine(_Loaded(box_head), max_new_tokens=4,
                        generation={"repetition_penalty": 1.0})
    return engine.session(chip)


def test_engine_places_the_lms_boxes_with_the_head() -> None:
    session = _session(box_head=True)
    lm_text = "It is here: <ref>building</ref><box>[0,0,1000,1000]</box>"
    placed = session._place_boxes(lm_text, "Where is the largest building?")
    (box,) = parse_boxes(placed)
    assert placed.startswith("It is here: <ref>building</ref><box>[")
    # The head's own best box for this question.
    engine = session.engine
    ids, mask = engine.processor.encode_queries(["Where is the largest building?"])
    with torch.no_grad():
        logits, boxes = engine.model.predict_boxes(session._pixel_values(), ids, mask)
    best = boxes[0, logits[0].argmax()] * 1000
    assert box.box_norm == pytest.approx(tuple(best.round().tolist()), abs=1)
    # Several boxes written: the head's every confident box (at least one), same label.
    many = session._place_boxes(lm_text + "<ref>building</ref><box>[1,1,2,2]</box>", "Find all")
    assert {b.label for b in parse_boxes(many)} == {"building"}
    # One box written for a question about every instance: the head says how many, at the
    # model's threshold.
    every = "Find all buildings in the image."
    ids, mask = engine.processor.encode_queries([every])
    with torch.no_grad():
        logits, boxes = engine.model.predict_boxes(session._pixel_values(), ids, mask)
    engine.model.config.box_head_threshold = float(logits[0].sigmoid().sort().values[1]) - 1e-6
    found = select_boxes(logits[0], boxes[0], single=False,
                         threshold=engine.model.config.box_head_threshold)
    assert len(found) > 1
    assert len(parse_boxes(session._place_boxes(lm_text, every))) == len(found)
    assert len(parse_boxes(session._place_boxes(lm_text, "Find the largest of all "
                                                         "buildings."))) == 1
    # No box written, or no head: the text stays as the LM wrote it.
    assert session._place_boxes("There are 3 buildings.", "How many?") == "There are 3 buildings."
    plain = _session(box_head=False)
    assert plain._place_boxes(lm_text, "Where?") == lm_text


def test_a_failing_head_keeps_the_lms_answer(monkeypatch) -> None:
    session = _session(box_head=True)

    def broken(*_, **__):
        raise RuntimeError("boom")

    monkeypatch.setattr(session.engine.model, "predict_boxes", broken)
    lm_text = "<ref>building</ref><box>[0,0,10,10]</box>"
    assert session._place_boxes(lm_text, "Where is the building?") == lm_text


def test_a_placed_answer_is_what_the_conversation_and_the_map_keep(monkeypatch) -> None:
    session = _session(box_head=True)
    monkeypatch.setattr(type(session), "_place_boxes",
                        lambda self, text, q: "<ref>building</ref><box>[0,0,500,500]</box>")
    list(session.ask("Where is the building?"))
    answer = session.last
    assert answer.text == "<ref>building</ref><box>[0,0,500,500]</box>"
    assert session.turns[-1][1] == answer.text
    assert [b.box_px for b in answer.boxes] == [pytest.approx((0, 0, 48, 32), abs=0.1)]
    # The LM's own cached coordinates are gone; the next turn encodes the conversation afresh.
    assert session._cache is None
    list(session.ask("And the road?"))
    assert session.last.timing["prefill_tokens"] > session.engine.model.config.num_image_tokens


def test_answer_boxes_carry_the_heads_scores(monkeypatch) -> None:
    """The head's confidence of each placed box reaches `Answer.boxes` (and so the map, the
    table and the exports); boxes the LM wrote itself have none."""
    session = _session(box_head=True)
    engine = session.engine
    question = "Where is the largest building?"
    real = type(session)._place_boxes

    def lm_wrote_a_box(self, text, q):  # the tiny LM writes noise: give it one box
        return real(self, "<ref>building</ref><box>[0,0,500,500]</box>", q)

    monkeypatch.setattr(type(session), "_place_boxes", lm_wrote_a_box)
    list(session.ask(question))
    ids, mask = engine.processor.encode_queries([question])
    with torch.no_grad():
        logits, boxes = engine.model.predict_boxes(session._pixel_values(), ids, mask)
    (best_score, _), = select_boxes(logits[0], boxes[0], single=True)
    (box,) = session.last.boxes
    assert box.score == pytest.approx(best_score, abs=1e-6)
    assert session.last.to_dict()["boxes"][0]["score"] == pytest.approx(best_score, abs=1e-4)
    plain = _session(box_head=False)
    assert [b.score for b in plain.ground("<ref>x</ref><box>[0,0,10,10]</box>")] == [None]


def test_trained_parts_missing_a_parts_tensors_are_refused(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    from rsvlm.loading import TRAINED_TENSORS, apply_trained_parts, save_trained_parts

    model = tiny_model(box_head_dim=16, box_head_layers=1, box_head_heads=2)
    save_trained_parts(model, tmp_path, base_preset="tiny", architecture={},
                       parts=["connector", "experts", "box_head"])
    fresh = tiny_model(box_head_dim=16, box_head_layers=1, box_head_heads=2, seed=1)
    apply_trained_parts(fresh, tmp_path)
    assert torch.equal(fresh.box_head.score.weight, model.box_head.score.weight)
    state = load_file(str(tmp_path / TRAINED_TENSORS))
    save_file({k: v for k, v in state.items() if not k.startswith("box_head.")},
              str(tmp_path / TRAINED_TENSORS))
    with pytest.raises(ValueError, match="lacks"):
        apply_trained_parts(tiny_model(box_head_dim=16, box_head_layers=1, box_head_heads=2),
                            tmp_path)
