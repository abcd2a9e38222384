"""Chat engine on a tiny random model: streaming, prefix-cache reuse, eviction, grounding."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from affine import Affine
from pyproj import CRS

from rsvlm.engine import ChatEngine
from rsvlm.testing import TINY_IMAGE_TOKEN_ID, tiny_model, tiny_processor


class _Loaded:
    def __init__(self, connector_type: str = "semantic_prompter", database=None) -> None:
        self.model = tiny_model(connector_type=connector_type, image_token_id=TINY_IMAGE_TOKEN_ID)
        self.processor = tiny_processor(self.model.config)
        self.database = database
        self.info = {"preset": "tiny"}


def _chip(georeferenced: bool = True):
    from tiles import Chip

    pixels = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    if georeferenced:  # 1 m pixels in UTM 36N, near Kampala
        return Chip(pixels=pixels, crs=CRS.from_epsg(32636), transform=Affine(1, 0, 455000, 0, -1, 39000), source="t")
    return Chip(pixels=pixels, crs=None, transform=Affine.identity(), source="t")


def _engine(**kwargs) -> ChatEngine:
    return ChatEngine(_Loaded(**kwargs), max_new_tokens=6, generation={"repetition_penalty": 1.0})


def test_ask_streams_and_records_timing() -> None:
    session = _engine().session(_chip())
    pieces = list(session.ask("how many buildings are there?"))
    answer = session.last
    assert answer is not None and answer.text == "".join(pieces).strip()
    assert answer.timing["new_tokens"] >= 1
    assert answer.timing["total_s"] >= answer.timing["first_token_s"] >= 0
    assert "how many buildings" in answer.prompt
    assert session.turns == [("how many buildings are there?", answer.text)]


@pytest.mark.parametrize("connector", ["mlp", "semantic_prompter"])
def test_follow_up_reuses_cache_and_matches_full_recompute(connector: str) -> None:
    engine = _engine(connector_type=connector)
    session = engine.session(_chip())
    list(session.ask("describe the image"))
    first_prefill = session.last.timing["prefill_tokens"]
    list(session.ask("what is near the road ?"))
    follow = session.last
    # Only the new turn is fed, not the image tokens again.
    assert follow.timing["prefill_tokens"] < first_prefill - engine.model.config.num_image_tokens + 1
    # The cached continuation generates what a full forward over the same tokens predicts.
    ids = session._ids
    n_new = follow.timing["new_tokens"]
    # The first turn's image-side inputs, as the engine built them.
    processor = engine.processor
    inputs = processor(text=processor.image_token, images=[session.image],
                       semantic_texts=[[r["text"] for r in session.retrieved]],
                       queries=["describe the image"])
    inputs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    with torch.inference_mode():
        logits = engine.model(input_ids=ids, **inputs).logits
    predicted = logits[0, -n_new - 1 : -1].argmax(-1)
    assert torch.equal(predicted, ids[0, -n_new:])


def test_evicted_session_recomputes_its_prefix() -> None:
    engine = ChatEngine(_Loaded(), max_cached_sessions=1, max_new_tokens=4)
    a, b = engine.session(_chip()), engine.session(_chip())
    list(a.ask("describe the image"))
    assert a._cache is not None
    list(b.ask("describe the image"))
    assert a._cache is None and b._cache is not None  # a was evicted
    list(a.ask("is there a road ?"))  # works, recomputing the whole conversation
    assert a.last.timing["prefill_tokens"] > engine.model.config.num_image_tokens
    assert len(a.turns) == 2


def test_region_box_enters_prompt_in_box_grammar() -> None:
    session = _engine().session(_chip())
    list(session.ask("what is this?", region_box_px=(10, 8, 50, 40)))
    assert "<box>[" in session.last.prompt and "In the region" in session.last.prompt


def test_grounding_georeferenced_and_pixel_space() -> None:
    session = _engine().session(_chip())
    text = "<ref>building</ref><box>[0,0,500,500]</box>"
    (box,) = session.ground(text)
    assert box.label == "building"
    assert box.box_px == pytest.approx((0, 0, 48, 32), abs=0.1)
    lons = [p[0] for p in box.to_dict()["geometry"]["coordinates"][0]]
    lats = [p[1] for p in box.to_dict()["geometry"]["coordinates"][0]]
    assert 32.0 < min(lons) < max(lons) < 33.5 and 0.2 < min(lats) < max(lats) < 0.5
    plain = _engine().session(_chip(georeferenced=False))
    (box,) = plain.ground(text)
    assert box.geometry is None and box.box_px == pytest.approx((0, 0, 48, 32), abs=0.1)
    # A looping answer repeats one box: one detection; a different box or label stays.
    looped = text * 4 + "<ref>building</ref><box>[0,0,400,500]</box>" + text.replace(
        "building", "road")
    assert [b.label for b in plain.ground(looped)] == ["building", "building", "road"]


def test_empty_question_is_a_clear_error() -> None:
    session = _engine().session(_chip())
    with pytest.raises(ValueError, match="empty"):
        list(session.ask("   "))


def test_cancel_stops_generation() -> None:
    engine = ChatEngine(_Loaded(), max_new_tokens=200, generation={"min_new_tokens": 200})
    session = engine.session(_chip())
    stream = session.ask("describe the image")
    next(stream)
    session.cancel()
    list(stream)
    assert session.last.timing["new_tokens"] < 200


def test_generation_out_of_memory_is_a_readable_error(monkeypatch) -> None:
    engine = _engine()
    session = engine.session(_chip())

    def oom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine.model, "generate", oom)
    with pytest.raises(RuntimeError, match="ran out of memory.*--model embedded"):
        list(session.ask("describe the image"))
    assert session._cache is None and session.turns == []


def test_suppressed_tokens_match_transformers_processors() -> None:
    """The engine's cheap `_SuppressTokens` does what generate()'s ``suppress_tokens`` and
    ``min_new_tokens`` processors do, at every length around the minimum."""
    from transformers import MinNewTokensLengthLogitsProcessor, SuppressTokensLogitsProcessor

    from rsvlm.engine import _SuppressTokens

    generator = torch.Generator().manual_seed(0)
    suppress, eos, prompt, min_new = [7, 3], [2, 11], 5, 3
    ours = _SuppressTokens(suppress, eos, prompt + min_new)
    theirs = [
        SuppressTokensLogitsProcessor(suppress),
        MinNewTokensLengthLogitsProcessor(prompt, min_new, eos),
    ]
    for length in range(prompt, prompt + min_new + 2):
        ids = torch.randint(0, 20, (2, length), generator=generator)
        scores = torch.randn(2, 20, generator=generator)
        want = scores.clone()
        for processor in theirs:
            want = processor(ids, want)
        torch.testing.assert_close(ours(ids, scores.clone()), want)


def test_generate_kwargs_hand_suppression_to_the_cheap_processor() -> None:
    engine = ChatEngine(_Loaded(), generation={"min_new_tokens": 4})
    kwargs = engine.generate_kwargs(10)
    assert "suppress_tokens" not in kwargs and "min_new_tokens" not in kwargs
    (processor,) = kwargs["logits_processor"]
    assert processor.eos_from == 14 and TINY_IMAGE_TOKEN_ID in processor.always.tolist()
    assert engine.generation["suppress_tokens"] == [TINY_IMAGE_TOKEN_ID]  # settings unchanged


def test_a_yes_or_no_question_gets_yes_or_no() -> None:
    """A 135M model answered "Is there a swimming pool?" with "over 100 m²": a yes/no question
    now gets one of the two words, even from a random model that would say anything; other
    questions keep the model's own words, and `--ablate answer_form` gives them back."""
    engine = _engine()
    for question in ("Is there a swimming pool?", "Are there any trees?", "Is the road paved?"):
        session = engine.session(_chip())
        assert "".join(session.ask(question)) in {"yes", "no"}
        assert session.last.timing["new_tokens"] == 1
        assert "".join(session.ask("And is there a car?")) in {"yes", "no"}  # a follow-up
    open_ = engine.session(_chip())
    assert "".join(open_.ask("What is in the image?")).strip() not in {"yes", "no"}
    # Asked for one word, as the training data asks: once, whether the question said it or not.
    from rsvlm.prompting import ONE_WORD

    asked = engine.session(_chip())
    list(asked.ask(f"Is there a road? {ONE_WORD}"))
    assert asked.last.prompt.count(ONE_WORD) == 1
    from training.evaluate import ablate

    loaded = _Loaded()
    ablate(loaded, {"answer_form"})
    free = ChatEngine(loaded, max_new_tokens=6, generation={"repetition_penalty": 1.0})
    assert not free.answer_forms
    assert "".join(free.session(_chip()).ask("Is there a swimming pool?")).strip() not in {
        "yes", "no"}


@pytest.mark.parametrize("question, words", [
    ("Is there a swimming pool?", ["yes", "no"]),
    ("Are there more buildings than trees? Answer with a single word.", ["yes", "no"]),
    ("Can you see a road?", ["yes", "no"]),
    ("And is there a car?", ["yes", "no"]),  # a follow-up
    ("Can you describe this image?", None),  # a request
    ("Is there a road? Describe it.", None),  # asks more after its question
    ("What is in the image?", None),
    ("Is the area dense or sparse?", ["dense", "sparse"]),
    ("Is it a rural or an urban area? Answer with a single word.", ["rural", "urban"]),
    ("Is this a residential area or an industrial one?", ["residential", "industrial"]),
    ("Is the roof red, blue or green?", None),  # three: left to the model
    ("Is this a residential area or not?", ["yes", "no"]),
    ("Is it urban or rural or mixed?", None),
    ("What is it, a road or a river?", None),
])
def test_the_words_a_question_lets_its_answer_be(question: str, words: list[str] | None
                                                 ) -> None:
    from rsvlm.prompting import answer_options

    assert answer_options(question) == words


def test_a_choice_is_the_likelier_word_scored_whole() -> None:
    """"Is the area dense or sparse?" is answered with one of the two, the one whose tokens the
    model scores likelier after the prompt (asked for one word); a word of several tokens is
    scored token by token from the prompt's cache, as a full forward over it scores it."""
    from rsvlm.prompting import ONE_WORD

    engine = _engine()
    tok = engine.processor.tokenizer
    real_encode, real_decode = tok.encode, tok.decode
    tok.encode = lambda text, **k: [59, 31] if text == "dense" else real_encode(text, **k)
    tok.decode = lambda ids, **k: "dense" if list(ids) == [59, 31] else real_decode(ids, **k)
    session = engine.session(_chip())
    answer = "".join(session.ask("Is the area dense or sparse?"))
    scores = dict(re.findall(r"(dense|sparse) (-?\d+\.\d+)", session.last.prompt))
    assert answer == max(scores, key=lambda w: float(scores[w]))
    # The same scores from full forwards over the prompt and each word's tokens.
    prompt = session.last.prompt.split("\n(the likelier")[0]
    inputs = engine.processor(text=prompt, images=[session.image],
                              semantic_texts=[[r["text"] for r in session.retrieved]],
                              queries=[f"Is the area dense or sparse? {ONE_WORD}"])
    ids = inputs.pop("input_ids")
    inputs.pop("attention_mask", None)
    with torch.inference_mode():
        full = engine.model(input_ids=torch.cat([ids, torch.tensor([[59]])], 1), **inputs).logits
    logp = full[0].float().log_softmax(-1)
    n = ids.shape[1]
    assert float(scores["dense"]) == pytest.approx(float(logp[n - 1, 59] + logp[n, 31]), abs=0.01)
    assert float(scores["sparse"]) == pytest.approx(float(logp[n - 1, 60]), abs=0.01)
    assert session.turns[-1] == ("Is the area dense or sparse?", answer)
    # A follow-up after it encodes the conversation afresh and still answers.
    assert "".join(session.ask("And is it rural or urban?")) in {"rural", "urban"}
    tok.encode, tok.decode = real_encode, real_decode


def test_an_eval_answer_function_says_who_ran_the_decode_and_the_tower(monkeypatch) -> None:
    # `rsvlm-train eval` writes these into its report: a number is read with the tower it was
    # measured with. A model without a detector reads no tower (None).
    import rsvlm.loading
    from training.evaluate import engine_answer_fn

    monkeypatch.setattr(rsvlm.loading, "load", lambda model, device=None: _Loaded())
    monkeypatch.setenv("RSVLM_DECODE", "torch")
    answer = engine_answer_fn("tiny", max_new_tokens=2)
    assert answer.engine == {"decode": "torch", "detector_tower": None}
    assert isinstance(answer(_chip(), "Is there a road?"), str)
