"""The kinds of curriculum stage, each as what it reads, how it batches and what it minimises.

A new kind of stage is one `StageKind` here (plus its name in `training.fit_config.STAGE_KINDS`,
which the config validates without importing torch); the stage loop (`training.fit`) looks the
kind up and knows none of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training import losses, stage_data
from training.fit_config import STAGE_KINDS, FitConfig, StageConfig


@dataclass(frozen=True)
class StageKind:
    #: ``(stage, data_dir) -> image names`` whose vision features the run caches
    images: Callable[[StageConfig, Path], set[str]]
    #: ``(cfg, stage, data_dir, model, processor, cache) -> (dataset, collate_fn)``
    batches: Callable[..., tuple[Any, Any]]
    #: ``(model, stage, batch) -> scalar loss``
    loss: Callable[[Any, StageConfig, dict[str, torch.Tensor]], torch.Tensor]
    #: the feature cache the stage reads: "levels" (every level's patches) or "pooled" (means)
    features: str = "levels"


KINDS: dict[str, StageKind] = {
    "lm": StageKind(stage_data.lm_images, stage_data.lm_batches, losses.lm_stage_loss),
    "retrieval": StageKind(stage_data.retrieval_images, stage_data.retrieval_batches,
                           losses.retrieval_loss, features="pooled"),
    "boxes": StageKind(stage_data.box_images, stage_data.box_batches, losses.box_loss),
}
if set(KINDS) != set(STAGE_KINDS):  # the config's names and these must not drift apart
    raise ImportError(f"stage kinds {sorted(KINDS)} != STAGE_KINDS {sorted(STAGE_KINDS)}")


def stage_images(cfg: FitConfig) -> list[str]:
    """Absolute paths of the images the stages read: a box stage its grounding chips only, a
    retrieval stage the described images (and their views), not every training image."""
    images: set[str] = set()
    for stage in cfg.stages:
        data_dir = Path(stage.data or cfg.data)
        names = KINDS[stage.kind].images(stage, data_dir)
        images |= {str((data_dir / n).resolve()) for n in names}
    return sorted(images)


def stage_batches(cfg: FitConfig, stage: StageConfig, model: Any, processor: Any,
                  cache: Any) -> tuple[Any, Any]:
    """(dataset, collate_fn) for a stage."""
    data_dir = Path(stage.data or cfg.data)
    return KINDS[stage.kind].batches(cfg, stage, data_dir, model, processor, cache)


def stage_loss(model: Any, stage: StageConfig, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return KINDS[stage.kind].loss(model, stage, batch)


__all__ = ["KINDS", "StageKind", "stage_batches", "stage_images", "stage_loss"]
