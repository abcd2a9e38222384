"""Linear-probe baseline: logistic regression on frozen, multi-level pooled vision features.

The classification baseline of the design: pool the patch tokens (mean) and the CLS token of
several encoder layers, concatenate, standardise, and fit scikit-learn's logistic regression on
`train_per_class` images per class; the rest of each class is the test set. Given a
`build-data` folder instead, it trains on that folder's training split and tests on its
held-back split, the images `rsvlm-train eval --data DIR` scores the chat model on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.classification import scan_image_folder

log = logging.getLogger(__name__)


def pooled_features(images: Sequence[Any], vision_model: Any, image_processor: Any,
                    layers: Sequence[int], batch_size: int = 32) -> np.ndarray:
    """(n, len(layers) * 2 * hidden): per layer the mean patch token and the first token."""
    import torch

    from rsvlm.scene import pool_levels

    vision_model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        batch = image_processor(list(images[i:i + batch_size]), return_tensors="pt")
        with torch.inference_mode():
            hidden = vision_model(pixel_values=batch["pixel_values"], output_hidden_states=True,
                                  return_dict=True).hidden_states
        out.append(pool_levels(hidden, list(layers)).numpy())
    return np.concatenate(out, axis=0) if out else np.zeros((0, 0), np.float32)


def fit_probe(train_x: np.ndarray, train_y: Sequence[str], test_x: np.ndarray,
              test_y: Sequence[str], seed: int = 0) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.5,
                                                             random_state=seed))
    clf.fit(train_x, list(train_y))
    pred = clf.predict(test_x)
    truth = np.asarray(test_y)
    per_class = {c: float((pred[truth == c] == c).mean()) for c in sorted(set(test_y))}
    return {"accuracy": float((pred == truth).mean()), "per_class": per_class,
            "n_train": len(train_y), "n_test": len(test_y)}


def _vision_from_model_arg(model: str | None) -> tuple[Any, Any, list[int], str]:
    """The frozen vision encoder, its image processor and feature layers of a preset."""
    from transformers import AutoImageProcessor

    from rsvlm.presets import load_preset

    preset = load_preset(model or "embedded")
    plan = preset.plan("cpu")
    comp = plan.components["vision"]
    vision = comp.load()
    processor = AutoImageProcessor.from_pretrained(comp.location)
    layers = list(preset.to_config().vision_feature_layers)
    return vision, processor, layers, preset.name


def run_probe(folder: str | Path, *, model: str | None = None, layers: list[int] | None = None,
              train_per_class: int = 25, seed: int = 0, vision: Any = None,
              image_processor: Any = None) -> dict[str, Any]:
    """Probe accuracy on an ImageFolder; `vision`/`image_processor` override the preset's."""
    from PIL import Image

    name = "custom"
    if vision is None:
        vision, image_processor, default_layers, name = _vision_from_model_arg(model)
        layers = layers or default_layers
    if not layers:
        raise ValueError("give the vision layers to pool (e.g. 7,9,11)")
    from training.evaluate import is_dataset

    split_from = None
    if is_dataset(folder):
        # The build-data split itself: the probe sees the same training images as `fit` and
        # is scored on the same held-back ones as `eval --data DIR`.
        paths, labels, is_train = _dataset_split(Path(folder))
        classes = sorted(set(labels))
        split_from = str(folder)
    else:
        classes, items = scan_image_folder(folder)
        paths, labels = [it.path for it in items], [it.label for it in items]
        seen: dict[str, int] = {}
        is_train = []
        for it in items:  # items are sorted per class: the first k train
            seen[it.label] = seen.get(it.label, 0) + 1
            is_train.append(seen[it.label] <= train_per_class)
    train_idx = [i for i, t in enumerate(is_train) if t]
    test_idx = [i for i, t in enumerate(is_train) if not t]
    if not test_idx or not train_idx:
        raise ValueError("the probe needs both training and test images "
                         f"(every class has <= {train_per_class} images?)")
    t0 = time.perf_counter()
    images = []
    for path in paths:
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    feats = pooled_features(images, vision, image_processor, layers)
    t_feat = time.perf_counter() - t0
    report = fit_probe(feats[train_idx], [labels[i] for i in train_idx], feats[test_idx],
                       [labels[i] for i in test_idx], seed)
    report.update({"task": "classification_probe", "model": name, "layers": list(layers),
                   "classes": len(classes),
                   "train_per_class": None if split_from else train_per_class,
                   "split_from": split_from,
                   "feature_dim": int(feats.shape[1]), "features_s": round(t_feat, 1)})
    return report


def _dataset_split(data_dir: Path) -> tuple[list[Path], list[str], list[bool]]:
    """Classification images of a build-data folder: (paths, labels, is-train flags)."""
    from training.evaluate import split_records

    paths, labels, is_train = [], [], []
    for split in ("train", "val"):
        if not (data_dir / f"{split}.jsonl").is_file():
            continue
        for r in split_records(data_dir, split, "classification"):
            paths.append(data_dir / r["image"])
            labels.append(r["meta"]["cls"])
            is_train.append(split == "train")
    if not paths:
        raise ValueError(f"{data_dir} has no classification samples")
    return paths, labels, is_train
