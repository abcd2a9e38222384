"""Disk cache of the frozen vision tower's multi-level features, one row per image.

The vision tower is frozen in every stage, and on a 2-core CPU it costs more than the rest of a
small model's step. So its output (the levels `VisionTower.forward` returns) is computed once
per image into a float16 memory-mapped array, and `cached_vision(model, cache)` swaps in a tower
that looks rows up: training then passes row indices where `pixel_values` would go. The cache
key covers the encoder config, the feature layers, the image processor and the image list.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tiles.atomic import atomic_path

log = logging.getLogger(__name__)


def _to_json(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def cache_key(vision_config: Any, layers: Sequence[int], image_processor: Any,
              images: Sequence[str], pooled: bool = False) -> str:
    content = {"vision": _to_json(vision_config), "layers": list(layers),
               "processor": _to_json(image_processor), "images": list(images)}
    if pooled:  # only then, so the keys of existing full caches stay valid
        content["pooled"] = True
    blob = json.dumps(content, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class FeatureCache:
    """`rows[image] -> i`; `array[i]` is (levels, patches, hidden) float16."""

    def __init__(self, folder: Path) -> None:
        meta = json.loads((folder / "meta.json").read_text())
        self.folder = folder
        self.images: list[str] = meta["images"]
        self.rows = {name: i for i, name in enumerate(self.images)}
        self.array = np.load(folder / "features.npy", mmap_mode="r")

    def __len__(self) -> int:
        return len(self.images)

    def levels(self, rows: torch.Tensor, dtype: torch.dtype, device: Any) -> list[torch.Tensor]:
        idx = rows.detach().cpu().long().numpy()
        block = torch.from_numpy(np.ascontiguousarray(self.array[idx]))
        block = block.to(device=device, dtype=dtype)
        return [block[:, level] for level in range(block.shape[1])]

    def pooled(self, chunk: int = 256) -> FeatureCache:
        """A copy in memory whose rows are each level's mean patch, ``(levels, 1, hidden)``
        float32: all the retrieval projection reads (it mean-pools), at 1/patches of the I/O
        per batch."""
        out = copy.copy(self)
        out.array = np.concatenate([
            self.array[i:i + chunk].astype(np.float32).mean(axis=2, keepdims=True)
            for i in range(0, len(self.images), chunk)]) if self.images else self.array
        return out

    @classmethod
    def build(cls, root: str | Path, images: Sequence[str], image_root: Path, vision_tower: Any,
              image_processor: Any, *, batch_size: int = 16, progress: bool = True,
              pooled: bool = False) -> FeatureCache:
        """Compute (or reuse) the features of `images` (paths relative to `image_root`).

        ``pooled`` keeps each level's mean patch only, ``(levels, 1, hidden)``: all a run of
        retrieval stages reads, at 1/patches of the disk (a 10k-image set: 23 MB, not 6 GB)."""
        from PIL import Image
        from tqdm.auto import tqdm

        images = sorted(set(images))
        key = cache_key(vision_tower.model.config, vision_tower.feature_layers, image_processor,
                        images, pooled)
        folder = Path(root) / key
        if (folder / "meta.json").is_file():
            log.info("reusing vision feature cache %s (%d images)", folder, len(images))
            return cls(folder)
        folder.mkdir(parents=True, exist_ok=True)
        n_levels = len(vision_tower.feature_layers)
        shape = (len(images), n_levels, 1 if pooled else vision_tower.num_patches,
                 vision_tower.hidden_size)
        with atomic_path(folder / "features.npy") as tmp:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
            device = next(vision_tower.parameters()).device
            bar = tqdm(total=len(images), desc="vision features (cached once)", unit="img",
                       disable=not progress)
            for start in range(0, len(images), batch_size):
                names = images[start:start + batch_size]
                pil = []
                for name in names:
                    with Image.open(image_root / name) as im:
                        pil.append(im.convert("RGB"))
                pixels = image_processor(pil, return_tensors="pt")["pixel_values"].to(device)
                with torch.inference_mode():
                    levels = vision_tower(pixels)
                stacked = torch.stack([lv.float() for lv in levels], dim=1)
                if pooled:
                    stacked = stacked.mean(dim=2, keepdim=True)
                stacked = stacked.cpu().numpy()
                arr[start:start + len(names)] = stacked.astype(np.float16)
                bar.update(len(names))
            bar.close()
            arr.flush()
            del arr
        (folder / "meta.json").write_text(json.dumps({"images": images, "shape": list(shape)}))
        return cls(folder)


class CachedVisionTower(nn.Module):
    """Stands in for `VisionTower`: `forward(rows)` returns the cached levels of those rows."""

    def __init__(self, cache: FeatureCache, original: nn.Module) -> None:
        super().__init__()
        self.cache = cache
        # Kept outside the module tree (a plain attribute) so it is neither trained nor saved.
        self.__dict__["original"] = original
        self.feature_layers = original.feature_layers
        self.num_patches = original.num_patches
        self._dtype = original.dtype

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def hidden_size(self) -> int:
        return self.original.hidden_size

    def forward(self, pixel_values: torch.Tensor, **_: Any) -> list[torch.Tensor]:
        if pixel_values.dtype.is_floating_point:
            raise ValueError("the cached vision tower takes feature-cache row indices, not pixels")
        return self.cache.levels(pixel_values, self._dtype, pixel_values.device)


@contextmanager
def cached_vision(model: nn.Module, cache: FeatureCache | None) -> Iterator[None]:
    """Swap the model's vision tower for the cache inside the block (no-op without a cache)."""
    if cache is None:
        yield
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    original = base.vision_tower
    base.vision_tower = CachedVisionTower(cache, original)
    try:
        yield
    finally:
        base.vision_tower = original
