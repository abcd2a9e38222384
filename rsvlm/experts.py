"""Seed 003's semantic-aware experts, injected into a stock decoder the way peft injects LoRA.

`SemanticExpertsMLP` wraps a decoder layer's FFN (`base_layer` kept as is, which also works when
its linears are bitsandbytes 4-bit or peft-LoRA layers) and adds ``L`` low-rank experts
(``d -> r -> d``) in parallel, one per vision level (Eqs. 6-11):

* Routing (Eq. 7-8): expert ``l`` sees image tokens, text tokens and the level-``l``
  semantic-augmented tokens; the semantic tokens of the other levels are masked out (zeroed).
* Gating (Eq. 10): ``softmax(W_g h)`` over the experts for image and text tokens; for a level-``l``
  semantic token the gate is one-hot on expert ``l``.
* Output (Eq. 11): ``FFN(h) + sum_l g_l * E_l(mask_l * h)``, cast back to the FFN's dtype.

Text tokens: the paper names three inputs (image patch, semantic-augmented, user query). Every
other text token (system prompt, chat markup, the answer being generated) is routed exactly like
a user query token: all experts, softmax gate. The prompt's query and the rest of the text are
therefore one routing type, `TOKEN_TYPE_TEXT`.

Routing information reaches the wrappers without touching the decoder's forward: the model
calls `set_routing(model, token_types)` before running the LM. Token types stay set until the
next call, so gradient checkpointing (which re-runs layers during backward) sees the same
routing. A wrapper whose stored routing does not match the sequence it is given (e.g. cached
decoding steps, or the LM called directly) treats every token as text.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers.activations import ACT2FN

TOKEN_TYPE_TEXT = 0
TOKEN_TYPE_IMAGE = 1
TOKEN_TYPE_SEMANTIC = 2  # level l has type TOKEN_TYPE_SEMANTIC + l


class LowRankExpert(nn.Module):
    """``expand(act(reduce(h)))``: a rank-``r`` feed-forward expert (Eq. 9)."""

    def __init__(self, hidden_size: int, rank: int, act: str) -> None:
        super().__init__()
        self.reduce = nn.Linear(hidden_size, rank, bias=False)
        self.act = ACT2FN[act]
        self.expand = nn.Linear(rank, hidden_size, bias=False)
        # Start as a no-op on top of the pretrained FFN (as LoRA zero-inits its B matrix).
        nn.init.zeros_(self.expand.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.expand(self.act(self.reduce(hidden)))


class SemanticExpertsMLP(nn.Module):
    """A decoder FFN plus ``num_levels`` low-rank semantic experts and their router."""

    def __init__(
        self, base_layer: nn.Module, hidden_size: int, num_levels: int, rank: int, act: str
    ):
        super().__init__()
        self.base_layer = base_layer
        self.num_levels = num_levels
        self.experts = nn.ModuleList(
            LowRankExpert(hidden_size, rank, act) for _ in range(num_levels)
        )
        self.router = nn.Linear(hidden_size, num_levels, bias=False)
        self.token_types: torch.Tensor | None = None  # (batch, seq) set by `set_routing`

    def routing_weights(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(gates, masks)``, both ``(batch, seq, num_levels)`` in the expert dtype."""
        dtype = self.router.weight.dtype
        gates = torch.softmax(self.router(hidden.to(dtype)).float(), dim=-1).to(dtype)
        types = self.token_types
        if types is None or types.shape != hidden.shape[:2]:
            return gates, torch.ones_like(gates)
        level = types.to(hidden.device).long() - TOKEN_TYPE_SEMANTIC  # >= 0 on semantic tokens
        is_semantic = (level >= 0).unsqueeze(-1)
        one_hot = nn.functional.one_hot(level.clamp(0, self.num_levels - 1), self.num_levels)
        one_hot = one_hot.to(dtype)
        gates = torch.where(is_semantic, one_hot, gates)
        masks = torch.where(is_semantic, one_hot, torch.ones_like(one_hot))
        return gates, masks

    def unload_and_optionally_merge_module(
        self, merge: bool = True, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> SemanticExpertsMLP:
        """peft hook: `merge_and_unload()` treats any module with a ``base_layer`` as its own
        adapter and would replace it by ``base_layer``, dropping the experts. The experts are part
        of the model, not a peft adapter, so the wrapper stays; peft then merges the LoRA layers
        inside ``base_layer`` as usual."""
        return self

    def forward(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(hidden, *args, **kwargs)
        gates, masks = self.routing_weights(hidden)
        x = hidden.to(self.router.weight.dtype)
        merged = torch.zeros_like(x)
        for level, expert in enumerate(self.experts):
            merged = merged + gates[..., level : level + 1] * expert(
                x * masks[..., level : level + 1]
            )
        return out + merged.to(out.dtype)


def find_decoder_layers(language_model: nn.Module, num_layers: int) -> nn.ModuleList:
    """The decoder's layer list: the first `ModuleList` of `num_layers` blocks that have an `mlp`."""
    for module in language_model.modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) == num_layers
            and all(hasattr(layer, "mlp") for layer in module)
        ):
            return module
    raise ValueError(
        f"Could not find {num_layers} decoder layers with an `mlp` attribute in "
        f"{type(language_model).__name__}; semantic experts need a Llama/Qwen2-style decoder."
    )


def inject_semantic_experts(
    language_model: nn.Module,
    *,
    layer_indices: Iterable[int],
    num_layers: int,
    hidden_size: int,
    num_levels: int,
    rank: int,
    act: str = "gelu",
) -> list[SemanticExpertsMLP]:
    """Wrap ``layers[i].mlp`` for every ``i`` in ``layer_indices``; idempotent."""
    layers = find_decoder_layers(language_model, num_layers)
    wrappers = []
    for i in layer_indices:
        layer = layers[i]
        if isinstance(layer.mlp, SemanticExpertsMLP):
            wrappers.append(layer.mlp)
            continue
        wrapper = SemanticExpertsMLP(layer.mlp, hidden_size, num_levels, rank, act)
        # Follow the layer's device and its floating dtype (a 4-bit FFN stores uint8 weights,
        # so look at the whole decoder layer, e.g. its norms).
        params = list(layer.parameters())
        floating = [p for p in params if p.is_floating_point()]
        if params:
            dtype = floating[0].dtype if floating else None
            wrapper.experts.to(device=params[0].device, dtype=dtype)
            wrapper.router.to(device=params[0].device, dtype=dtype)
        # The decoder's own `_init_weights` would redraw the zero-initialised expansion
        # matrices when the composite model runs `post_init`; mark them as initialised.
        for module in [wrapper, wrapper.router, *wrapper.experts.modules()]:
            module._is_hf_initialized = True
        layer.mlp = wrapper  # setattr on the parent, as peft injects LoRA
        wrappers.append(wrapper)
    return wrappers


def expert_modules(model: nn.Module) -> list[SemanticExpertsMLP]:
    """All expert wrappers inside `model` (also through peft wrappers)."""
    return [m for m in model.modules() if isinstance(m, SemanticExpertsMLP)]


def expert_parameter_ids(model: nn.Module) -> set[int]:
    """``id()`` of every parameter of the experts and their routers inside `model`: the
    semantic experts are their own trainable part, apart from the language model's weights."""
    return {
        id(p)
        for w in expert_modules(model)
        for p in list(w.experts.parameters()) + list(w.router.parameters())
    }


def set_routing(model: nn.Module, token_types: torch.Tensor | None) -> None:
    """Hand the per-position token types to every expert wrapper of `model`."""
    for wrapper in expert_modules(model):
        wrapper.token_types = token_types


__all__ = [
    "TOKEN_TYPE_IMAGE",
    "TOKEN_TYPE_SEMANTIC",
    "TOKEN_TYPE_TEXT",
    "LowRankExpert",
    "SemanticExpertsMLP",
    "expert_modules",
    "expert_parameter_ids",
    "find_decoder_layers",
    "inject_semantic_experts",
    "set_routing",
]
