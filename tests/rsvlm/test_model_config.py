"""RSVLMConfig: defaults, derived token counts, validation messages, JSON round trip."""

from __future__ import annotations

import pytest

from rsvlm.configuration import RSVLMConfig
from rsvlm.testing import TINY_VISION, tiny_config, tiny_text_config


def test_default_is_the_embedded_preset_shape():
    config = RSVLMConfig()
    assert config.model_type == "rsvlm"
    assert config.vision_config.model_type == "dinov2"
    assert config.text_config.model_type == "llama"
    # Middle DINOv2 blocks (7, 9, 11 of 12), never only the last one.
    assert config.vision_feature_layers == [7, 9, 11]
    assert config.num_levels == 3
    assert config.num_patches == (224 // 14) ** 2
    assert config.num_image_tokens == 256 + 3 * config.prompter_num_tokens
    assert config.expert_layer_indices == list(range(3, 30, 4))


@pytest.mark.parametrize(
    ("connector", "expected"),
    [("mlp", 4), ("perceiver", 4 + 2), ("semantic_prompter", 4 + 2 * 3)],
)
def test_num_image_tokens_per_connector(connector, expected):
    config = tiny_config(connector_type=connector)
    assert config.num_image_tokens == expected
    assert (
        tiny_config(
            connector_type="semantic_prompter", prompter_include_patch_tokens=False
        ).num_image_tokens
        == 6
    )


def test_experts_every_k_layers():
    assert tiny_config(experts_every_k_layers=2).expert_layer_indices == [1]
    assert tiny_config(experts_enabled=False).expert_layer_indices == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"connector_type": "qformer"}, "unknown connector_type"),
        ({"vision_feature_layers": [1, 5]}, "outside the 3 hidden states"),
        ({"vision_feature_layers": []}, "at least one layer"),
        ({"perceiver_queries_per_level": [2, 4]}, "descending"),
        ({"perceiver_queries_per_level": [4]}, "one positive count per level"),
        ({"mlp_level": 2}, "mlp_level"),
        ({"connector_num_heads": 5}, "does not divide"),
        ({"experts_every_k_layers": 3}, "places no expert"),
        ({"experts_rank": 0}, "positive"),
        ({"image_token_id": 10_000}, "outside the language model's vocabulary"),
        ({"retrieval_embed_dim": 0}, "retrieval_embed_dim"),
        ({"max_semantic_tokens": 0}, "max_semantic_tokens"),
        ({"text_config": dict(TINY_VISION["dinov2"])}, "causal language model"),
    ],
)
def test_invalid_configs_raise_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_vision_config_must_be_a_vision_encoder():
    with pytest.raises(ValueError, match="vision encoder"):
        RSVLMConfig(vision_config=tiny_text_config(), text_config=tiny_text_config())


def test_json_roundtrip_and_autoconfig(tmp_path):
    from transformers import AutoConfig

    config = tiny_config(vision="siglip", text="qwen2", connector_type="perceiver")
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, RSVLMConfig)
    assert loaded.to_diff_dict() == config.to_diff_dict()
    assert loaded.vision_config.model_type == "siglip_vision_model"
    assert loaded.text_config.model_type == "qwen2"
    assert loaded.num_image_tokens == config.num_image_tokens
    assert RSVLMConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


@pytest.mark.parametrize("connector", ["mlp", "semantic_prompter"])
def test_patch_pool_reduces_image_tokens_and_runs(connector):
    import torch

    from rsvlm.testing import tiny_model

    # A 56 px image with 14 px patches: a 4x4 grid, pooled by 2 into 2x2 = 4 patch tokens.
    vision = dict(TINY_VISION["dinov2"], image_size=56)
    model = tiny_model(connector_type=connector, vision_config=vision, patch_pool=2)
    unpooled = tiny_config(connector_type=connector, vision_config=vision)
    assert model.config.num_patch_tokens == 4 == unpooled.num_patch_tokens // 4
    features = model.get_image_features(torch.randn(1, 3, 56, 56))
    assert features.shape[1] == model.config.num_image_tokens


def test_patch_pool_must_divide_the_grid():
    with pytest.raises(ValueError, match="patch_pool"):
        tiny_config(patch_pool=3)  # 2x2 grid
