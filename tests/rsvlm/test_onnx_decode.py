"""The ONNX Runtime decode step: same answers as PyTorch, cached by weights, used only where it can
run, and never during training."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from rsvlm import onnx_decode
from rsvlm.decoding import choose, resolve_mode
from rsvlm.engine import ChatEngine
from rsvlm.onnx_decode import OnnxDecode, OnnxDecodeStep
from rsvlm.testing import TINY_IMAGE_TOKEN_ID, tiny_model, tiny_processor

pytest.importorskip("onnxruntime")


class _Loaded:
    def __init__(self, model) -> None:
        self.model = model
        self.processor = tiny_processor(model.config)
        self.database = None
        self.info = {"preset": "tiny"}


def _model(**overrides):
    return tiny_model(image_token_id=TINY_IMAGE_TOKEN_ID, **overrides)


def _image():
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RSVLM_CACHE", str(tmp_path))
    return tmp_path / "onnx-decoders"


def _conversation(engine: ChatEngine) -> list[str]:
    session = engine.session(_image())
    answers = []
    for question in ("describe the image", "what is near the road ?", "how many buildings are there ?"):
        list(session.ask(question))
        answers.append(session.last.text)
    return answers


@pytest.mark.parametrize("connector", ["semantic_prompter", "mlp"])
def test_onnx_decode_gives_the_pytorch_answers_with_follow_ups(cache, connector) -> None:
    loaded = _Loaded(_model(connector_type=connector))
    settings = {"max_new_tokens": 8, "generation": {"repetition_penalty": 1.05}}
    torch_engine = ChatEngine(loaded, decode_backend="torch", **settings)
    onnx_engine = ChatEngine(loaded, decode_backend="onnx", **settings)
    assert torch_engine.decoder.name == "torch" and torch_engine.info["decode"] == "torch"
    assert onnx_engine.info["decode"] == "onnx"
    expected = _conversation(torch_engine)
    lengths = []
    run = onnx_engine.decoder.graph.run
    onnx_engine.decoder.graph.run = lambda ids, *a: lengths.append(ids.shape[1]) or run(ids, *a)
    got = _conversation(onnx_engine)
    assert got == expected
    # The graph really ran the decode steps (the first answer's first token comes from the
    # PyTorch prefill) and both follow-up prompts (several new tokens each).
    assert lengths.count(1) >= 3
    assert len([n for n in lengths if n > 1]) == 2
    assert all(len(a.split()) >= 2 for a in expected)  # answers long enough to need decode steps


def test_the_graph_includes_the_semantic_experts(cache) -> None:
    model = _model()
    decoder = OnnxDecodeStep.for_model(model)
    assert decoder.compare(model.language_model) < 1e-3
    with torch.no_grad():  # experts changed: the cached graph no longer matches this model
        for wrapper in model.semantic_experts():
            wrapper.experts[0].expand.weight.mul_(3.0)
    with pytest.raises(RuntimeError, match="disagrees"):
        decoder.compare(model.language_model)


def test_export_is_cached_under_a_hash_of_the_weights(cache, monkeypatch) -> None:
    model = _model()
    exports = []
    real_export = onnx_decode.export
    monkeypatch.setattr(
        onnx_decode, "export", lambda *a, **k: exports.append(1) or real_export(*a, **k)
    )
    first = OnnxDecodeStep.for_model(model)
    again = OnnxDecodeStep.for_model(_model())  # same seed, same weights: no second export
    assert len(exports) == 1 and again.path == first.path
    with torch.no_grad():
        model.language_model.get_input_embeddings().weight[5, 0] += 1.0
    changed = OnnxDecodeStep.for_model(model)
    assert len(exports) == 2 and changed.path != first.path
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        {first.path.parent.name, changed.path.parent.name}
    )


def test_int8_decoder_runs_and_says_so(cache) -> None:
    loaded = _Loaded(_model())
    engine = ChatEngine(loaded, decode_backend="onnx-int8", max_new_tokens=6)
    assert engine.info["decode"] == "onnx-int8"
    session = engine.session(_image())
    list(session.ask("describe the image"))
    assert session.last.timing["new_tokens"] >= 1 and engine.decoder.graph.steps >= 1


def test_auto_falls_back_to_pytorch_where_onnx_cannot_run(cache, monkeypatch) -> None:
    monkeypatch.delenv("RSVLM_DECODE", raising=False)
    model = _model().to(torch.bfloat16)
    assert onnx_decode.unsupported_reason(model) is not None
    assert choose(model, "auto").name == "torch"  # with a log line, no error
    with pytest.raises(RuntimeError, match="cannot run here"):
        choose(model, "onnx")
    assert not cache.exists()
    other_family = torch.nn.Linear(2, 2)  # e.g. a pretrained VLM backend's model
    assert choose(other_family, "auto").name == "torch"
    with pytest.raises(RuntimeError, match="built for rsvlm models"):
        choose(other_family, "onnx-int8")


def test_decode_backend_names(monkeypatch) -> None:
    monkeypatch.setenv("RSVLM_DECODE", "torch")
    assert resolve_mode("auto") == "torch" and resolve_mode("onnx-int8") == "onnx-int8"
    monkeypatch.delenv("RSVLM_DECODE")
    assert resolve_mode(None) == "onnx"
    with pytest.raises(ValueError, match="Unknown decode backend 'gguf'"):
        resolve_mode("gguf")


def test_hooked_decoder_is_bypassed_with_gradients_and_for_prompts(cache) -> None:
    model = _model()
    decoder = OnnxDecodeStep.for_model(model)
    strategy = OnnxDecode(decoder)
    from transformers import DynamicCache

    ids = torch.tensor([[4, 5, 6, 7]])
    more = torch.tensor([[9, 10, 11]])
    with strategy.hooked(model):
        cache_kv = DynamicCache(config=model.config.text_config)
        with torch.no_grad():
            model(input_ids=ids, past_key_values=cache_kv, use_cache=True)  # a prompt: PyTorch
        assert decoder.steps == 0
        model(input_ids=ids[:, :1], past_key_values=cache_kv, use_cache=True)  # grad: PyTorch
        assert decoder.steps == 0
        with torch.no_grad():
            out = model(input_ids=ids[:, :1], past_key_values=cache_kv, use_cache=True)
        assert decoder.steps == 1 and out.logits.shape == (
            1,
            1,
            model.config.text_config.vocab_size,
        )
        assert cache_kv.get_seq_length() == 6
        # A text continuation of several tokens (a follow-up prompt) runs in the graph too, with
        # the causal mask over the cache and the new tokens: same logits and cache as PyTorch.
        reference = copy.deepcopy(cache_kv)
        with torch.no_grad():
            out = model(input_ids=more, past_key_values=cache_kv, use_cache=True)
        assert decoder.steps == 2 and cache_kv.get_seq_length() == 9
    assert "forward" not in model.__dict__  # unhooked: the class's forward again
    with torch.no_grad():
        want = model(input_ids=more, past_key_values=reference, use_cache=True)
    assert decoder.steps == 2
    torch.testing.assert_close(out.logits[:, -1], want.logits[:, -1], atol=1e-4, rtol=1e-4)
    for got_layer, want_layer in zip(cache_kv.layers, reference.layers, strict=True):
        torch.testing.assert_close(got_layer.keys, want_layer.keys, atol=1e-4, rtol=1e-4)
    # Image or semantic tokens need their routing: PyTorch.
    with strategy.hooked(model), torch.no_grad():
        model(
            input_ids=more,
            past_key_values=cache_kv,
            token_types=torch.ones_like(more),
            use_cache=True,
        )
    assert decoder.steps == 2 and cache_kv.get_seq_length() == 12


def test_shape_folding_keeps_the_graph_exact_and_drops_shape_nodes(
    cache, tmp_path, monkeypatch
) -> None:
    """The traced graph re-computes its reshape sizes from the new-token count at every step;
    folding replaces that with constants (one unknown dimension becomes -1), same outputs."""
    import onnx

    from rsvlm.onnx_shapes import fold_shapes

    model = _model()
    lm = model.language_model
    raw = tmp_path / "raw.onnx"
    monkeypatch.setattr(onnx_decode, "_fold", lambda path: None)
    onnx_decode.export(lm, raw)
    changed = fold_shapes(raw, tmp_path / "folded.onnx")

    def count(path, op):
        return sum(n.op_type == op for n in onnx.load(str(path)).graph.node)

    assert changed["removed"] > 0
    assert count(tmp_path / "folded.onnx", "Shape") < count(raw, "Shape") / 2
    folded = OnnxDecodeStep(tmp_path / "folded.onnx", num_layers=lm.config.num_hidden_layers)
    assert folded.compare(lm) < 1e-4  # one and five new tokens, logits and keys/values
