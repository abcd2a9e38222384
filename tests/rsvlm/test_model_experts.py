"""Semantic experts (seed 003, III-B): routing masks, gating, injection into stock decoders."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from rsvlm.experts import (
    TOKEN_TYPE_IMAGE,
    TOKEN_TYPE_SEMANTIC,
    TOKEN_TYPE_TEXT,
    SemanticExpertsMLP,
    expert_modules,
    inject_semantic_experts,
    set_routing,
)
from rsvlm.testing import tiny_text_config


class ToyMLP(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _wrapper(levels: int = 3, dim: int = 8, rank: int = 2) -> SemanticExpertsMLP:
    torch.manual_seed(0)
    wrapper = SemanticExpertsMLP(ToyMLP(dim), dim, levels, rank, "gelu")
    for expert in wrapper.experts:
        nn.init.normal_(expert.expand.weight, std=0.5)
    return wrapper


def test_masks_and_gates_follow_the_paper():
    wrapper = _wrapper(levels=3)
    types = torch.tensor(
        [
            [
                TOKEN_TYPE_TEXT,
                TOKEN_TYPE_IMAGE,
                TOKEN_TYPE_SEMANTIC,
                TOKEN_TYPE_SEMANTIC + 1,
                TOKEN_TYPE_SEMANTIC + 2,
                TOKEN_TYPE_TEXT,
            ]
        ]
    )
    wrapper.token_types = types
    hidden = torch.randn(1, 6, 8)
    gates, masks = wrapper.routing_weights(hidden)
    # Text and image tokens: every expert, softmax gate.
    for pos in (0, 1, 5):
        assert torch.equal(masks[0, pos], torch.ones(3))
        assert torch.allclose(gates[0, pos].sum(), torch.tensor(1.0))
        assert (gates[0, pos] > 0).all()
    # Level-l semantic tokens: only expert l sees them, gate one-hot on l.
    for level in range(3):
        pos = 2 + level
        expected = torch.nn.functional.one_hot(torch.tensor(level), 3).float()
        assert torch.equal(masks[0, pos], expected)
        assert torch.equal(gates[0, pos], expected)


def test_expert_inputs_are_masked_per_level():
    wrapper = _wrapper(levels=2)
    seen: dict[int, torch.Tensor] = {}
    for level, expert in enumerate(wrapper.experts):
        expert.reduce.register_forward_hook(
            lambda mod, args, out, level=level: seen.__setitem__(level, args[0].detach())
        )
    types = torch.tensor(
        [[TOKEN_TYPE_IMAGE, TOKEN_TYPE_SEMANTIC, TOKEN_TYPE_SEMANTIC + 1, TOKEN_TYPE_TEXT]]
    )
    wrapper.token_types = types
    hidden = torch.randn(1, 4, 8)
    wrapper(hidden)
    # Expert 0 never sees level-1 semantic tokens, expert 1 never sees level-0 ones.
    assert torch.equal(seen[0][0, 2], torch.zeros(8))
    assert torch.equal(seen[1][0, 1], torch.zeros(8))
    for level in (0, 1):
        for pos in (0, 3):
            assert torch.equal(seen[level][0, pos], hidden[0, pos])
    assert torch.equal(seen[0][0, 1], hidden[0, 1])
    assert torch.equal(seen[1][0, 2], hidden[0, 2])


def test_output_is_ffn_plus_gated_experts():
    wrapper = _wrapper(levels=2)
    types = torch.tensor([[TOKEN_TYPE_TEXT, TOKEN_TYPE_SEMANTIC + 1]])
    wrapper.token_types = types
    hidden = torch.randn(1, 2, 8)
    out = wrapper(hidden)
    base = wrapper.base_layer(hidden)
    gates = torch.softmax(wrapper.router(hidden), dim=-1)
    text = base[0, 0] + sum(
        gates[0, 0, lvl] * wrapper.experts[lvl](hidden[0, 0]) for lvl in range(2)
    )
    assert torch.allclose(out[0, 0], text, atol=1e-6)
    # The level-1 semantic token goes through expert 1 only.
    assert torch.allclose(out[0, 1], base[0, 1] + wrapper.experts[1](hidden[0, 1]), atol=1e-6)


def test_missing_or_stale_routing_treats_tokens_as_text():
    wrapper = _wrapper(levels=2)
    hidden = torch.randn(2, 3, 8)
    wrapper.token_types = None
    ref = wrapper(hidden)
    wrapper.token_types = torch.full((2, 7), TOKEN_TYPE_SEMANTIC)  # wrong length: a decode step
    assert torch.allclose(wrapper(hidden), ref)
    wrapper.token_types = torch.zeros(2, 3, dtype=torch.long)
    assert torch.allclose(wrapper(hidden), ref)


def test_output_dtype_follows_base_layer():
    wrapper = _wrapper(levels=2)
    wrapper.base_layer.to(torch.bfloat16)
    out = wrapper(torch.randn(1, 3, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert wrapper.experts[0].reduce.weight.dtype == torch.float32


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_injection_into_stock_decoder(model_type):
    torch.manual_seed(0)
    config = AutoConfig.for_model(**tiny_text_config(model_type, vocab_size=64))
    lm = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, 64, (2, 9))
    with torch.no_grad():
        ref = lm(input_ids=ids).logits
    wrappers = inject_semantic_experts(
        lm, layer_indices=[1], num_layers=2, hidden_size=32, num_levels=3, rank=4
    )
    assert len(wrappers) == 1 and isinstance(lm.model.layers[1].mlp, SemanticExpertsMLP)
    assert not isinstance(lm.model.layers[0].mlp, SemanticExpertsMLP)
    # Idempotent, and zero-initialised expansions leave the pretrained model unchanged.
    assert (
        inject_semantic_experts(
            lm, layer_indices=[1], num_layers=2, hidden_size=32, num_levels=3, rank=4
        )
        == wrappers
    )
    with torch.no_grad():
        assert torch.allclose(lm(input_ids=ids).logits, ref, atol=1e-6)
        nn.init.normal_(wrappers[0].experts[2].expand.weight, std=0.5)
        text_only = lm(input_ids=ids).logits
        types = torch.zeros_like(ids)
        types[:, 2:5] = TOKEN_TYPE_SEMANTIC + 0  # level 0: expert 2 does not see them
        set_routing(lm, types)
        routed = lm(input_ids=ids).logits
    assert not torch.allclose(text_only, ref)
    assert not torch.allclose(routed, text_only)
    assert expert_modules(lm) == wrappers
    set_routing(lm, None)
    assert wrappers[0].token_types is None


def test_injection_needs_a_decoder():
    with pytest.raises(ValueError, match="decoder layers"):
        inject_semantic_experts(
            nn.Sequential(nn.Linear(4, 4)),
            layer_indices=[0],
            num_layers=2,
            hidden_size=4,
            num_levels=2,
            rank=2,
        )
