"""Vision tower: any Hugging Face vision encoder, returning patch tokens of several layers."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel

from rsvlm.configuration import RSVLMConfig


class VisionTower(nn.Module):
    """Wraps a vision encoder built with `AutoModel.from_config` and selects multi-level features.

    `forward(pixel_values)` returns one ``(batch, num_patches, vision_hidden)`` tensor per entry
    of ``config.vision_feature_layers`` (indices into the encoder's ``hidden_states`` tuple), with
    the CLS and register tokens dropped: whatever precedes the last ``num_patches`` tokens is a
    prefix token (DINOv2: CLS + registers, CLIP: CLS, SigLIP: none).

    Under `torch.inference_mode` the last result is kept for identical pixels: a chat turn
    embeds the chip for retrieval and then again inside `generate()`, and the tower is a fifth
    of the first-token time on a CPU. Training (autograd on) never reuses anything.
    """

    def __init__(self, config: RSVLMConfig, model: PreTrainedModel | None = None) -> None:
        super().__init__()
        self.feature_layers = list(config.vision_feature_layers)
        self.num_patches = config.num_patches
        self.num_prefix_tokens = _num_prefix_tokens(config.vision_config)
        self.model = model if model is not None else AutoModel.from_config(config.vision_config)
        self._memo: tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None = None

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def forward(
        self, pixel_values: torch.Tensor, **vision_kwargs: torch.Tensor
    ) -> list[torch.Tensor]:
        reuse = torch.is_inference_mode_enabled() and not vision_kwargs
        memo = self._memo if reuse else None
        if (memo is not None and memo[0].shape == pixel_values.shape
                and memo[0].device == pixel_values.device
                and memo[0].dtype == pixel_values.dtype and torch.equal(memo[0], pixel_values)):
            return list(memo[1])
        levels = self._levels(pixel_values, **vision_kwargs)
        if reuse:
            self._memo = (pixel_values.clone(), tuple(levels))
        return levels

    def train(self, mode: bool = True) -> VisionTower:
        self._memo = None  # weights may change from here on
        return super().train(mode)

    def _levels(
        self, pixel_values: torch.Tensor, **vision_kwargs: torch.Tensor
    ) -> list[torch.Tensor]:
        # `vision_kwargs` carries e.g. SigLIP2's `pixel_attention_mask` / `spatial_shapes`.
        out = self.model(
            pixel_values=pixel_values.to(self.dtype),
            output_hidden_states=True,
            return_dict=True,
            **vision_kwargs,
        )
        hidden = out.hidden_states
        levels = []
        for idx in self.feature_layers:
            h = hidden[idx]
            prefix = self.num_prefix_tokens
            expected = self.num_patches + (prefix or 0)
            if h.shape[1] < self.num_patches or (prefix is not None and h.shape[1] != expected):
                size = getattr(self.model.config, "image_size", "?")
                raise ValueError(
                    f"The vision encoder returned {h.shape[1]} tokens but the config expects "
                    f"{self.num_patches} patches: pixel_values must be {size}x{size} pixels "
                    f"(got {tuple(pixel_values.shape)})."
                )
            levels.append(h[:, h.shape[1] - self.num_patches :])
        return levels


def _num_prefix_tokens(vision_config) -> int | None:
    """CLS/register tokens ahead of the patch grid, or None when unknown (then: all but the grid)."""
    model_type = vision_config.model_type
    if model_type.startswith("dinov2"):
        return 1 + int(getattr(vision_config, "num_register_tokens", 0) or 0)
    if model_type.startswith("clip"):
        return 1
    if model_type.startswith("siglip"):
        return 0
    return None


__all__ = ["VisionTower"]
