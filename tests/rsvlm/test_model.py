"""RSVLMForConditionalGeneration on tiny random configs: forward, grads, generate, save/load."""

from __future__ import annotations

import os

import pytest
import torch

from rsvlm.configuration import RSVLMConfig
from rsvlm.experts import TOKEN_TYPE_IMAGE, TOKEN_TYPE_SEMANTIC, TOKEN_TYPE_TEXT
from rsvlm.modeling import RSVLMForConditionalGeneration
from rsvlm.testing import TINY_IMAGE_TOKEN_ID, tiny_config, tiny_model
from training.model_setup import set_trainable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONNECTORS = ["mlp", "perceiver", "semantic_prompter"]


def make_batch(config: RSVLMConfig, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Prompt = 2 text tokens, one image block, 4 text tokens; semantic texts and queries."""
    g = torch.Generator().manual_seed(seed)
    n = config.num_image_tokens
    ids = torch.cat(
        [
            torch.randint(4, 100, (batch, 2), generator=g),
            torch.full((batch, n), TINY_IMAGE_TOKEN_ID),
            torch.randint(4, 100, (batch, 4), generator=g),
        ],
        dim=1,
    )
    labels = ids.masked_fill(ids == TINY_IMAGE_TOKEN_ID, -100)
    labels[:, :2] = -100
    sem_mask = torch.ones(batch, 6, dtype=torch.long)
    sem_mask[-1, 3:] = 0  # ragged retrieved texts
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(batch, 3, 28, 28, generator=g),
        "labels": labels,
        "semantic_input_ids": torch.randint(4, 100, (batch, 6), generator=g),
        "semantic_attention_mask": sem_mask,
        "query_input_ids": torch.randint(4, 100, (batch, 3), generator=g),
        "query_attention_mask": torch.ones(batch, 3, dtype=torch.long),
    }


@pytest.mark.parametrize("connector", CONNECTORS)
@pytest.mark.parametrize("experts", [False, True])
def test_forward_loss_and_gradients(connector, experts):
    model = tiny_model(connector_type=connector, experts_enabled=experts).train()
    batch = make_batch(model.config)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    # Sequence length never changes inside the model.
    assert out.logits.shape[:2] == batch["input_ids"].shape
    assert out.image_hidden_states.shape == (2, model.config.num_image_tokens, 32)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert any(
        g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("connector.")
    )
    assert any(
        g is not None and g.abs().sum() > 0
        for n, g in grads.items()
        if n.startswith("vision_tower.")
    )
    expert_grads = [g for n, g in grads.items() if ".experts." in n]
    if experts:
        assert expert_grads and all(g is not None and g.abs().sum() > 0 for g in expert_grads)
    else:
        assert not expert_grads
    if connector == "semantic_prompter":
        # Query and semantic tokens reach the prompter through the LM's token embeddings.
        assert model.connector.aggregation.grad.abs().sum() > 0
        assert model.connector.semantic_block.attn.in_proj_weight.grad.abs().sum() > 0


def test_token_types_mark_image_and_semantic_levels():
    model = tiny_model(connector_type="semantic_prompter")
    cfg = model.config
    batch = make_batch(cfg)
    with torch.no_grad():
        types = model(**batch).token_types
    p, a = cfg.num_patches, cfg.prompter_num_tokens
    row = types[0].tolist()
    assert row[:2] == [TOKEN_TYPE_TEXT] * 2
    assert row[2 : 2 + p] == [TOKEN_TYPE_IMAGE] * p
    assert row[2 + p : 2 + p + a] == [TOKEN_TYPE_SEMANTIC] * a
    assert row[2 + p + a : 2 + p + 2 * a] == [TOKEN_TYPE_SEMANTIC + 1] * a
    assert row[2 + p + 2 * a :] == [TOKEN_TYPE_TEXT] * 4
    assert all(w.token_types is types for w in model.semantic_experts())


def test_prompter_uses_semantics_and_query_and_works_without_them():
    model = tiny_model(connector_type="semantic_prompter")
    batch = make_batch(model.config)
    with torch.no_grad():
        ref = model(**batch).logits
        other_sem = model(
            **{**batch, "semantic_input_ids": batch["semantic_input_ids"].flip(1)}
        ).logits
        other_query = model(**{**batch, "query_input_ids": batch["query_input_ids"] + 1}).logits
        bare = {k: v for k, v in batch.items() if not k.startswith(("semantic_", "query_"))}
        no_extra = model(**bare).logits
        empty = model(
            **bare,
            semantic_input_ids=torch.zeros(2, 0, dtype=torch.long),
            semantic_attention_mask=torch.zeros(2, 0, dtype=torch.long),
        ).logits
        all_masked = model(
            **{**batch, "semantic_attention_mask": torch.zeros(2, 6, dtype=torch.long)}
        ).logits
    assert not torch.allclose(ref, other_sem)
    assert not torch.allclose(ref, other_query)
    assert torch.isfinite(no_extra).all() and torch.isfinite(all_masked).all()
    assert torch.allclose(no_extra, empty, atol=1e-5)


def test_placeholder_mismatch_raises():
    model = tiny_model(connector_type="mlp")
    batch = make_batch(model.config)
    batch["input_ids"][0, 3] = 5  # one placeholder short
    with pytest.raises(ValueError, match="image tokens do not match"):
        model(**batch)
    batch = make_batch(model.config)
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=batch["input_ids"])
    prompter = tiny_model(connector_type="semantic_prompter")
    batch = make_batch(prompter.config)
    with pytest.raises(ValueError, match="one row per image"):
        prompter(**{**batch, "semantic_input_ids": batch["semantic_input_ids"][:1]})
    with pytest.raises(ValueError, match="token_types cover"):
        prompter(**batch, token_types=torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.parametrize("connector", CONNECTORS)
def test_generate(connector):
    model = tiny_model(connector_type=connector)
    batch = make_batch(model.config)
    del batch["labels"]
    out = model.generate(**batch, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)
    assert torch.equal(out[:, : batch["input_ids"].shape[1]], batch["input_ids"])


def test_engine_prefix_cache_and_inputs_embeds_match_plain_generate():
    model = tiny_model(connector_type="semantic_prompter")
    batch = make_batch(model.config, batch=1)
    del batch["labels"]
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    ref = model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1] :]

    extra = {k: v for k, v in batch.items() if k.startswith(("semantic_", "query_"))}
    embeds, types = model.prepare_inputs_embeds(batch["input_ids"], batch["pixel_values"], **extra)
    from_embeds = model.generate(
        inputs_embeds=embeds, token_types=types, attention_mask=batch["attention_mask"], **kwargs
    )
    assert torch.equal(from_embeds[:, -5:], ref)

    # Prefix (system + image) computed once, the question appended later on top of the cache.
    ids = batch["input_ids"]
    cut = ids.shape[1] - 3
    with torch.no_grad():
        prefix = model(
            inputs_embeds=embeds[:, :cut],
            token_types=types[:, :cut],
            attention_mask=batch["attention_mask"][:, :cut],
            use_cache=True,
        )
    cont = model.generate(
        input_ids=ids,
        attention_mask=batch["attention_mask"],
        past_key_values=prefix.past_key_values,
        **kwargs,
    )
    assert torch.equal(cont[:, ids.shape[1] :], ref)


def _arch(d: dict) -> dict:
    """A config dict without the fields loading is allowed to fill in (path, dtype)."""
    return {
        k: _arch(v) if isinstance(v, dict) else v
        for k, v in d.items()
        if k not in ("_name_or_path", "dtype", "transformers_version")
    }


@pytest.mark.parametrize("connector", CONNECTORS)
def test_save_and_load_roundtrip(tmp_path, connector):
    model = tiny_model(connector_type=connector)
    batch = make_batch(model.config)
    model.save_pretrained(tmp_path)
    loaded = RSVLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert _arch(loaded.config.to_dict()) == _arch(model.config.to_dict())
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
        px = batch["pixel_values"]
        assert torch.equal(
            model.embed_image_for_retrieval(px), loaded.embed_image_for_retrieval(px)
        )


def test_auto_classes(tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText

    model = tiny_model(connector_type="mlp", experts_enabled=False)
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), RSVLMConfig)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert isinstance(loaded, RSVLMForConditionalGeneration)


def test_retrieval_projection_is_unit_norm_and_optional():
    model = tiny_model()
    vecs = model.embed_image_for_retrieval(torch.randn(3, 3, 28, 28))
    assert vecs.shape == (3, 16)
    assert torch.allclose(vecs.norm(dim=-1), torch.ones(3), atol=1e-5)
    bare = tiny_model(retrieval_embed_dim=None)
    assert bare.retrieval_projection is None
    with pytest.raises(ValueError, match="retrieval"):
        bare.embed_image_for_retrieval(torch.randn(1, 3, 28, 28))


def test_wrong_image_size_raises():
    model = tiny_model(connector_type="mlp")
    with pytest.raises(ValueError, match="28x28"):
        model.get_image_features(torch.randn(1, 3, 42, 42))


@pytest.mark.parametrize("vision", ["siglip", "clip"])
@pytest.mark.parametrize("text", ["qwen2"])
def test_other_backbones(vision, text):
    model = tiny_model(vision=vision, text=text, connector_type="semantic_prompter")
    batch = make_batch(model.config)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    assert out.image_hidden_states.shape[1] == model.config.num_image_tokens == 4 + 2 * 3


def test_siglip2_naflex_vision_tower():
    from transformers import Siglip2ImageProcessorPil

    from rsvlm.processing import RSVLMProcessor
    from rsvlm.testing import tiny_tokenizer

    vision = dict(
        model_type="siglip2_vision_model",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_patches=4,
        patch_size=14,
    )
    model = tiny_model(vision_config=vision, connector_type="semantic_prompter")
    assert model.config.num_patches == 4
    processor = RSVLMProcessor(
        Siglip2ImageProcessorPil(max_num_patches=4, patch_size=14),
        tiny_tokenizer(),
        num_image_tokens=model.config.num_image_tokens,
    )
    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8))
    batch = processor(text="<image> describe", images=[image], queries="describe")
    assert "spatial_shapes" in batch and "pixel_attention_mask" in batch
    out = model.generate(**batch, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 2


def test_gradient_checkpointing_keeps_routing():
    model = tiny_model(connector_type="semantic_prompter").train()
    batch = make_batch(model.config)
    model(**batch).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(**batch).loss.backward()
    for name, p in model.named_parameters():
        if name in ref:
            assert torch.allclose(p.grad, ref[name], atol=1e-6), name


def test_set_trainable_is_structural():
    model = tiny_model(connector_type="semantic_prompter").train()
    counts = set_trainable(
        model,
        vision_tower=False,
        connector=True,
        language_model=False,
        experts=True,
        retrieval_projection=False,
    )
    assert counts["vision_tower"] == counts["language_model"] == counts["retrieval_projection"] == 0
    assert counts["connector"] > 0 and counts["experts"] > 0
    out = model(**make_batch(model.config))
    out.loss.backward()
    for name, p in model.named_parameters():
        trainable = name.startswith("connector.") or ".experts." in name or ".router." in name
        assert (p.grad is not None) == trainable, name


def test_from_parts_keeps_pretrained_weights_and_adds_image_token():
    from transformers import AutoModel, AutoModelForCausalLM

    from rsvlm.testing import tiny_tokenizer

    cfg = tiny_config(experts_enabled=True)
    torch.manual_seed(1)
    vision = AutoModel.from_config(cfg.vision_config)
    text_cfg = cfg.text_config
    text_cfg.vocab_size = 109  # the tokenizer's size before the image token
    lm = AutoModelForCausalLM.from_config(text_cfg)
    vision_w = vision.embeddings.patch_embeddings.projection.weight.clone()
    lm_w = lm.model.layers[0].self_attn.q_proj.weight.clone()
    tokenizer = tiny_tokenizer()
    model = RSVLMForConditionalGeneration.from_parts(
        vision,
        lm,
        tokenizer=tokenizer,
        vision_feature_layers=[1, 2],
        connector_type="mlp",
        experts_every_k_layers=1,
        experts_rank=4,
        retrieval_embed_dim=16,
    )
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<image>") == 109
    assert model.get_input_embeddings().num_embeddings == 110
    # The image token's new row is the mean of the pretrained rows (no random draw): the same
    # parts give the same weights on every load, which the ONNX decoder cache relies on.
    table = model.get_input_embeddings().weight
    assert torch.allclose(table[109], table[:109].mean(dim=0))
    assert torch.equal(
        model.vision_tower.model.embeddings.patch_embeddings.projection.weight, vision_w
    )
    assert torch.equal(model.language_model.model.layers[0].self_attn.q_proj.weight, lm_w)
    assert all((w.experts[0].expand.weight == 0).all() for w in model.semantic_experts())
    # Wrapping the parts' configs must not reset their attention implementation.
    assert model.vision_tower.model.config._attn_implementation == "sdpa"
    assert model.language_model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="image_token_id"):
        RSVLMForConditionalGeneration.from_parts(
            vision, lm, connector_type="mlp", vision_feature_layers=[1, 2], experts_enabled=False
        )


def test_bfloat16_forward_generate_and_retrieval():
    model = tiny_model(connector_type="semantic_prompter").to(torch.bfloat16)
    batch = make_batch(model.config, batch=1)
    with torch.no_grad():
        out = model(**batch)
        vecs = model.embed_image_for_retrieval(batch["pixel_values"])
    assert torch.isfinite(out.loss) and out.logits.dtype == torch.bfloat16
    assert vecs.dtype == torch.float32  # ready for the faiss index
    del batch["labels"]
    gen = model.generate(**batch, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert gen.shape[1] == batch["input_ids"].shape[1] + 2


def test_vision_tower_reuses_identical_pixels_only_at_inference() -> None:
    """Retrieval and generate() embed the same chip: the tower runs once per chip at inference."""
    from rsvlm.testing import tiny_model

    model = tiny_model(seed=0).eval()
    tower = model.vision_tower
    calls = []
    tower.model.register_forward_hook(lambda *_: calls.append(1))
    size = model.config.vision_config.image_size
    pixels = torch.randn(1, 3, size, size)
    with torch.inference_mode():
        first = tower(pixels)
        again = tower(pixels.clone())
        assert len(calls) == 1 and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
        tower(pixels + 1)
        assert len(calls) == 2
    tower(pixels + 1)  # autograd on (training, gradients): always computed
    assert len(calls) == 3
    model.train()
    with torch.inference_mode():
        tower(pixels + 1)
    assert len(calls) == 4
