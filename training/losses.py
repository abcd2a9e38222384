"""The loss of each kind of stage, on one batch of `training.stage_data`."""

from __future__ import annotations

from typing import Any

import torch

from training.fit_config import StageConfig
from training.model_setup import base_model


def _unwrapped(model: Any) -> Any:
    """The RSVLM model under accelerate's (DDP) and peft's wrappers."""
    return base_model(model.module if hasattr(model, "module") else model)


def box_loss(model: Any, stage: StageConfig, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The box head against the patch assignment of the true boxes (`training.box_targets`)."""
    from training.box_targets import box_head_loss

    logits, boxes = _unwrapped(model).predict_boxes(batch["rows"], batch["query_input_ids"],
                                                    batch["query_attention_mask"])
    return box_head_loss(logits, boxes, batch["assign"], batch["truth"])


def retrieval_loss(model: Any, stage: StageConfig, batch: dict[str, torch.Tensor]
                   ) -> torch.Tensor:
    """InfoNCE of image rows against texts: the batch's, or the whole database's."""
    base = _unwrapped(model)
    # Rows of the feature cache stand in for pixels (see training.features).
    image = base.embed_image_for_retrieval(batch["rows"])
    scale = base.retrieval_projection.logit_scale.exp().clamp(max=100)
    if "database" in batch:  # negatives: database
        logits = scale * image @ batch["database"].to(image.dtype).T
        pos = batch["positives"].to(image.dtype)
        if stage.positives == "any":
            log_p = logits.log_softmax(-1).masked_fill(pos == 0, float("-inf"))
            return -log_p.logsumexp(-1).mean()
        return torch.nn.functional.cross_entropy(logits, pos / pos.sum(1, keepdim=True))
    text = torch.nn.functional.normalize(batch["text"].to(image.dtype), dim=-1)
    logits = scale * image @ text.T
    # Identical descriptions, and images of one scene class, are not negatives of each
    # other (a class's sentences come from several templates): see stage_data.
    same = batch["group"][:, None] == batch["group"][None, :]
    target = same.float() / same.float().sum(1, keepdim=True)
    loss_i = torch.nn.functional.cross_entropy(logits, target)
    loss_t = torch.nn.functional.cross_entropy(logits.T, target)
    return (loss_i + loss_t) / 2


def lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token loss computing the vocabulary projection only where an answer token is
    predicted: the tied 49k x 576 head is a fifth of SmolLM2's FLOPs, and prompts (image,
    class list) are most of every sequence. Equal to the model's own `labels=` loss."""
    batch = dict(batch)
    labels = batch.pop("labels")
    target = labels[:, 1:]
    keep = (target != -100).any(0).nonzero().squeeze(1)
    if keep.numel() == 0:  # every answer truncated away: a zero loss that still has a graph
        return model(**batch, logits_to_keep=1, use_cache=False).logits.sum() * 0.0
    logits = model(**batch, logits_to_keep=keep, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                             target[:, keep].flatten(), ignore_index=-100)


def lm_stage_loss(model: Any, stage: StageConfig, batch: dict[str, torch.Tensor]
                  ) -> torch.Tensor:
    return lm_loss(model, batch)


__all__ = ["box_loss", "lm_loss", "lm_stage_loss", "retrieval_loss"]
