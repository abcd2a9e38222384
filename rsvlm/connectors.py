"""Connectors: multi-level vision features (+ query / semantic tokens) -> LM input embeddings.

Every connector takes the same arguments and returns ``(batch, config.num_image_tokens,
text_hidden)``, the rows that replace the `<image>` placeholders:

* `MLPConnector` (RS-LLaVA / LLaVA-1.5): 2-layer GELU projector of one level's patch tokens.
* `PerceiverConnector` (LHRS-Bot): per-level learnable queries cross-attend to their level,
  descending query allocation, outputs concatenated and projected to the LM width.
* `SemanticPrompter` (seed 003, III-A2): aggregation tokens self-attend jointly with the user
  query tokens, cross-attend to the retrieved semantic tokens, then one cross-attention per
  visual level; output = [projected patch tokens] + L x A semantic-augmented tokens.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from rsvlm.configuration import RSVLMConfig


class MLPConnector(nn.Module):
    """Two linear layers with an activation between them (LLaVA-1.5's `mlp2x_gelu`)."""

    def __init__(self, config: RSVLMConfig) -> None:
        super().__init__()
        d_v, d_t = config.vision_config.hidden_size, config.text_config.hidden_size
        self.level = config.mlp_level
        self.pool = config.patch_pool
        self.linear_1 = nn.Linear(d_v, d_t)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(d_t, d_t)

    def project(self, patches: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(patches)))

    def forward(self, levels: list[torch.Tensor], **_: torch.Tensor | None) -> torch.Tensor:
        patches = levels[self.level]
        if self.pool > 1:  # (B, N, D) square grid -> average-pooled (B, N / pool^2, D)
            b, n, d = patches.shape
            side = int(round(n**0.5))
            grid = patches.transpose(1, 2).reshape(b, d, side, side)
            patches = nn.functional.avg_pool2d(grid, self.pool).flatten(2).transpose(1, 2)
        return self.project(patches)


class _CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention + FFN with residuals; keys may have another width than queries."""

    def __init__(self, dim: int, kv_dim: int, num_heads: int, act: str) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(kv_dim)
        self.attn = nn.MultiheadAttention(
            dim, num_heads, kdim=kv_dim, vdim=kv_dim, batch_first=True
        )
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), ACT2FN[act], nn.Linear(4 * dim, dim))

    def forward(
        self, x: torch.Tensor, kv: torch.Tensor, kv_padding: torch.Tensor | None = None
    ) -> torch.Tensor:
        kv = self.norm_kv(kv)
        x = (
            x
            + self.attn(self.norm_q(x), kv, kv, key_padding_mask=kv_padding, need_weights=False)[0]
        )
        return x + self.ffn(self.norm_ffn(x))


class PerceiverConnector(nn.Module):
    """LHRS-Bot's vision perceiver: learnable queries per level, cross-attention, concatenation."""

    def __init__(self, config: RSVLMConfig) -> None:
        super().__init__()
        d_v, d_t = config.vision_config.hidden_size, config.text_config.hidden_size
        self.queries = nn.ParameterList(
            nn.Parameter(torch.randn(n, d_v) * 0.02) for n in config.perceiver_queries_per_level
        )
        self.blocks = nn.ModuleList(
            _CrossAttentionBlock(d_v, d_v, config.connector_num_heads, config.projector_hidden_act)
            for _ in config.perceiver_queries_per_level
        )
        self.norm = nn.LayerNorm(d_v)
        self.proj = nn.Sequential(
            nn.Linear(d_v, d_t), ACT2FN[config.projector_hidden_act], nn.Linear(d_t, d_t)
        )

    def forward(self, levels: list[torch.Tensor], **_: torch.Tensor | None) -> torch.Tensor:
        outs = []
        for queries, block, feats in zip(self.queries, self.blocks, levels, strict=True):
            q = queries.unsqueeze(0).expand(feats.shape[0], -1, -1).to(feats.dtype)
            outs.append(block(q, feats))
        return self.proj(self.norm(torch.cat(outs, dim=1)))


class SemanticPrompter(nn.Module):
    """Seed 003's multi-level visual prompter (Eqs. 1-5).

    Query and semantic token embeddings come from the LLM's token embedding table (the model
    embeds them); both may be absent (no query given, retrieval off). A learnable "null" semantic
    key is always present so that an image with zero retrieved tokens still has something to
    attend to (an all-masked attention row would be NaN).
    """

    def __init__(self, config: RSVLMConfig) -> None:
        super().__init__()
        d_v, d_t = config.vision_config.hidden_size, config.text_config.hidden_size
        heads, act = config.connector_num_heads, config.projector_hidden_act
        self.num_tokens = config.prompter_num_tokens
        self.aggregation = nn.Parameter(torch.randn(config.prompter_num_tokens, d_t) * 0.02)
        # Eq. 1-2: self-attention over [aggregation tokens; user query tokens].
        self.norm_self = nn.LayerNorm(d_t)
        self.self_attn = nn.MultiheadAttention(d_t, heads, batch_first=True)
        # Eq. 3: aggregation tokens -> retrieved semantic tokens.
        self.null_semantic = nn.Parameter(torch.zeros(1, d_t))
        self.semantic_block = _CrossAttentionBlock(d_t, d_t, heads, act)
        # Eq. 4: one cross-attention per visual level.
        self.level_blocks = nn.ModuleList(
            _CrossAttentionBlock(d_t, d_v, heads, act) for _ in range(config.num_levels)
        )
        self.out_norm = nn.LayerNorm(d_t)
        self.patch_projector = (
            MLPConnector(config) if config.prompter_include_patch_tokens else None
        )

    def forward(
        self,
        levels: list[torch.Tensor],
        query_embeds: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
        semantic_embeds: torch.Tensor | None = None,
        semantic_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, dtype = levels[0].shape[0], levels[0].dtype
        agg = self.aggregation.unsqueeze(0).expand(batch, -1, -1).to(dtype)
        n_agg = agg.shape[1]

        tokens, padding = agg, None
        if query_embeds is not None and query_embeds.shape[1] > 0:
            tokens = torch.cat([agg, query_embeds.to(dtype)], dim=1)
            if query_mask is not None:
                keep = torch.ones(batch, n_agg, dtype=torch.bool, device=agg.device)
                padding = ~torch.cat([keep, query_mask.bool()], dim=1)
        normed = self.norm_self(tokens)
        attended = self.self_attn(
            normed, normed, normed, key_padding_mask=padding, need_weights=False
        )[0]
        agg = (tokens + attended)[:, :n_agg]

        null = self.null_semantic.unsqueeze(0).expand(batch, -1, -1).to(dtype)
        sem, sem_padding = null, None
        if semantic_embeds is not None and semantic_embeds.shape[1] > 0:
            sem = torch.cat([null, semantic_embeds.to(dtype)], dim=1)
            if semantic_mask is not None:
                keep = torch.ones(batch, 1, dtype=torch.bool, device=agg.device)
                sem_padding = ~torch.cat([keep, semantic_mask.bool()], dim=1)
        agg = self.semantic_block(agg, sem, sem_padding)

        per_level = [
            block(agg, feats) for block, feats in zip(self.level_blocks, levels, strict=True)
        ]
        semantic_augmented = self.out_norm(torch.cat(per_level, dim=1))
        if self.patch_projector is None:
            return semantic_augmented
        return torch.cat([self.patch_projector(levels), semantic_augmented], dim=1)


_CONNECTORS: dict[str, type[nn.Module]] = {
    "mlp": MLPConnector,
    "perceiver": PerceiverConnector,
    "semantic_prompter": SemanticPrompter,
}


def build_connector(config: RSVLMConfig) -> nn.Module:
    """Pick the connector named by ``config.connector_type``."""
    try:
        cls = _CONNECTORS[config.connector_type]
    except KeyError:
        raise ValueError(
            f"Unknown connector_type {config.connector_type!r}; "
            f"choose one of {', '.join(_CONNECTORS)}."
        ) from None
    return cls(config)


__all__ = ["MLPConnector", "PerceiverConnector", "SemanticPrompter", "build_connector"]
