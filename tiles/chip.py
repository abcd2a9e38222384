"""`Chip`: the pixels the model sees, plus where they are on Earth."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from affine import Affine
from pyproj import CRS

from tiles import geometry

if TYPE_CHECKING:
    from PIL import Image
    from shapely import Polygon


@dataclass
class Chip:
    """An RGB chip and its georeference.

    ``transform`` maps chip pixel ``(col, row)`` to coordinates in ``crs``. When ``crs`` is
    ``None`` the chip is in pixel space (a plain photo or a raster without a CRS): ``transform``
    then maps chip pixels to pixels of the source image and every geographic method returns
    ``None``, so callers can say "this image has no location" instead of guessing one.
    """

    pixels: np.ndarray
    crs: CRS | None
    transform: Affine
    source: str = ""
    #: (H, W) bool, True where the source has data; None means "all valid".
    mask: np.ndarray | None = None
    #: How the chip was made (zoom, bands, stretch, overview...), for logs and the UI.
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_coefficients(
        cls, pixels: np.ndarray, crs: Any, coefficients: Sequence[float], source: str = ""
    ) -> Chip:
        """A chip from its pixels, CRS and the six numbers ``(a, b, c, d, e, f)`` of its
        transform: how a chip crosses a process boundary as plain arrays (`rsvlm.scanning`)."""
        return cls(
            pixels=pixels,
            crs=None if crs is None else geometry.as_crs(crs),
            transform=Affine(*(float(v) for v in coefficients[:6])),
            source=source,
        )

    def __post_init__(self) -> None:
        if self.pixels.ndim != 3 or self.pixels.shape[2] != 3 or self.pixels.dtype != np.uint8:
            raise ValueError(
                f"Chip pixels must be (H, W, 3) uint8, got {self.pixels.shape} {self.pixels.dtype}"
            )

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def georeferenced(self) -> bool:
        return self.crs is not None

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(minx, miny, maxx, maxy)`` in ``crs`` (source pixels for pixel-space chips)."""
        xs, ys = geometry.px_to_crs(
            self.transform,
            np.array([0, self.width, self.width, 0]),
            np.array([0, 0, self.height, self.height]),
        )
        return (float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max()))

    @property
    def bounds_lonlat(self) -> tuple[float, float, float, float] | None:
        if self.crs is None:
            return None
        return geometry.transform_bounds(self.bounds, self.crs, geometry.LONLAT)

    @property
    def ground_area_m2(self) -> float | None:
        """The chip's area on the ellipsoid in square metres (None in pixel space)."""
        poly = self.box_to_polygon((0, 0, self.width, self.height))
        if poly is None:
            return None
        from pyproj import Geod

        return abs(Geod(ellps="WGS84").geometry_area_perimeter(poly)[0])

    def to_image(self) -> Image.Image:
        from PIL import Image

        return Image.fromarray(self.pixels, mode="RGB")

    # --- geography; all None in pixel space ---------------------------------------------------

    def pixel_to_crs(self, x: Any, y: Any) -> tuple[Any, Any]:
        """Chip pixel -> chip CRS (or source pixels for pixel-space chips)."""
        return geometry.px_to_crs(self.transform, x, y)

    def pixel_to_lonlat(self, x: Any, y: Any) -> tuple[Any, Any] | None:
        if self.crs is None:
            return None
        return geometry.px_to_lonlat(self.transform, self.crs, x, y)

    def lonlat_to_pixel(self, lon: Any, lat: Any) -> tuple[Any, Any] | None:
        if self.crs is None:
            return None
        return geometry.lonlat_to_px(self.transform, self.crs, lon, lat)

    def box_to_polygon(self, box_px: Sequence[float], crs: Any = geometry.LONLAT) -> Polygon | None:
        """Pixel box ``(x1, y1, x2, y2)`` -> polygon in ``crs`` (``None``: the chip's CRS)."""
        if self.crs is None:
            return None
        return geometry.box_px_to_polygon(box_px, self.transform, self.crs, crs)

    def obb_to_polygon(
        self, cx: float, cy: float, w: float, h: float, angle_deg: float, crs: Any = geometry.LONLAT
    ) -> Polygon | None:
        """Oriented pixel box (centre, size, clockwise angle) -> polygon in ``crs``."""
        if self.crs is None:
            return None
        return geometry.obb_px_to_polygon((cx, cy, w, h, angle_deg), self.transform, self.crs, crs)

    def polygon_to_crs(self, poly_px: Any, crs: Any = geometry.LONLAT) -> Polygon | None:
        """A pixel polygon (shapely or (N, 2) ring) -> polygon in ``crs``."""
        if self.crs is None:
            return None
        return geometry.polygon_px_to_crs(poly_px, self.transform, self.crs, crs)

    def geometry_to_pixels(self, geom: Any, crs: Any = geometry.LONLAT) -> Any:
        """A shapely geometry in ``crs`` -> the same geometry in chip pixels."""
        if self.crs is None:
            return None
        return geometry.polygon_crs_to_px(geom, self.transform, self.crs, crs)

    def bbox_lonlat_to_box_px(
        self, w: float, s: float, e: float, n: float
    ) -> tuple[float, float, float, float] | None:
        """A lon/lat rectangle (e.g. drawn on the map) -> enclosing chip pixel box."""
        if self.crs is None:
            return None
        return geometry.bounds_to_box_px((w, s, e, n), self.transform, self.crs)

    def norm_to_px(self, box: Sequence[float], scale: float = 1000):
        return geometry.norm_to_px(box, self.width, self.height, scale)

    def px_to_norm(self, box: Sequence[float], scale: float = 1000):
        return geometry.px_to_norm(box, self.width, self.height, scale)
