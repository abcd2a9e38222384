"""What each kind of stage trains on: ``(dataset, collate_fn)`` per stage, from a `build-data`
folder (read through `training.dataset_files`) and the run's feature cache.

- ``lm`` stages: conversations (`training.lm_data`), optionally with the descriptions the
  trained retriever finds for each image (``semantic: retrieved``);
- ``retrieval`` stages: image rows against their scene descriptions (``negatives: batch``) or
  against the whole semantic database (``negatives: database``);
- ``boxes`` stages: grounding samples with their patch assignments (`training.box_targets`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from training.dataset_files import (
    class_views,
    database_positives,
    database_rows,
    grounding_boxes,
    scene_texts,
    view_origins,
)
from training.features import FeatureCache
from training.fit_config import FitConfig, StageConfig
from training.lm_data import LMCollator, read_examples
from training.model_setup import base_model

log = logging.getLogger(__name__)


def retrieval_images(stage: StageConfig, data_dir: Path) -> set[str]:
    """The described images (and their views)."""
    scenes = scene_texts(data_dir)
    return set(scenes) | (set(class_views(data_dir, scenes)) if stage.augmented else set())


def box_images(stage: StageConfig, data_dir: Path) -> set[str]:
    """The grounding chips only."""
    return {image for image, _, _ in grounding_boxes(data_dir)}


def lm_images(stage: StageConfig, data_dir: Path) -> set[str]:
    """The images of the stage's tasks."""
    return {ex.image for ex in read_examples(data_dir, "train", stage.tasks)}


def final_database(cfg: FitConfig) -> Any:
    texts, meta = database_rows(Path(cfg.data))
    if not texts:
        return None
    from rsvlm.retrieval import SemanticDatabase

    return SemanticDatabase.from_texts(texts, meta, text_encoder(cfg))


def retrieval_batches(cfg: FitConfig, stage: StageConfig, data_dir: Path, model: Any,
                      processor: Any, cache: FeatureCache | None) -> tuple[Any, Any]:
    """Image rows and their scene descriptions (``negatives: batch``), or rows and their
    positives over the whole database (``negatives: database``)."""
    if cache is None:
        raise ValueError("the retrieval stage needs cache_features: true")
    scenes = scene_texts(data_dir)
    if not scenes:
        raise ValueError(f"{data_dir} has no scene descriptions (texts.jsonl) to align with")
    views = class_views(data_dir, scenes) if stage.augmented else {}
    names = sorted(scenes)
    if stage.negatives == "database":
        return database_batches(cfg, data_dir, names, cache, views,
                                 scene=stage.scene_positives)
    scenes.update({view: scenes[origin] for view, origin in views.items()})
    names = with_views(sorted(scenes), views)
    vectors = torch.from_numpy(text_encoder(cfg).encode([scenes[n][0] for n in names]))
    rows = [cache.rows[str((data_dir / n).resolve())] for n in names]
    # Positives of each other: images of one class, and images with one description.
    group_ids: dict[str, int] = {}
    groups = [group_ids.setdefault(scenes[n][1] or f"text:{scenes[n][0]}", len(group_ids))
              for n in names]
    dataset = list(zip(rows, vectors, groups, strict=True))

    def collate(items: list[tuple[int, torch.Tensor, int]]) -> dict[str, torch.Tensor]:
        return {"rows": torch.tensor([r for r, _, _ in items]),
                "text": torch.stack([v for _, v, _ in items]),
                "group": torch.tensor([g for _, _, g in items])}

    return dataset, collate


def lm_batches(cfg: FitConfig, stage: StageConfig, data_dir: Path, model: Any, processor: Any,
               cache: FeatureCache | None) -> tuple[Any, Any]:
    """Conversations of the stage's tasks, with retrieved descriptions when asked for."""
    examples = read_examples(data_dir, "train", stage.tasks)
    if not examples:
        raise ValueError(f"stage {stage.name}: no training examples for tasks {stage.tasks}")
    # Absolute image keys, so one feature cache serves several datasets.
    examples = [dataclasses.replace(ex, image=str((data_dir / ex.image).resolve()))
                for ex in examples]
    origins = view_origins(data_dir)
    if not stage.augmented and origins:
        examples = [ex for ex in examples if ex.image not in origins]
    semantic = None
    if stage.semantic == "retrieved":
        texts, meta = database_rows(data_dir)
        if texts and cache is not None and base_model(model).retrieval_projection is not None:
            from rsvlm.retrieval import SemanticDatabase

            for m in meta:
                m["image"] = str((data_dir / m["image"]).resolve())
            db = SemanticDatabase.from_texts(texts, meta, text_encoder(cfg))
            semantic = _retrieved_texts(model, cache, sorted({e.image for e in examples}), db,
                                        cfg.retrieval_top_k, origins)
        else:
            log.warning("stage %s: no database or retriever; training without semantic texts",
                        stage.name)
    collate = LMCollator(processor, cfg.max_length, rows=cache.rows if cache else None,
                         image_root=Path("/"), semantic=semantic)
    return examples, collate


def with_views(names: list[str], views: dict[str, str]) -> list[str]:
    """``names`` plus the views; an image without views is listed as often as one with them
    (itself + its views), so that the views do not shrink the other images' share of the
    batches (region chips would otherwise fall from a quarter of the retriever's data to a
    twentieth, and their retrievals drift)."""
    if not views:
        return names
    per_origin: Counter[str] = Counter(views.values())
    repeat = 1 + max(per_origin.values())
    out = []
    for n in names:
        if n in views:
            continue
        out += [n] if n in per_origin else [n] * repeat
    return sorted(out + list(views))


def database_batches(cfg: FitConfig, data_dir: Path, names: list[str],
                      cache: FeatureCache, views: dict[str, str] | None = None,
                      scene: bool = False) -> tuple[Any, Any]:
    """Rows + positives over the whole database (`negatives: database`); a view of a
    classified image has its origin's positives (`_class_views`)."""
    texts, _ = database_rows(data_dir)
    positives = database_positives(data_dir, texts, scene)
    views = {v: o for v, o in (views or {}).items() if positives.get(o)}
    for view, origin in views.items():
        positives[view] = positives[origin]
    names = with_views([n for n in names if positives.get(n)], views)
    database = torch.nn.functional.normalize(
        torch.from_numpy(text_encoder(cfg).encode(texts)).float(), dim=-1)
    dataset = [(cache.rows[str((data_dir / n).resolve())], positives[n]) for n in names]

    def collate(items: list[tuple[int, list[int]]]) -> dict[str, torch.Tensor]:
        pos = torch.zeros(len(items), len(texts))
        for row, (_, ids) in enumerate(items):
            pos[row, ids] = 1.0
        return {"rows": torch.tensor([r for r, _ in items]), "positives": pos,
                "database": database}

    return dataset, collate


def box_batches(cfg: FitConfig, stage: StageConfig, data_dir: Path, model: Any, processor: Any,
                cache: FeatureCache | None) -> tuple[Any, Any]:
    """(cache row, question ids, patch assignment, boxes in 0-1) per grounding sample."""
    from PIL import Image

    from training.box_targets import assign_patches

    if cache is None:
        raise ValueError(f"stage {stage.name}: the box head trains on cache_features: true")
    head = base_model(model).box_head
    if head is None:
        raise ValueError(f"stage {stage.name}: the model has no box head; set "
                         "model_overrides: {box_head_dim: 192}")
    origins = view_origins(data_dir)
    samples = [s for s in grounding_boxes(data_dir)
               if stage.augmented or str((data_dir / s[0]).resolve()) not in origins]
    if not samples:
        raise ValueError(f"stage {stage.name}: {data_dir} has no grounding samples with boxes")
    sizes: dict[str, tuple[int, int]] = {}
    dataset = []
    for image, question, boxes_px in samples:
        key = str((data_dir / image).resolve())
        if key not in sizes:
            with Image.open(key) as im:  # the header only
                sizes[key] = im.size
        w, h = sizes[key]
        boxes = torch.tensor(boxes_px, dtype=torch.float32) / torch.tensor([w, h, w, h])
        ids, _ = processor.encode_queries([question])
        dataset.append((cache.rows[key], ids[0], assign_patches(boxes, head.grid), boxes))

    def collate(items: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]
                ) -> dict[str, torch.Tensor]:
        width = max(len(ids) for _, ids, _, _ in items)
        most = max(len(b) for _, _, _, b in items)
        ids = torch.zeros(len(items), width, dtype=torch.long)
        mask = torch.zeros(len(items), width, dtype=torch.long)
        truth = torch.zeros(len(items), most, 4)
        for i, (_, q, _, b) in enumerate(items):
            ids[i, :len(q)], mask[i, :len(q)] = q, 1
            truth[i, :len(b)] = b
        return {"rows": torch.tensor([r for r, _, _, _ in items]), "query_input_ids": ids,
                "query_attention_mask": mask,
                "assign": torch.stack([a for _, _, a, _ in items]), "truth": truth}

    return dataset, collate


def text_encoder(cfg: FitConfig) -> Any:
    """The frozen sentence encoder the retriever aligns with (the run's, or the embedded one)."""
    from rsvlm import text_encoder as encoders

    return encoders.text_encoder(cfg.text_encoder)


def _retrieved_texts(model: Any, cache: FeatureCache, images: list[str], database: Any,
                     k: int, origins: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Top-k database texts per image, leaving out the descriptions only this image has (a text
    that other images share, e.g. a scene-class sentence, says nothing private about it). A
    rotated view of a chip leaves out its origin's descriptions the same way."""
    origins = origins or {}
    base = base_model(model)
    out: dict[str, list[str]] = {}
    with torch.inference_mode():
        for start in range(0, len(images), 64):
            names = images[start:start + 64]
            rows = torch.tensor([cache.rows[n] for n in names])
            levels = cache.levels(rows, torch.float32, "cpu")
            vec = base.retrieval_projection.to("cpu", torch.float32)(levels)
            vec = torch.nn.functional.normalize(vec, dim=-1).numpy()
            hits = database.search(vec, k + 8)
            for name, hs in zip(names, hits, strict=True):
                out[name] = [
                    h.text for h in hs
                    if h.metadata.get("image") != origins.get(name, name)
                    or h.metadata.get("sources", 1) > 1
                ][:k]
    return out
