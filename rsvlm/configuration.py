"""Configuration of the RSVLM model family.

One `RSVLMConfig` describes the whole architecture: the vision encoder (`vision_config`, any
Hugging Face vision model: DINOv2, SigLIP/SigLIP2 vision, CLIP vision), the causal language model
(`text_config`: Llama, Qwen2, ...), which vision layers feed the connector, which connector, the
semantic experts inside the decoder and the retriever's image projection. Training choices
(learning rates, LoRA rank, what is frozen) are *not* here; they live in the training arguments.

Field names are a contract with `rsvlm/presets.py` and `assets/models/*.json`; keep them stable.

Token budget (what the processor expands `<image>` into, `config.num_image_tokens`):

* ``mlp``:               ``num_patches`` projected patch tokens of one level.
* ``perceiver``:         ``sum(perceiver_queries_per_level)`` query outputs.
* ``semantic_prompter``: ``num_patches`` projected patch tokens (when
  ``prompter_include_patch_tokens``) followed by ``L * prompter_num_tokens`` semantic-augmented
  tokens, level by level (seed 003: the LLM reads the image patch tokens *and* the
  semantic-augmented tokens).
"""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import PretrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.configuration_auto import AutoConfig

CONNECTOR_TYPES = ("mlp", "perceiver", "semantic_prompter")

# Vision model types whose hidden states carry a fixed-size token grid we know how to count.
# Anything else with `image_size` and `patch_size` works too; this only improves messages.
_NAFLEX_VISION_TYPES = ("siglip2_vision_model",)

_DEFAULT_VISION = {
    # DINOv2 ViT-S/14 (the embedded preset's backbone).
    "hidden_size": 384,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "mlp_ratio": 4,
    "patch_size": 14,
    "image_size": 224,
}
_DEFAULT_TEXT = {
    # SmolLM2-135M-Instruct shapes (the embedded preset's language model).
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}


class RSVLMConfig(PretrainedConfig):
    r"""Architecture of an RSVLM model.

    Args:
        vision_config: config (or dict with ``model_type``) of the vision encoder.
        text_config: config (or dict with ``model_type``) of the causal language model.
        vision_feature_layers: indices into the vision encoder's ``hidden_states`` tuple, one per
            level, ordered shallow -> deep. ``hidden_states[0]`` is the embedding output and
            ``hidden_states[i]`` the output of block ``i`` (1-based), so for a 12-block DINOv2
            the default ``[7, 9, 11]`` is the output of blocks 7, 9 and 11 (never only the last:
            the middle layers carry the scene semantics, the last block of the shipped copy is
            specialised). Negative indices count from the end. The number of levels ``L`` is
            ``len(vision_feature_layers)``; it is also the number of semantic experts.
        connector_type: ``"mlp"`` | ``"perceiver"`` | ``"semantic_prompter"``.
        projector_hidden_act: activation of the MLP projector (and of the connectors' FFNs).
        mlp_level: which level (index into ``vision_feature_layers``) the MLP projector reads; the
            prompter uses the same level for its projected patch tokens.
        perceiver_queries_per_level: learnable queries per level (LHRS-Bot): non-increasing from
            shallow to deep, i.e. the descending allocation of the paper.
        connector_num_heads: attention heads of the perceiver / prompter attention blocks.
        prompter_num_tokens: aggregation tokens ``A`` of the semantic prompter (per level).
        prompter_include_patch_tokens: also give the LLM the projected patch tokens (seed 003).
        patch_pool: average-pool the square patch grid by this stride before the MLP projector
            (and the prompter's patch tokens): 2 turns DINOv2's 16x16 grid into 8x8 = 64 LLM
            tokens. Prefill cost is linear in the image tokens, which on a CPU decides the
            first-token latency; the perceiver and prompter still attend to every patch.
        experts_enabled: inject seed 003's semantic experts into the decoder.
        experts_every_k_layers: experts sit next to the FFN of decoder layers ``k-1, 2k-1, ...``
            (0-based), i.e. every k-th layer.
        experts_rank: rank ``r`` of each low-rank expert (``d -> r -> d``).
        experts_hidden_act: activation between the rank-reduction and rank-expansion matrices.
        retrieval_embed_dim: dimension of the retriever's text encoder (384 for
            all-MiniLM-L6-v2); the model's image projection maps pooled vision features into it.
            ``None`` disables the projection.
        retrieval_top_k: how many descriptions the retriever passes to the model.
        max_semantic_tokens: the tokenized retrieved descriptions are cut to this many tokens.
        box_head_dim: width of the box head (`rsvlm.box_head`: question tokens and patch
            features -> boxes, which replace the coordinates the LM writes); ``None`` (default)
            leaves boxes to the language model. Needs a square patch grid.
        box_head_layers: transformer encoder layers of the box head.
        box_head_heads: attention heads of the box head.
        box_head_threshold: the head's score (0-1) a patch needs to count as one more object when
            an answer holds every object it finds ("find all"); a trained head's own value
            (`scripts/box_threshold.py` sweeps it on a training split).
        image_token: the placeholder string in prompts.
        image_token_id: its id in the LLM tokenizer (the processor adds it as a special token).
    """

    model_type = "rsvlm"
    sub_configs_defaults: ClassVar[dict[str, SubConfigSpec]] = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig, model_type="dinov2", init_kwargs=_DEFAULT_VISION
        ),
        "text_config": SubConfigSpec(
            config_class=AutoConfig, model_type="llama", init_kwargs=_DEFAULT_TEXT
        ),
    }

    vision_config: dict | PretrainedConfig | None = None
    text_config: dict | PretrainedConfig | None = None
    vision_feature_layers: list[int] | None = None
    connector_type: str = "semantic_prompter"
    projector_hidden_act: str = "gelu"
    mlp_level: int = -1
    perceiver_queries_per_level: list[int] | None = None
    connector_num_heads: int = 8
    prompter_num_tokens: int = 16
    prompter_include_patch_tokens: bool = True
    patch_pool: int = 1
    experts_enabled: bool = True
    experts_every_k_layers: int = 4
    experts_rank: int = 64
    experts_hidden_act: str = "gelu"
    retrieval_embed_dim: int | None = 384
    retrieval_top_k: int = 3
    max_semantic_tokens: int = 256
    box_head_dim: int | None = None
    box_head_layers: int = 3
    box_head_heads: int = 4
    box_head_threshold: float = 0.5
    image_token: str = "<image>"
    image_token_id: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        # The base class resets the sub-configs' attention implementation to the composite's
        # (None unless requested); sub-configs of already built models (`from_parts`) must keep
        # theirs, or their attention layers fall back to the slow path.
        kept = {
            key: getattr(sub, "_attn_implementation", None)
            for key in ("vision_config", "text_config")
            if isinstance(sub := getattr(self, key), PretrainedConfig)
        }
        super().__post_init__(**kwargs)
        if kwargs.get("attn_implementation") is None:
            for key, impl in kept.items():
                if impl is not None:
                    getattr(self, key)._attn_implementation_internal = impl
        if self.vision_feature_layers is None:
            self.vision_feature_layers = [7, 9, 11]
        self.vision_feature_layers = [int(i) for i in self.vision_feature_layers]
        if self.perceiver_queries_per_level is None:
            self.perceiver_queries_per_level = _descending_queries(len(self.vision_feature_layers))
        self.perceiver_queries_per_level = [int(q) for q in self.perceiver_queries_per_level]
        # The LM's own tying decides; the composite only mirrors it (as Llava does).
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        self.check_consistency()

    # ------------------------------------------------------------------ validation
    def check_consistency(self) -> None:
        """Raise `ValueError` where the parts disagree; call it again after replacing a
        sub-config (as `RSVLMForConditionalGeneration.from_parts` does)."""
        self._check_parts()
        self._check_connector()
        self._check_experts_and_heads()
        self._check_image_tokens()

    def _check_parts(self) -> None:
        vc, tc = self.vision_config, self.text_config
        for name in ("hidden_size", "patch_size", "num_hidden_layers"):
            if getattr(vc, name, None) is None:
                raise ValueError(
                    f"RSVLMConfig: vision_config ({vc.model_type}) has no `{name}`; use a vision "
                    "encoder config such as dinov2, siglip_vision_model or clip_vision_model."
                )
        for name in ("hidden_size", "vocab_size", "num_hidden_layers"):
            if getattr(tc, name, None) is None:
                raise ValueError(
                    f"RSVLMConfig: text_config ({tc.model_type}) has no `{name}`; use a causal "
                    "language model config such as llama or qwen2."
                )
        n_hidden = vc.num_hidden_layers + 1  # hidden_states include the embedding output
        if not self.vision_feature_layers:
            raise ValueError("RSVLMConfig: vision_feature_layers must name at least one layer.")
        for idx in self.vision_feature_layers:
            if not -n_hidden <= idx < n_hidden:
                raise ValueError(
                    f"RSVLMConfig: vision_feature_layers entry {idx} is outside the "
                    f"{n_hidden} hidden states of a {vc.num_hidden_layers}-layer vision encoder "
                    f"(valid: {-n_hidden}..{n_hidden - 1})."
                )

    def _check_connector(self) -> None:
        vc, tc = self.vision_config, self.text_config
        if self.connector_type not in CONNECTOR_TYPES:
            raise ValueError(
                f"RSVLMConfig: unknown connector_type {self.connector_type!r}; "
                f"choose one of {', '.join(CONNECTOR_TYPES)}."
            )
        n_levels = self.num_levels
        if not -n_levels <= self.mlp_level < n_levels:
            raise ValueError(
                f"RSVLMConfig: mlp_level {self.mlp_level} does not index one of the "
                f"{n_levels} vision levels."
            )
        q = self.perceiver_queries_per_level
        if len(q) != n_levels or any(x <= 0 for x in q):
            raise ValueError(
                f"RSVLMConfig: perceiver_queries_per_level needs one positive count per level "
                f"({n_levels}), got {q}."
            )
        if any(a < b for a, b in zip(q, q[1:], strict=False)):
            raise ValueError(
                f"RSVLMConfig: perceiver_queries_per_level must not increase from shallow to deep "
                f"levels (descending allocation), got {q}."
            )
        if self.connector_num_heads <= 0:
            raise ValueError("RSVLMConfig: connector_num_heads must be positive.")
        if self.connector_type == "perceiver" and vc.hidden_size % self.connector_num_heads:
            raise ValueError(
                f"RSVLMConfig: the perceiver attends in the vision width {vc.hidden_size}, which "
                f"connector_num_heads={self.connector_num_heads} does not divide."
            )
        if self.connector_type == "semantic_prompter" and tc.hidden_size % self.connector_num_heads:
            raise ValueError(
                f"RSVLMConfig: the prompter attends in the LM width {tc.hidden_size}, which "
                f"connector_num_heads={self.connector_num_heads} does not divide."
            )
        if self.patch_pool <= 0:
            raise ValueError("RSVLMConfig: patch_pool must be a positive stride.")
        if self.patch_pool > 1:
            if vc.model_type in _NAFLEX_VISION_TYPES:
                raise ValueError(
                    f"RSVLMConfig: patch_pool needs a square patch grid; {vc.model_type} has a "
                    "variable one."
                )
            side = int(vc.image_size) // int(vc.patch_size)
            if side % self.patch_pool:
                raise ValueError(
                    f"RSVLMConfig: patch_pool={self.patch_pool} does not divide the {side}x{side} "
                    "patch grid."
                )
        if self.prompter_num_tokens <= 0:
            raise ValueError("RSVLMConfig: prompter_num_tokens must be positive.")

    def _check_experts_and_heads(self) -> None:
        vc, tc = self.vision_config, self.text_config
        if self.experts_every_k_layers <= 0 or self.experts_rank <= 0:
            raise ValueError(
                "RSVLMConfig: experts_every_k_layers and experts_rank must be positive."
            )
        if self.experts_enabled and self.experts_every_k_layers > tc.num_hidden_layers:
            raise ValueError(
                f"RSVLMConfig: experts_every_k_layers={self.experts_every_k_layers} places no "
                f"expert in a {tc.num_hidden_layers}-layer language model."
            )
        if self.retrieval_embed_dim is not None and self.retrieval_embed_dim <= 0:
            raise ValueError("RSVLMConfig: retrieval_embed_dim must be positive or None.")
        if self.retrieval_top_k < 0 or self.max_semantic_tokens <= 0:
            raise ValueError(
                "RSVLMConfig: retrieval_top_k must be >= 0 and max_semantic_tokens positive."
            )
        if self.box_head_dim is not None:
            if self.box_head_dim <= 0 or self.box_head_dim % 4 or self.box_head_layers <= 0 \
                    or self.box_head_heads <= 0 or self.box_head_dim % self.box_head_heads:
                raise ValueError(
                    f"RSVLMConfig: box_head_dim ({self.box_head_dim}) must be a positive multiple "
                    f"of 4 and of box_head_heads ({self.box_head_heads}), with box_head_layers "
                    "> 0."
                )
            if not 0.0 < self.box_head_threshold < 1.0:
                raise ValueError(f"RSVLMConfig: box_head_threshold ({self.box_head_threshold}) "
                                 "must be between 0 and 1.")
            if vc.model_type in _NAFLEX_VISION_TYPES:
                raise ValueError(
                    f"RSVLMConfig: the box head needs a square patch grid; {vc.model_type} has a "
                    "variable one."
                )

    def _check_image_tokens(self) -> None:
        vc, tc = self.vision_config, self.text_config
        if self.image_token_id is not None and not 0 <= self.image_token_id < tc.vocab_size:
            raise ValueError(
                f"RSVLMConfig: image_token_id {self.image_token_id} is outside the language "
                f"model's vocabulary of {tc.vocab_size}; add the token and resize embeddings first."
            )
        if not self.image_token:
            raise ValueError("RSVLMConfig: image_token must be a non-empty string.")
        if vc.model_type not in _NAFLEX_VISION_TYPES and getattr(vc, "image_size", None) is None:
            raise ValueError(
                f"RSVLMConfig: vision_config ({vc.model_type}) has no `image_size`; the number "
                "of image tokens would be unknown."
            )

    # ------------------------------------------------------------------ derived sizes
    @property
    def num_levels(self) -> int:
        """Number of vision levels ``L`` (also the number of semantic experts)."""
        return len(self.vision_feature_layers)

    @property
    def num_patches(self) -> int:
        """Patch tokens per image after dropping CLS/register tokens."""
        vc = self.vision_config
        if vc.model_type in _NAFLEX_VISION_TYPES:
            return int(vc.num_patches)
        side = int(vc.image_size) // int(vc.patch_size)
        return side * side

    @property
    def patch_grid(self) -> int:
        """Side of the square patch grid (fixed-resolution encoders)."""
        return int(self.vision_config.image_size) // int(self.vision_config.patch_size)

    @property
    def num_semantic_tokens(self) -> int:
        """Semantic-augmented tokens per image (``L * A``; 0 unless the prompter is used)."""
        if self.connector_type != "semantic_prompter":
            return 0
        return self.num_levels * self.prompter_num_tokens

    @property
    def num_patch_tokens(self) -> int:
        """Leading image tokens of each placeholder block that are (projected) image tokens."""
        if self.connector_type == "perceiver":
            return sum(self.perceiver_queries_per_level)
        if self.connector_type == "semantic_prompter" and not self.prompter_include_patch_tokens:
            return 0
        return self.num_patches // (self.patch_pool * self.patch_pool)

    @property
    def num_image_tokens(self) -> int:
        """Placeholder tokens one `<image>` expands to (what the connector emits per image)."""
        return self.num_patch_tokens + self.num_semantic_tokens

    @property
    def expert_layer_indices(self) -> list[int]:
        """0-based decoder layers that get semantic experts (empty when disabled)."""
        if not self.experts_enabled:
            return []
        k = self.experts_every_k_layers
        return [i for i in range(self.text_config.num_hidden_layers) if i % k == k - 1]


def _descending_queries(n_levels: int, first: int = 64) -> list[int]:
    """Default LHRS-Bot-style allocation: halve the query count from level to level (min 8)."""
    return [max(8, first >> i) for i in range(n_levels)]


AutoConfig.register(RSVLMConfig.model_type, RSVLMConfig, exist_ok=True)

__all__ = ["CONNECTOR_TYPES", "RSVLMConfig"]
