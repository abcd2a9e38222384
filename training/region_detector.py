"""The shipped detector fine-tuned on an analyst's region (a step of `rsvlm-train finetune`).

The detector (`rsvlm.perception`) answers presence, counts, rural/urban and "find all"; it was
trained on other places. Here it continues on the region's own training chips (the same
spatial-block split as the instruction data, so the held-back chips stay unseen), as augmented
views through the frozen tower, starting from the shipped weights. A few dozen chips move the
head's scores (they hold more buildings per view than the mix it was trained on), so its
thresholds are chosen again, on the training chips as they are (never on the held-back ones).
"""

from __future__ import annotations

import logging
import random
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def region_items(spec: Any, seed: int, split: str = "train") -> list[Any]:
    """The region's chips of ``split`` as labelled images: pixels and building boxes."""
    from training.build import BuildConfig, RegionBuilder
    from training.labelled import LabelledImage

    builder = RegionBuilder(spec, BuildConfig(seed=seed, tasks=("grounding",), balance=False))
    items = []
    for rec, chip in builder.chips():
        ctx = rec.ctx
        if ctx.split != split:
            continue
        boxes = [o.box for o in ctx.objects if o.cls == "building" and o.kind in {"area", "point"}]
        items.append(LabelledImage(spec.name, ctx.chip_id, chip.pixels,
                                   np.asarray(boxes, np.float32).reshape(-1, 4),
                                   ["building"] * len(boxes), ctx.gsd))
    return items


def tune_detector(spec: Any, shipped: Path, out: Path, *, preset: str = "embedded",
                  views_per_chip: int = 6, max_views: int = 480, epochs: int = 6,
                  lr: float = 5e-4, seed: int = 0, tower: Any = None) -> Path | None:
    """``out/detector/``: the detector of ``shipped`` continued on the region's training chips;
    None when ``shipped`` has no detector or the region no training chip with a building."""
    from rsvlm.perception import (
        CONFIG_NAME,
        DETECTOR_DIR,
        DetectorConfig,
        detector_refiner,
        load_detector,
        save_detector,
    )
    from training.detection import (
        THRESHOLDS,
        FrozenTower,
        View,
        augment_view,
        cache_views,
        choose_threshold,
        predict,
        train_detector,
    )

    if (out / DETECTOR_DIR / CONFIG_NAME).is_file():
        return out / DETECTOR_DIR
    found = load_detector(shipped)
    if found is None:
        return None
    head, config = found
    items = [it for it in region_items(spec, seed) if len(it.boxes)]
    if not items:
        log.warning("%s: no training chip holds a building; the shipped detector stays", spec.name)
        return None
    rng = random.Random(f"{seed}:{spec.name}:detector")
    n = min(views_per_chip * len(items), max_views)
    views = [View(it.name, it.image, it.boxes) for it in items]  # each chip as it is, once
    for i in range(max(n - len(views), 0)):
        item = rng.choice(items)
        views.append(augment_view(item, rng, max(item.size), f"aug{i}"))
    tower = tower or FrozenTower(preset, size=config.input_size, layers=config.layers)
    data = cache_views(tower, views, None)
    x = data["features"]
    # The region's chips label buildings only: the other classes' heatmaps learn nothing from
    # them (`rsvlm.detector.detection_loss`), so its trees are not taught to be background.
    building = config.labels.index("building")
    classes = len(config.labels)
    known = torch.zeros(len(views), classes, dtype=torch.bool)
    known[:, building] = True
    tuned = train_detector(x, data["boxes"], hidden=x.shape[-1], levels=x.shape[1],
                           epochs=epochs, lr=lr, seed=seed, init=head, classes=classes,
                           view_classes=[building] * len(views),
                           known=known if classes > 1 else None,
                           # on as the shipped heads learnt: their scores keep their meaning
                           iou_target=bool(config.notes.get("iou_target", False)),
                           ignore_below=float(config.notes.get("ignore_below", 0.0)))
    plain = slice(0, len(items))  # the chips themselves, not their augmented views
    preds = predict(tuned, x[plain], 0.1, cls=building)
    # The shipped box refiner goes along unchanged, and the thresholds are chosen on the
    # boxes it gives, as the chat path will read them.
    refiner = detector_refiner(shipped, config)
    if refiner is not None:
        from training.refine import refined_predictions

        cfg = config.refiner or {}
        preds = refined_predictions(refiner, [it.image for it in items], preds,
                                    int(cfg.get("steps", 1)), float(cfg.get("rescore", 0.0)))
    truths, sizes = data["boxes"][plain], data["sizes"][plain]
    threshold = choose_threshold(preds, truths, sizes, THRESHOLDS)
    count_threshold = choose_threshold(preds, truths, sizes, THRESHOLDS, metric="count")
    notes = {**config.notes, "tuned_on": spec.name, "tuned_views": len(views),
             "tuned_epochs": epochs, "shipped": str(shipped / DETECTOR_DIR),
             "shipped_thresholds": [config.threshold, config.count_threshold],
             "thresholds": "chosen on the region's training chips"}
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    # Counted 1:1 at a threshold chosen on the region itself: the shipped factor makes up for
    # what a detector misses on regions it never saw, and this one has seen the region.
    save_detector(tuned, DetectorConfig(**{**asdict(config), "threshold": threshold,
                                           "count_threshold": count_threshold,
                                           "count_factor": 1.0, "notes": notes}),
                  tmp, refiner)
    tmp.replace(out)
    return out / DETECTOR_DIR
