"""Falcon / original Florence-2 layout -> transformers layout, without remote code.

A tiny native Florence-2 is written back into the original remote-code layout (the inverse of
the conversion's key table, the projection transposed, the vocabulary without ``<image>``), then
converted: the converted model must compute the same logits and tokenise the location tokens
to the same ids."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from rsvlm.backends.florence2 import convert_original, is_original_layout, key_mapping
from rsvlm.backends.tiny import _bpe, write_tiny_checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _original_layout(native: Path, out: Path) -> tuple[torch.nn.Module, int]:
    from safetensors.torch import save_file
    from transformers import BartTokenizer, Florence2ForConditionalGeneration

    from rsvlm.backends.florence2 import ORIGINAL_ADDED_TOKENS

    model = Florence2ForConditionalGeneration.from_pretrained(str(native)).eval()
    out.mkdir(parents=True)
    vocab, merges = _bpe()
    specials = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    BartTokenizer(vocab={**specials, **{k: v + 4 for k, v in vocab.items()},
                         "<mask>": len(vocab) + 4}, merges=merges).save_pretrained(str(out))
    n_orig = len(vocab) + 5 + len(ORIGINAL_ADDED_TOKENS)  # no <image> in the original vocabulary
    vc = model.config.vision_config
    text = model.config.text_config.to_dict()
    text["vocab_size"] = n_orig
    config = {"model_type": "florence2", "auto_map": {"AutoConfig": "configuration_florence2.Florence2Config"},
              "projection_dim": vc.projection_dim, "text_config": text,
              "vision_config": {"model_type": "davit", "dim_embed": list(vc.embed_dim),
                                "depths": list(vc.depths), "num_heads": list(vc.num_heads),
                                "num_groups": list(vc.num_groups), "window_size": vc.window_size,
                                "patch_size": list(vc.patch_size), "patch_stride": list(vc.patch_stride),
                                "patch_padding": list(vc.patch_padding),
                                "patch_prenorm": list(vc.patch_prenorm),
                                "projection_dim": vc.projection_dim,
                                "visual_temporal_embedding": {"type": "COSINE", "max_temporal_embeddings": 100},
                                "image_pos_embed": {"type": "learned_abs_2d",
                                                    "max_pos_embeddings": vc.max_position_embeddings}}}
    assert is_original_layout(config)
    (out / "config.json").write_text(json.dumps(config))
    pre = json.loads((native / "processor_config.json").read_text())["image_processor"]
    pre.update(image_processor_type="CLIPImageProcessor", processor_class="Florence2Processor")
    (out / "preprocessor_config.json").write_text(json.dumps(pre))
    state = model.state_dict()
    original_lm = [k.replace("model.language_model.", "language_model.model.")
                   for k in state if k.startswith("model.language_model.")]
    inverse = {new: old for old, new in key_mapping(model.config, original_lm).items()}
    weights = {}
    for new, tensor in state.items():
        old = inverse.get(new)
        if old is None:
            continue
        if old == "image_projection":
            tensor = tensor.t()
        if tensor.dim() == 2 and tensor.shape[0] == model.config.text_config.vocab_size:
            tensor = tensor[:n_orig]  # the rows of the original vocabulary
        weights[old] = tensor.contiguous().clone()
    save_file(weights, str(out / "model.safetensors"))
    return model, n_orig


def test_original_layout_converts_to_the_same_model(tmp_path: Path) -> None:
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    native_dir = write_tiny_checkpoint("florence2", tmp_path / "native")
    native, n_orig = _original_layout(native_dir, tmp_path / "original")
    out = convert_original(tmp_path / "original", tmp_path / "converted", instruction_following=True)
    converted = Florence2ForConditionalGeneration.from_pretrained(str(out)).eval()
    processor = AutoProcessor.from_pretrained(str(out))
    native_processor = AutoProcessor.from_pretrained(str(native_dir))
    for token in ("<loc_0>", "<loc_999>", "<od>", "<image>"):
        assert processor.tokenizer.convert_tokens_to_ids(token) == \
            native_processor.tokenizer.convert_tokens_to_ids(token)
    assert converted.get_input_embeddings().weight.shape[0] % 64 == 0
    from PIL import Image

    image = Image.new("RGB", (80, 60), (120, 90, 60))
    inputs = processor(text=["<OD>"], images=[image], return_tensors="pt")
    decoder = torch.tensor([[2, 0, 100, 200]])
    with torch.no_grad():
        a = native(**inputs, decoder_input_ids=decoder).logits[..., :n_orig]
        b = converted(**inputs, decoder_input_ids=decoder).logits[..., :n_orig]
    assert torch.allclose(a, b, atol=1e-5)
    assert json.loads((out / "rsvlm_conversion.json").read_text())["instruction_following"]


def test_a_native_checkpoint_is_not_converted(tmp_path: Path) -> None:
    native_dir = write_tiny_checkpoint("florence2", tmp_path / "native")
    with pytest.raises(ValueError, match="not a Florence-2 checkpoint in the original layout"):
        convert_original(native_dir, tmp_path / "out")


def test_loading_an_original_layout_converts_once_into_the_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rsvlm.loading import load

    monkeypatch.setenv("RSVLM_CACHE", str(tmp_path / "cache"))
    native_dir = write_tiny_checkpoint("florence2", tmp_path / "native")
    _original_layout(native_dir, tmp_path / "falcon-tiny")
    said: list[str] = []
    loaded = load(str(tmp_path / "falcon-tiny"), device="cpu", progress=said.append)
    assert loaded.family.name == "florence2" and loaded.family.instruction_following
    assert any("Converting" in m for m in said)
    converted = list((tmp_path / "cache" / "converted").iterdir())
    assert len(converted) == 1 and (converted[0] / "config.json").is_file()
    said.clear()
    load(str(tmp_path / "falcon-tiny"), device="cpu", progress=said.append)
    assert not any("Converting" in m for m in said)  # once


def test_unknown_runtime_tokens_are_refused(tmp_path: Path) -> None:
    native_dir = write_tiny_checkpoint("florence2", tmp_path / "native")
    _original_layout(native_dir, tmp_path / "original")
    config = json.loads((tmp_path / "original" / "config.json").read_text())
    config["text_config"]["vocab_size"] += 7  # a processor that adds tokens we do not know
    (tmp_path / "original" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="adds tokens this converter does not know"):
        convert_original(tmp_path / "original", tmp_path / "out")
