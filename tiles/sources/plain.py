"""Plain images (PNG, JPEG, WebP...) with no georeference: pixel space only.

Chips of these have ``crs=None``; the caller should tell the user that answers cannot be put on
a map. Images are decoded with Pillow (EXIF orientation applied), after a size check on the
header so a forged 100000 x 100000 header never allocates.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine

from tiles import display, geometry
from tiles.chip import Chip
from tiles.errors import ImageryError
from tiles.sources.base import Size, Source, check_bbox, intersects, output_shape, split_window

log = logging.getLogger(__name__)

#: Largest plain image decoded whole (about 600 MB as RGB). Bigger images belong in a tiled
#: GeoTIFF, which is read by windows.
MAX_PLAIN_PIXELS = 200_000_000


class PlainImageSource(Source):
    """A photo or screenshot: chips in pixel space, ``georeferenced == False``."""

    def __init__(self, image: str | Path | Any, *, name: str | None = None) -> None:
        from PIL import Image, ImageOps, UnidentifiedImageError

        self.path = str(image) if isinstance(image, str | Path) else None
        self.name = name or (Path(self.path).name if self.path else "image")
        self.crs = None
        if isinstance(image, np.ndarray):
            self._rgb, self._valid = _array_to_rgb(image, self.name)
        else:
            try:
                img = image if isinstance(image, Image.Image) else Image.open(self.path)
                width, height = img.size
                if width * height > MAX_PLAIN_PIXELS:
                    raise ImageryError(
                        f"{self.name!r} is {width}x{height} px, too large to open as a plain "
                        "image; convert it to a tiled GeoTIFF (e.g. `gdal_translate -of COG`)."
                    )
                self.format = img.format or "array"
                img = ImageOps.exif_transpose(img)
                self._rgb, self._valid = _pil_to_rgb(img, self.name)
            except ImageryError:
                raise
            except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
                raise ImageryError(
                    f"{self.name!r} is not an image this program can read ({exc})."
                ) from exc
            except (OSError, SyntaxError, ValueError) as exc:  # truncated / corrupt data
                raise ImageryError(
                    f"Could not decode {self.name!r}: the file may be truncated or corrupt ({exc})."
                ) from exc
        self.format = getattr(self, "format", "array")
        h, w = self._rgb.shape[:2]
        self.bounds = (0.0, 0.0, float(w), float(h))

    @classmethod
    def from_array(cls, array: np.ndarray, name: str = "image") -> PlainImageSource:
        """An (H, W), (H, W, 3) or (H, W, 4) array, e.g. an upload from the UI."""
        return cls(array, name=name)

    def info(self) -> dict[str, Any]:
        h, w = self._rgb.shape[:2]
        return {
            "source": self.path or self.name,
            "kind": "plain image",
            "driver": self.format,
            "width": w,
            "height": h,
            "count": 3,
            "dtype": "uint8",
            "georeferenced": False,
            "crs": None,
            "bounds": list(self.bounds),
            "bounds_lonlat": None,
            "resolution": [1.0, 1.0],
            "overviews": [],
            "note": "Plain image without georeference: pixel space only, no map location.",
        }

    def chip(
        self,
        bbox: Sequence[float] | None = None,
        *,
        crs: Any = geometry.LONLAT,
        size: Size = 512,
        out_crs: Any = None,
    ) -> Chip:
        from PIL import Image

        x1, y1, x2, y2 = self.bounds if bbox is None else check_bbox(bbox)
        if not intersects((x1, y1, x2, y2), self.bounds):
            raise ImageryError(
                f"The pixel box {[x1, y1, x2, y2]} is outside the image "
                f"{self.name!r} ({int(self.bounds[2])}x{int(self.bounds[3])} px; "
                "it has no map location, so boxes are in pixels)."
            )
        out_w, out_h = output_shape(x2 - x1, y2 - y1, size)
        h, w = self._rgb.shape[:2]
        part = split_window(x1, y1, x2 - x1, y2 - y1, w, h, out_w, out_h)
        if part is None:
            raise ImageryError(f"The pixel box {[x1, y1, x2, y2]} is outside {self.name!r}.")
        box = (part.col, part.row, part.col + part.width, part.row + part.height)
        size_part = (part.c1 - part.c0, part.r1 - part.r0)
        pixels = np.zeros((out_h, out_w, 3), dtype=np.uint8)
        pixels[part.r0 : part.r1, part.c0 : part.c1] = np.asarray(
            Image.fromarray(self._rgb).resize(
                size_part, Image.Resampling.BILINEAR, box=box, reducing_gap=3.0
            )
        )
        valid = np.zeros((out_h, out_w), dtype=bool)
        if self._valid is None:
            valid[part.r0 : part.r1, part.c0 : part.c1] = True
        else:
            valid[part.r0 : part.r1, part.c0 : part.c1] = np.asarray(
                Image.fromarray(self._valid).resize(size_part, Image.Resampling.NEAREST, box=box)
            )
            pixels[~valid] = 0
        transform = Affine((x2 - x1) / out_w, 0, x1, 0, (y2 - y1) / out_h, y1)
        return Chip(
            pixels=pixels,
            crs=None,
            transform=transform,
            source=self.name,
            mask=None if valid.all() else valid,
            meta={"pixel_space": True},
        )


def _pil_to_rgb(img: Any, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _array_to_rgb(np.asarray(img), name)
    has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
    arr = np.asarray(img.convert("RGBA" if has_alpha else "RGB"))
    return _array_to_rgb(arr, name)


def _array_to_rgb(arr: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(H, W[, 1|3|4]) of any supported dtype -> (H, W, 3) uint8 and an optional valid mask."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4) or min(arr.shape[:2]) < 1:
        raise ImageryError(
            f"{name!r} has shape {arr.shape}; expected an image of 1, 3 or 4 channels."
        )
    display.check_dtype(str(arr.dtype))
    valid = None
    if arr.shape[2] in (2, 4):  # last channel is alpha
        valid = np.asarray(arr[:, :, -1] > 0)
        arr = arr[:, :, :-1]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    stretch = None if arr.dtype == np.uint8 else display.compute_stretch(arr, valid)
    rgb = display.to_rgb8(arr, valid, stretch)
    return rgb, (None if valid is None or valid.all() else valid.astype(np.uint8))
