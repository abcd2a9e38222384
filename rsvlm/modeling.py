"""RSVLM: vision tower + connector + causal LM (+ semantic experts, retriever projection).

Forward contract (`RSVLMForConditionalGeneration.forward`):

* ``input_ids`` hold the prompt with every ``<image>`` already expanded by the processor into
  ``config.num_image_tokens`` copies of ``config.image_token_id``. ``pixel_values`` hold one image
  per placeholder block, in batch order (``(num_images, 3, H, W)``).
* ``semantic_input_ids`` / ``semantic_attention_mask`` (``(num_images, S)``): the retrieved
  descriptions of each image, tokenized with the LLM tokenizer; the model embeds them with the
  LLM's token embeddings ("semantic tokens"). ``query_input_ids`` / ``query_attention_mask``
  (``(num_images, Q)``): the user query for the prompter. Both optional (retrieval off / no
  query); only the ``semantic_prompter`` connector reads them.
* The connector output replaces the placeholders with ``masked_scatter``; a count mismatch raises
  `ValueError`. Sequence length and labels never change inside the model; ``labels`` follow the
  usual causal-LM convention (``-100`` ignored, shifted inside).
* Token types for the semantic experts (`rsvlm.experts`: text 0, image 1, semantic level ``l``
  ``2 + l``) are derived from the placeholder positions and handed to the expert wrappers before
  the LM runs. Positions without an image (decoding steps) are text.
* With a KV cache, images matter only in the chunk that contains their placeholders: a chunk
  without placeholders and a non-empty cache ignores ``pixel_values`` (the image is already in
  the cache), exactly like `generate()` dropping pixel inputs after the prefill step.

Engine helpers: `prepare_inputs_embeds(...) -> (inputs_embeds, token_types)` computes a prefix
once; ``model(inputs_embeds=..., token_types=..., use_cache=True)`` fills a cache that
``model.generate(input_ids=full_ids, past_key_values=cache, ...)`` continues (new tokens are
routed as text). `embed_image_for_retrieval(pixel_values)` gives the retriever's unit vectors.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    GenerationMixin,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

from rsvlm.box_head import BoxHead, patch_centres, sincos_2d
from rsvlm.configuration import RSVLMConfig
from rsvlm.connectors import PerceiverConnector, SemanticPrompter, build_connector
from rsvlm.experts import (
    TOKEN_TYPE_IMAGE,
    TOKEN_TYPE_SEMANTIC,
    TOKEN_TYPE_TEXT,
    LowRankExpert,
    SemanticExpertsMLP,
    expert_modules,
    inject_semantic_experts,
    set_routing,
)
from rsvlm.vision import VisionTower

logger = logging.getLogger(__name__)

# Inputs that only matter on the step that contains the image placeholders.
_PREFILL_ONLY_INPUTS = (
    "semantic_input_ids",
    "semantic_attention_mask",
    "query_input_ids",
    "query_attention_mask",
    "token_types",
)
# Modules bitsandbytes must leave in 16/32-bit: everything but the language model's linears.
NON_QUANTIZED_MODULES = [
    "vision_tower",
    "connector",
    "retrieval_projection",
    "box_head",
    "lm_head",
    r".*\.experts",
    "router",
]


@dataclass
class RSVLMCausalLMOutput(ModelOutput):
    """Causal-LM output plus the connector's image features and the routing token types."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Any = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    image_hidden_states: torch.Tensor | None = None
    token_types: torch.Tensor | None = None


class RetrievalProjection(nn.Module):
    """Pooled multi-level vision features -> the retriever's text-embedding space (CLIP-style)."""

    INITIAL_LOGIT_SCALE = 2.6592  # log(1 / 0.07), CLIP's initial temperature

    def __init__(self, config: RSVLMConfig) -> None:
        super().__init__()
        d_in = config.vision_config.hidden_size * config.num_levels
        d_out = int(config.retrieval_embed_dim)
        self.norm = nn.LayerNorm(d_in)
        self.fc1 = nn.Linear(d_in, 2 * d_out)
        self.act = ACT2FN["gelu"]
        self.fc2 = nn.Linear(2 * d_out, d_out)
        # CLIP's learnable temperature, stored with the projection for contrastive training.
        self.logit_scale = nn.Parameter(torch.tensor(self.INITIAL_LOGIT_SCALE))

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        pooled = torch.cat([level.mean(dim=1) for level in levels], dim=-1)
        return self.fc2(self.act(self.fc1(self.norm(pooled))))


class RSVLMPreTrainedModel(PreTrainedModel):
    config_class = RSVLMConfig
    config: RSVLMConfig
    base_model_prefix = "rsvlm"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = 0.02
        if isinstance(module, PerceiverConnector):
            for queries in module.queries:
                init.normal_(queries, mean=0.0, std=std)
        elif isinstance(module, SemanticPrompter):
            init.normal_(module.aggregation, mean=0.0, std=std)
            init.zeros_(module.null_semantic)
        elif isinstance(module, RetrievalProjection):
            init.constant_(module.logit_scale, module.INITIAL_LOGIT_SCALE)
        elif isinstance(module, LowRankExpert):
            init.zeros_(module.expand.weight)
        elif isinstance(module, BoxHead):
            init.zeros_(module.kind)
            init.copy_(module.position, sincos_2d(module.grid, module.position.shape[1]))
            init.copy_(module.centres, patch_centres(module.grid))
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            # A fused projection is a bare Parameter the base init does not know.
            init.xavier_uniform_(module.in_proj_weight)
            init.zeros_(module.in_proj_bias)


class RSVLMForConditionalGeneration(RSVLMPreTrainedModel, GenerationMixin):
    """The whole model in one state dict: ``vision_tower``, ``connector``, ``language_model``
    (a stock `AutoModelForCausalLM`, possibly with semantic experts wrapped around some FFNs),
    ``retrieval_projection`` and, when configured, ``box_head``."""

    def __init__(
        self,
        config: RSVLMConfig,
        vision_model: PreTrainedModel | None = None,
        language_model: PreTrainedModel | None = None,
    ) -> None:
        super().__init__(config)
        self.vision_tower = VisionTower(config, vision_model)
        self.connector = build_connector(config)
        self.language_model = (
            language_model
            if language_model is not None
            else AutoModelForCausalLM.from_config(config.text_config)
        )
        self.retrieval_projection = (
            RetrievalProjection(config) if config.retrieval_embed_dim is not None else None
        )
        self.box_head = (
            BoxHead(config.vision_config.hidden_size, config.num_levels,
                    config.text_config.hidden_size, config.patch_grid, config.box_head_dim,
                    config.box_head_layers, config.box_head_heads)
            if config.box_head_dim is not None else None
        )
        if config.experts_enabled:
            inject_semantic_experts(
                self.language_model,
                layer_indices=config.expert_layer_indices,
                num_layers=config.text_config.num_hidden_layers,
                hidden_size=config.text_config.hidden_size,
                num_levels=config.num_levels,
                rank=config.experts_rank,
                act=config.experts_hidden_act,
            )
        self.post_init()

    # ------------------------------------------------------------------ assembly
    @classmethod
    def from_parts(
        cls,
        vision_model: PreTrainedModel,
        language_model: PreTrainedModel,
        config: RSVLMConfig | None = None,
        *,
        tokenizer: Any = None,
        **config_kwargs: Any,
    ) -> RSVLMForConditionalGeneration:
        """Assemble a model around already loaded (pretrained) vision and language models.

        Connector, experts and retrieval projection are freshly initialised; the parts keep their
        weights. With a ``tokenizer``, the image token is added to it (as a special token), the
        LM's embeddings are resized when needed and ``config.image_token_id`` is set.
        """
        if language_model.get_output_embeddings() is None:
            raise ValueError(
                f"from_parts: {type(language_model).__name__} has no LM head; load the language "
                "model with AutoModelForCausalLM."
            )
        if config is None:
            config = RSVLMConfig(
                vision_config=vision_model.config,
                text_config=language_model.config,
                **config_kwargs,
            )
        elif config_kwargs:
            raise ValueError("Pass either a config or config keyword arguments, not both.")
        for name, part, sub in (
            ("vision", vision_model, config.vision_config),
            ("text", language_model, config.text_config),
        ):
            if part.config.model_type != sub.model_type:
                raise ValueError(
                    f"from_parts: the {name} model is a {part.config.model_type!r} but the "
                    f"config's {name}_config is {sub.model_type!r}."
                )
        # One config object per part, so later resizes stay consistent.
        config.vision_config = vision_model.config
        config.text_config = language_model.config
        if tokenizer is not None:
            config.image_token_id = add_image_token(tokenizer, config.image_token)
            known = language_model.get_input_embeddings().num_embeddings
            if len(tokenizer) > known:
                language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
                # The new rows (the image placeholder: its input row is replaced by image features,
                # its output is suppressed) are the mean of the pretrained rows, not a random
                # draw, so the same parts give the same weights on every load.
                with torch.no_grad():
                    tables = {
                        id(m.weight): m.weight
                        for m in (
                            language_model.get_input_embeddings(),
                            language_model.get_output_embeddings(),
                        )
                        if m is not None and m.weight.shape[0] > known
                    }
                    for weight in tables.values():
                        weight[known:] = weight[:known].mean(dim=0)
        if config.image_token_id is None:
            raise ValueError(
                "from_parts: config.image_token_id is not set; pass the LLM tokenizer so the "
                "image token can be added to it."
            )
        config.check_consistency()
        # Pretrained parts must not be re-initialised by `post_init`.
        for part in (vision_model, language_model):
            for module in part.modules():
                module._is_hf_initialized = True
        model = cls(config, vision_model=vision_model, language_model=language_model)
        if getattr(language_model, "generation_config", None) is not None:
            # Keep the chat model's own decoding defaults (eos ids, sampling settings).
            model.generation_config = copy.deepcopy(language_model.generation_config)
        return model

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> RSVLMForConditionalGeneration:
        """`PreTrainedModel.from_pretrained`; a bitsandbytes config without explicit skip modules
        quantizes only the language model (see `NON_QUANTIZED_MODULES`)."""
        qconfig = kwargs.get("quantization_config")
        if qconfig is not None and getattr(qconfig, "llm_int8_skip_modules", False) is None:
            qconfig.llm_int8_skip_modules = list(NON_QUANTIZED_MODULES)
        return super().from_pretrained(*args, **kwargs)

    # ------------------------------------------------------------------ embeddings plumbing
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    # ------------------------------------------------------------------ vision side
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        semantic_input_ids: torch.Tensor | None = None,
        semantic_attention_mask: torch.Tensor | None = None,
        query_input_ids: torch.Tensor | None = None,
        query_attention_mask: torch.Tensor | None = None,
        **vision_kwargs: Any,
    ) -> torch.Tensor:
        """Connector output for each image: ``(num_images, num_image_tokens, text_hidden)``."""
        levels = self.vision_tower(pixel_values, **vision_kwargs)
        n_images = levels[0].shape[0]
        embed = self.get_input_embeddings()
        extra: dict[str, torch.Tensor | None] = {}
        for name, ids, mask in (
            ("semantic", semantic_input_ids, semantic_attention_mask),
            ("query", query_input_ids, query_attention_mask),
        ):
            if ids is None or self.config.connector_type != "semantic_prompter":
                continue  # only the prompter reads them
            if ids.shape[0] != n_images:
                raise ValueError(
                    f"{name}_input_ids has {ids.shape[0]} rows but there are {n_images} images; "
                    "give one row per image."
                )
            extra[f"{name}_embeds"] = embed(ids)
            extra[f"{name}_mask"] = mask
        features = self.connector(levels, **extra)
        if features.shape[1] != self.config.num_image_tokens:
            raise ValueError(
                f"The connector produced {features.shape[1]} tokens per image, the config "
                f"promises {self.config.num_image_tokens}."
            )
        return features

    def embed_image_for_retrieval(
        self, pixel_values: torch.Tensor, **vision_kwargs: Any
    ) -> torch.Tensor:
        """Unit-norm image vectors in the retriever's text-embedding space ``(n, embed_dim)``."""
        if self.retrieval_projection is None:
            raise ValueError("This model has no retrieval projection (retrieval_embed_dim=None).")
        levels = self.vision_tower(pixel_values, **vision_kwargs)
        dtype = self.retrieval_projection.fc1.weight.dtype
        vectors = self.retrieval_projection([level.to(dtype) for level in levels])
        # float32 for the faiss index, whatever the model's dtype.
        return nn.functional.normalize(vectors.float(), dim=-1)

    def predict_boxes(
        self,
        pixel_values: torch.Tensor,
        query_input_ids: torch.Tensor,
        query_attention_mask: torch.Tensor,
        **vision_kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The box head on images and their questions: per-patch logits ``(n, P)`` and boxes
        ``(n, P, 4)`` (x1, y1, x2, y2 in 0-1 of the image); see `rsvlm.box_head`."""
        if self.box_head is None:
            raise ValueError("This model has no box head (box_head_dim=None).")
        levels = self.vision_tower(pixel_values, **vision_kwargs)
        embeds = self.get_input_embeddings()(query_input_ids)
        return self.box_head(levels, embeds, query_attention_mask)

    def image_token_types(self, image_mask: torch.Tensor) -> torch.Tensor:
        """Routing types for a placeholder mask ``(batch, seq)``: image / semantic level / text."""
        cfg = self.config
        order = torch.cumsum(image_mask.flatten().long(), dim=0).view_as(image_mask) - 1
        pos = order % cfg.num_image_tokens  # position inside its image's placeholder block
        n_patch = cfg.num_patch_tokens
        level = (pos - n_patch).clamp(min=0) // cfg.prompter_num_tokens
        types = torch.where(
            pos < n_patch,
            torch.full_like(pos, TOKEN_TYPE_IMAGE),
            TOKEN_TYPE_SEMANTIC + level,
        )
        return torch.where(image_mask, types, torch.full_like(types, TOKEN_TYPE_TEXT))

    def prepare_inputs_embeds(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        semantic_input_ids: torch.Tensor | None = None,
        semantic_attention_mask: torch.Tensor | None = None,
        query_input_ids: torch.Tensor | None = None,
        query_attention_mask: torch.Tensor | None = None,
        *,
        has_cache: bool = False,
        return_image_features: bool = False,
        **vision_kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Token embeddings with image features scattered in, and the routing token types."""
        if self.config.image_token_id is None:
            raise ValueError("config.image_token_id is not set; build the model with from_parts.")
        inputs_embeds = self.get_input_embeddings()(input_ids)
        image_mask = input_ids == self.config.image_token_id
        n_placeholders = int(image_mask.sum())
        features = None
        if pixel_values is None or (n_placeholders == 0 and has_cache):
            if n_placeholders:
                raise ValueError(
                    f"The prompt holds {n_placeholders} image tokens but no pixel_values were given."
                )
            types = torch.full_like(input_ids, TOKEN_TYPE_TEXT)
        else:
            features = self.get_image_features(
                pixel_values,
                semantic_input_ids,
                semantic_attention_mask,
                query_input_ids,
                query_attention_mask,
                **vision_kwargs,
            )
            expected = features.shape[0] * features.shape[1]
            if n_placeholders != expected:
                raise ValueError(
                    f"Image features and image tokens do not match: the prompt holds "
                    f"{n_placeholders} image tokens but {features.shape[0]} image(s) need "
                    f"{features.shape[1]} each ({expected}). Build prompts with RSVLMProcessor."
                )
            flat = features.reshape(-1, features.shape[-1]).to(inputs_embeds.dtype)
            inputs_embeds = inputs_embeds.masked_scatter(image_mask.unsqueeze(-1), flat)
            types = self.image_token_types(image_mask)
        if return_image_features:
            return inputs_embeds, types, features
        return inputs_embeds, types

    # ------------------------------------------------------------------ forward / generate
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        semantic_input_ids: torch.LongTensor | None = None,
        semantic_attention_mask: torch.Tensor | None = None,
        query_input_ids: torch.LongTensor | None = None,
        query_attention_mask: torch.Tensor | None = None,
        token_types: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> RSVLMCausalLMOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        vision_kwargs = {k: v for k, v in (("pixel_attention_mask", pixel_attention_mask),
                                            ("spatial_shapes", spatial_shapes)) if v is not None}
        features = None
        if inputs_embeds is None:
            has_cache = past_key_values is not None and past_key_values.get_seq_length() > 0
            inputs_embeds, types, features = self.prepare_inputs_embeds(
                input_ids,
                pixel_values,
                semantic_input_ids,
                semantic_attention_mask,
                query_input_ids,
                query_attention_mask,
                has_cache=has_cache,
                return_image_features=True,
                **vision_kwargs,
            )
        else:
            if pixel_values is not None:
                raise ValueError(
                    "pixel_values need input_ids to locate the image tokens; with inputs_embeds, "
                    "compute them with prepare_inputs_embeds()."
                )
            types = torch.full(
                inputs_embeds.shape[:2],
                TOKEN_TYPE_TEXT,
                dtype=torch.long,
                device=inputs_embeds.device,
            )
        set_routing(self, _explicit_routing(types, token_types))
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        return RSVLMCausalLMOutput(
            loss=outputs.loss,
            logits=outputs.logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=features,
            token_types=types,
        )

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: Any = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The stock preparation; query/semantic inputs and token types only on the prefill step
        (`generate()` already drops ``pixel_values`` there)."""
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        if not is_first_iteration and kwargs.get("use_cache", True):
            for key in _PREFILL_ONLY_INPUTS:
                model_inputs.pop(key, None)
        return model_inputs

    # ------------------------------------------------------------------ structural helpers
    def semantic_experts(self) -> list[SemanticExpertsMLP]:
        return expert_modules(self)


def _explicit_routing(types: torch.Tensor, token_types: torch.Tensor | None) -> torch.Tensor:
    """Explicit routing (the engine's prefix) wins over the derived one; generate() may pass
    the types of the whole prompt while only its uncached tail runs."""
    if token_types is None:
        return types
    seq = types.shape[1]
    if token_types.shape[1] < seq:
        raise ValueError(f"token_types cover {token_types.shape[1]} positions, the input {seq}.")
    return token_types[:, -seq:].to(types.device)


def add_image_token(tokenizer: Any, image_token: str = "<image>") -> int:
    """Add ``image_token`` to the tokenizer as a special token (if missing); return its id."""
    from tokenizers import AddedToken

    if image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens(
            [AddedToken(image_token, special=True, normalized=False)], special_tokens=True
        )
    token_id = tokenizer.convert_tokens_to_ids(image_token)
    if not isinstance(token_id, int) or token_id < 0:
        raise ValueError(f"Could not add {image_token!r} to the tokenizer.")
    return token_id


AutoModelForImageTextToText.register(RSVLMConfig, RSVLMForConditionalGeneration, exist_ok=True)
AutoModel.register(RSVLMConfig, RSVLMForConditionalGeneration, exist_ok=True)

__all__ = [
    "NON_QUANTIZED_MODULES",
    "RSVLMCausalLMOutput",
    "RSVLMForConditionalGeneration",
    "RSVLMPreTrainedModel",
    "RetrievalProjection",
    "add_image_token",
]
