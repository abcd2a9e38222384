"""Plain images (PNG, JPEG, WebP...) with no georeference: pixel space only.

Chips of these have ``crs=None``; the caller should tell the user that answers cannot be put on
a map. Images are decoded with Pillow (EXIF orientation applied) within the memory budget of
`tiles.limits`, checked on the header before any pixel is decoded: a picture larger than the
budget's working size is decoded at reduced resolution (JPEG: libjpeg's DCT scaling; PNG: GDAL
row strips, averaged) or refused (formats that only decode whole). Chips keep the picture's
full-resolution pixel coordinates either way.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine

from tiles import display, geometry, limits
from tiles.chip import Chip
from tiles.errors import ImageryError
from tiles.sources.base import Size, Source, check_bbox, intersects, output_shape, split_window

log = logging.getLogger(__name__)

#: EXIF orientations that swap width and height.
_TRANSPOSED = {5, 6, 7, 8}


class PlainImageSource(Source):
    """A photo or screenshot: chips in pixel space, ``georeferenced == False``."""

    def __init__(self, image: str | Path | Any, *, name: str | None = None) -> None:
        from PIL import Image, ImageOps, UnidentifiedImageError

        self.path = str(image) if isinstance(image, str | Path) else None
        self.name = name or (Path(self.path).name if self.path else "image")
        self.crs = None
        full_size: tuple[int, int] | None = None
        if isinstance(image, np.ndarray):
            self._rgb, self._valid = _array_to_rgb(image, self.name)
        else:
            try:
                img = image if isinstance(image, Image.Image) else Image.open(self.path)
                self.format = img.format or "array"
                width, height = img.size
                if _orientation(img) in _TRANSPOSED:
                    width, height = height, width
                full_size = (width, height)
                if width * height <= limits.working_pixels():
                    img = ImageOps.exif_transpose(img)
                    self._rgb, self._valid = _pil_to_rgb(img, self.name)
                else:
                    self._rgb, self._valid = _decode_reduced(img, self.path, self.name)
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
        full_w, full_h = full_size or (w, h)
        #: Chips and boxes are in full-resolution pixels even when fewer were decoded.
        self.bounds = (0.0, 0.0, float(full_w), float(full_h))
        if (w, h) != (full_w, full_h):
            log.info("%s: %dx%d px decoded at %dx%d (memory budget)", self.name, full_w,
                     full_h, w, h)

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
            "width": int(self.bounds[2]),
            "height": int(self.bounds[3]),
            "decoded_size": [w, h],
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
        fx, fy = w / self.bounds[2], h / self.bounds[3]  # decoded px per full-resolution px
        part = split_window(x1 * fx, y1 * fy, (x2 - x1) * fx, (y2 - y1) * fy, w, h, out_w, out_h)
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


def _orientation(img: Any) -> int | None:
    """The EXIF orientation from the header. (`Image.getexif` on a PNG decodes every pixel to
    look for a late eXIf chunk, so PNGs are asked only about what their header carried.)"""
    if img.format == "PNG" and "exif" not in img.info:
        return None
    return img.getexif().get(0x0112)


def _decode_reduced(img: Any, path: str | None, name: str
                    ) -> tuple[np.ndarray, np.ndarray | None]:
    """A picture above the working size, decoded to at most `limits.working_pixels` pixels
    without ever holding it at full resolution; refused when its format cannot do that."""
    from PIL import ImageOps

    width, height = img.size
    limits.check_streamed(name, width, height)
    budget = limits.working_pixels()
    if img.format == "JPEG" and img.mode in ("RGB", "L", "CMYK"):
        scale = next((s for s in (2, 4, 8)
                      if math.ceil(width / s) * math.ceil(height / s) <= budget), None)
        if scale is not None:
            # libjpeg decodes straight to 1/scale (DCT scaling): memory of the small picture only.
            img.draft(img.mode, (math.ceil(width / scale), math.ceil(height / scale)))
            return _pil_to_rgb(ImageOps.exif_transpose(img), name)
    if img.format == "PNG" and path is not None and not img.info.get("interlace"):
        return _array_to_rgb(_read_png_strips(path, name, budget), name)
    limits.check_whole_decode(name, width, height, img.format or "These")
    return _pil_to_rgb(ImageOps.exif_transpose(img), name)  # unreachable above the budget


def _read_png_strips(path: str, name: str, budget: int) -> np.ndarray:
    """A non-interlaced PNG averaged down by an integer factor, read by GDAL in row strips (it
    inflates rows as it goes), so memory is one strip plus the small result: (H, W, bands)."""
    import warnings

    import rasterio
    from rasterio.enums import Resampling
    from rasterio.errors import RasterioError
    from rasterio.windows import Window

    from tiles.sources.raster import configure_gdal

    configure_gdal()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no georeference: expected for a picture
            ds = rasterio.open(path)
        with ds:
            w, h = ds.width, ds.height
            k = math.ceil(math.sqrt(w * h / budget))
            out_w, out_h = math.ceil(w / k), math.ceil(h / k)
            palette = ds.count == 1 and ds.colorinterp[0].name == "palette"
            out = np.empty((ds.count, out_h, out_w), dtype=ds.dtypes[0])
            step = 64 * k  # source rows per strip: 64 output rows
            for r0 in range(0, h, step):
                r1, o0 = min(h, r0 + step), r0 // k
                o1 = min(out_h, math.ceil(r1 / k))
                ds.read(window=Window(0, r0, w, r1 - r0), out=out[:, o0:o1],
                        resampling=Resampling.nearest if palette else Resampling.average)
            if palette:
                return display.apply_colormap(out[0], ds.colormap(1))
    except RasterioError as exc:
        raise ImageryError(
            f"Could not decode {name!r}: the file may be truncated or corrupt "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})."
        ) from exc
    return np.moveaxis(out, 0, -1)


def _pil_to_rgb(img: Any, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _array_to_rgb(np.asarray(img), name)
    has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
    mode = "RGBA" if has_alpha else "RGB"
    arr = np.asarray(img if img.mode == mode else img.convert(mode))  # no copy when it fits
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
