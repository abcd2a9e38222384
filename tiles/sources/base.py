"""What every imagery source shares: the `Source` API, size rules and bbox checks."""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from affine import Affine
from pyproj import CRS

from tiles import geometry
from tiles.chip import Chip
from tiles.errors import ImageryError
from tiles.overlay import Overlay, overlay_from_chip

#: Longest chip side we agree to allocate (8192^2 RGB is 200 MB).
MAX_CHIP_SIDE = 8192
#: Pixels a single chip may read from full-resolution data; beyond this the raster needs
#: overviews (or a smaller request), so a huge raster is never read whole.
MAX_SOURCE_PIXELS = 150_000_000

Size = int | tuple[int, int] | Sequence[int]
Bounds = tuple[float, float, float, float]


def chip_grid(box: Sequence[float], size: Size) -> tuple[int, int, Affine]:
    """``(width, height, transform)`` of a north-up chip covering ``box`` (minx, miny, maxx, maxy)."""
    out_w, out_h = output_shape(box[2] - box[0], box[3] - box[1], size)
    transform = Affine((box[2] - box[0]) / out_w, 0, box[0], 0, -(box[3] - box[1]) / out_h, box[3])
    return out_w, out_h, transform


def output_shape(extent_w: float, extent_h: float, size: Size) -> tuple[int, int]:
    """Chip ``(width, height)`` for an area of ``extent_w`` x ``extent_h`` (any unit).

    An int ``size`` is the longest side: the whole area is kept and the other side follows its
    aspect ratio, so pixels stay square (a square chip would need cropping or distortion).
    ``(width, height)`` is used as given (pixels may then be non-square).
    """
    if isinstance(size, bool):
        raise ImageryError(f"Chip size must be a number of pixels, got {size!r}.")
    if not (extent_w > 0 and extent_h > 0):
        raise ImageryError("The requested area has zero width or height.")
    if isinstance(size, numbers.Real):  # numpy integers too
        if not math.isfinite(size) or int(size) != size:
            raise ImageryError(f"Chip size must be a whole number of pixels, got {size!r}.")
        side = int(size)
        if not 1 <= side <= MAX_CHIP_SIDE:
            raise ImageryError(f"Chip size {size!r} is out of range: use 1..{MAX_CHIP_SIDE} px.")
        if extent_w >= extent_h:
            return side, max(1, round(side * extent_h / extent_w))
        return max(1, round(side * extent_w / extent_h)), side
    try:
        width, height = (int(v) for v in size)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ImageryError(f"Chip size must be an int or (width, height), got {size!r}.") from exc
    if not (1 <= width <= MAX_CHIP_SIDE and 1 <= height <= MAX_CHIP_SIDE):
        raise ImageryError(
            f"Chip size {width}x{height} is out of range: each side must be 1..{MAX_CHIP_SIDE} px."
        )
    return width, height


def check_bbox(bbox: Sequence[float]) -> Bounds:
    """Four finite numbers with west < east and south < north."""
    try:
        values = tuple(float(v) for v in bbox)
    except (TypeError, ValueError) as exc:
        raise ImageryError(f"A bbox is four numbers W,S,E,N; got {bbox!r}.") from exc
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ImageryError(f"A bbox is four finite numbers W,S,E,N; got {bbox!r}.")
    w, s, e, n = values
    if not (e > w and n > s):
        raise ImageryError(
            f"The bbox {list(values)} has zero or negative area: it must be W,S,E,N with W < E "
            "and S < N (a box across the antimeridian must be split in two)."
        )
    return values


def intersects(a: Bounds, b: Bounds) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@dataclass
class WindowSplit:
    """Which part of an output grid a source window covers, and the source window for it."""

    c0: int
    c1: int
    r0: int
    r1: int
    col: float
    row: float
    width: float
    height: float


def split_window(
    col: float,
    row: float,
    width: float,
    height: float,
    src_w: int,
    src_h: int,
    out_w: int,
    out_h: int,
) -> WindowSplit | None:
    """Clip a (float) source window to the source extent and map the clip to output pixels.

    The output grid keeps the requested extent; only the part that overlaps the source is read
    (``c0:c1``, ``r0:r1``), the rest is left as no-data. None when nothing overlaps.
    """
    dx, dy = width / out_w, height / out_h
    c0 = min(max(round(-col / dx), 0), out_w)
    c1 = min(max(round((src_w - col) / dx), 0), out_w)
    r0 = min(max(round(-row / dy), 0), out_h)
    r1 = min(max(round((src_h - row) / dy), 0), out_h)
    if c1 <= c0 or r1 <= r0:
        return None
    sc0, sr0 = max(col + c0 * dx, 0.0), max(row + r0 * dy, 0.0)
    sc1, sr1 = min(col + c1 * dx, float(src_w)), min(row + r1 * dy, float(src_h))
    return WindowSplit(c0, c1, r0, r1, sc0, sr0, sc1 - sc0, sr1 - sr0)


class Source(ABC):
    """An imagery source: chips and previews in, georeference out. Use as a context manager."""

    name: str = ""
    crs: CRS | None = None
    #: ``(minx, miny, maxx, maxy)`` in ``crs``; ``(0, 0, width, height)`` pixels without one.
    bounds: Bounds = (0.0, 0.0, 0.0, 0.0)

    @property
    def georeferenced(self) -> bool:
        return self.crs is not None

    @property
    def bounds_lonlat(self) -> Bounds | None:
        if self.crs is None:
            return None
        return geometry.transform_bounds(self.bounds, self.crs, geometry.LONLAT)

    @abstractmethod
    def info(self) -> dict[str, Any]:
        """JSON-ready description (what ``python -m tiles info`` prints)."""

    @abstractmethod
    def chip(
        self,
        bbox: Sequence[float] | None = None,
        *,
        crs: Any = geometry.LONLAT,
        size: Size = 512,
        out_crs: Any = None,
    ) -> Chip:
        """RGB chip of ``bbox`` (W, S, E, N in ``crs``; the whole source when None).

        The chip is in the source's CRS unless ``out_crs`` asks for another (then it is
        reprojected). Pixel-space sources take ``bbox`` in source pixels ``(x1, y1, x2, y2)``
        and ignore ``crs``. ``size``: see :func:`output_shape`.
        """

    def preview(self, max_size: int = 1024) -> Overlay:
        """A browser-sized RGBA preview in Web Mercator with its lon/lat bounds."""
        out_crs = "EPSG:3857" if self.georeferenced else None
        return overlay_from_chip(self.chip(None, size=max_size, out_crs=out_crs))

    def resolve_bbox(self, bbox: Sequence[float] | None, crs: Any, target_crs: CRS) -> Bounds:
        """The request as bounds in ``target_crs``, checked against the source's extent."""
        assert self.crs is not None
        src_in_target = geometry.transform_bounds(self.bounds, self.crs, target_crs)
        if bbox is None:
            return src_in_target
        box = check_bbox(bbox)
        req_crs = geometry.as_crs(crs if crs is not None else self.crs)
        if req_crs.is_geographic and (box[1] < -90 or box[3] > 90):
            raise ImageryError(
                f"The bbox {list(box)} has latitudes outside -90..90: is it in "
                f"{req_crs.to_string()}, and in W,S,E,N order?"
            )
        target = geometry.transform_bounds(box, req_crs, target_crs)
        if not intersects(target, src_in_target):
            where = self.bounds_lonlat
            raise ImageryError(
                f"The bbox {list(box)} ({req_crs.to_string()}) does not overlap the imagery "
                f"{self.name!r}, which covers lon/lat W,S,E,N = "
                f"{[round(v, 6) for v in where] if where else self.bounds}."
            )
        return target

    def close(self) -> None:  # noqa: B027 - optional hook, most sources hold nothing open
        """Release file handles."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
