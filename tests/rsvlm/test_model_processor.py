"""RSVLMProcessor: placeholder expansion, retrieved texts, chat templates, save/load, model fit."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from rsvlm.processing import RSVLMProcessor
from rsvlm.testing import (
    TINY_IMAGE_TOKEN_ID,
    tiny_config,
    tiny_model,
    tiny_processor,
    tiny_tokenizer,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _image(seed: int = 0, size: tuple[int, int] = (40, 56)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


MESSAGES = [{"role": "user", "content": "<image>\nhow many buildings are there ?"}]


@pytest.mark.parametrize("connector", ["mlp", "perceiver", "semantic_prompter"])
def test_expands_image_into_num_image_tokens(connector):
    config = tiny_config(connector_type=connector)
    processor = tiny_processor(config)
    batch = processor(messages=MESSAGES, images=[_image()])
    assert processor.image_token_id == TINY_IMAGE_TOKEN_ID
    assert int((batch["input_ids"] == TINY_IMAGE_TOKEN_ID).sum()) == config.num_image_tokens
    assert batch["pixel_values"].shape == (1, 3, 28, 28)
    assert batch["attention_mask"].shape == batch["input_ids"].shape


def test_chat_template_and_fallback():
    processor = tiny_processor()
    prompt = processor.build_prompt(MESSAGES)
    assert prompt.startswith("<s> user : <image>") and prompt.endswith("assistant : ")
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]}]
    assert processor.build_prompt(parts).startswith("<s> user : <image>\ndescribe")
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    plain = RSVLMProcessor(processor.image_processor, tokenizer, num_image_tokens=3)
    assert (
        plain.build_prompt(MESSAGES) == "User: <image>\nhow many buildings are there ?\nAssistant:"
    )
    with pytest.raises(ValueError, match="role"):
        processor.build_prompt([{"content": "x"}])


def test_semantic_texts_and_queries():
    processor = tiny_processor(tiny_config(max_semantic_tokens=4))
    batch = processor(
        text=["<image> describe", "<image> count"],
        images=[_image(0), _image(1)],
        semantic_texts=[["dense residential area", "a river"], []],
        queries=["describe", None],
    )
    assert batch["semantic_input_ids"].shape == (2, 4)  # cut to max_semantic_tokens
    assert batch["semantic_attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 0, 0]]
    assert batch["query_attention_mask"].tolist() == [[1], [0]]
    vocab = processor.tokenizer.get_vocab()
    assert batch["semantic_input_ids"][0].tolist() == [
        vocab[w] for w in ("dense", "residential", "area", "a")
    ]


def test_mismatched_inputs_raise():
    processor = tiny_processor()
    with pytest.raises(ValueError, match="placeholder"):
        processor(text="<image> <image> two", images=[_image()])
    with pytest.raises(ValueError, match="placeholder"):
        processor(text="no image here", images=[_image()])
    with pytest.raises(ValueError, match="one per image"):
        processor(text="<image> x", images=[_image()], queries=["a", "b"])
    with pytest.raises(ValueError, match="exactly one"):
        processor(images=[_image()])
    with pytest.raises(ValueError, match="num_image_tokens"):
        RSVLMProcessor(processor.image_processor, tiny_tokenizer(), num_image_tokens=0)


def test_save_and_load_roundtrip(tmp_path):
    from transformers import AutoProcessor

    processor = tiny_processor(tiny_config(connector_type="perceiver"))
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, RSVLMProcessor)
    assert loaded.num_image_tokens == processor.num_image_tokens == 6
    assert loaded.image_token_id == processor.image_token_id
    assert loaded.chat_template == processor.chat_template
    kwargs = dict(messages=MESSAGES, images=[_image()], semantic_texts=["a river"], queries="count")
    a, b = processor(**kwargs), loaded(**kwargs)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_from_config_checks_token_id():
    config = tiny_config()
    processor = RSVLMProcessor.from_config(
        config, tiny_processor().image_processor, tiny_tokenizer()
    )
    assert processor.num_image_tokens == config.num_image_tokens
    bad = tiny_config(image_token_id=5)
    with pytest.raises(ValueError, match="image_token_id|model config"):
        RSVLMProcessor.from_config(bad, processor.image_processor, tiny_tokenizer())


@pytest.mark.parametrize("vision", ["dinov2", pytest.param("siglip", marks=pytest.mark.slow)])
def test_processor_output_feeds_the_model(vision):
    model = tiny_model(vision=vision, connector_type="semantic_prompter")
    processor = tiny_processor(model.config, vision=vision)
    batch = processor(
        messages=[MESSAGES, [{"role": "user", "content": "<image>\ndescribe the scene"}]],
        images=[_image(0), _image(1, (30, 30))],
        semantic_texts=[["a river near a forest"], ["dense residential area", "roads"]],
        queries=["how many buildings are there ?", "describe the scene"],
        padding_side="left",
    )
    out = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 3)
    text = processor.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(text) == 2
