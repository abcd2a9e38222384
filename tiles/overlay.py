"""Map overlays: a browser-sized RGBA image of a source and where it goes on a web map."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np

from tiles.chip import Chip


@dataclass
class Overlay:
    """``rgba`` (H, W, 4) uint8 in Web Mercator, to be stretched over ``bounds_lonlat``.

    Web maps (Leaflet, MapLibre) place an image overlay by its lon/lat corners and stretch it
    linearly in Web Mercator, so previews are rendered in EPSG:3857: in any other CRS the image
    would drift by up to metres at the edges. Pixel-space sources have ``bounds_lonlat=None``.
    """

    rgba: np.ndarray
    bounds_lonlat: tuple[float, float, float, float] | None

    @property
    def width(self) -> int:
        return int(self.rgba.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgba.shape[0])

    def to_png_bytes(self) -> bytes:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(self.rgba, mode="RGBA").save(buf, format="PNG")
        return buf.getvalue()

    def to_data_url(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.to_png_bytes()).decode("ascii")


def overlay_from_chip(chip: Chip) -> Overlay:
    alpha = (
        np.full(chip.pixels.shape[:2], 255, np.uint8)
        if chip.mask is None
        else chip.mask.astype(np.uint8) * 255
    )
    rgba = np.dstack([chip.pixels, alpha])
    return Overlay(rgba=rgba, bounds_lonlat=chip.bounds_lonlat)
