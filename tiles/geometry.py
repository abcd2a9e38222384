"""Coordinates between chip pixels, a CRS and EPSG:4326.

Conventions used everywhere in the package:

- Pixel coordinates are ``(x, y)`` = ``(col, row)`` with the origin at the top-left corner of the
  top-left pixel (pixel centres are at ``+0.5``), as in rasterio and PIL.
- An affine ``transform`` maps pixel ``(col, row)`` to CRS ``(x, y)``; its inverse maps back.
- Geographic coordinates are always ``(lon, lat)`` (``always_xy``), whatever the CRS's own axis
  order says, so EPSG:4326 never silently swaps axes.
- Boxes are ``(x1, y1, x2, y2)``; normalized boxes use integers or floats in ``0..scale``
  (``scale=1000`` for the model's box grammar, ``scale=1`` for 0-1 boxes).
- Oriented boxes are ``(cx, cy, w, h, angle_deg)`` in pixels; the angle turns the box clockwise
  on screen (pixel y points down), matching the ``<box>[x1,y1,x2,y2,angle]</box>`` grammar.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from affine import Affine
from pyproj import CRS, Transformer
from shapely import Polygon
from shapely import transform as shapely_transform
from shapely.geometry.base import BaseGeometry

from tiles.errors import ImageryError

LONLAT = "EPSG:4326"
Box = tuple[float, float, float, float]


def as_crs(crs: Any) -> CRS:
    """A ``pyproj.CRS`` from anything pyproj or rasterio understands, or an ``ImageryError``."""
    if isinstance(crs, CRS):
        return crs
    try:
        if hasattr(crs, "to_wkt"):  # rasterio.crs.CRS
            return CRS.from_wkt(crs.to_wkt())
        return CRS.from_user_input(crs)
    except Exception as exc:  # pyproj raises CRSError, rasterio its own; the user needs one
        raise ImageryError(f"Unknown coordinate reference system {crs!r}: {exc}") from exc


@lru_cache(maxsize=64)
def _transformer(src_wkt: str, dst_wkt: str) -> Transformer:
    return Transformer.from_crs(CRS.from_wkt(src_wkt), CRS.from_wkt(dst_wkt), always_xy=True)


def transformer(src_crs: Any, dst_crs: Any) -> Transformer:
    """A cached lon/lat-ordered transformer (building one costs ~ms; chips call this often)."""
    return _transformer(as_crs(src_crs).to_wkt(), as_crs(dst_crs).to_wkt())


def same_crs(a: Any, b: Any) -> bool:
    return as_crs(a) == as_crs(b)


def transform_points(xs: Any, ys: Any, src_crs: Any, dst_crs: Any) -> tuple[Any, Any]:
    """Points (scalars or arrays) from ``src_crs`` to ``dst_crs``."""
    if same_crs(src_crs, dst_crs):
        return xs, ys
    out_x, out_y = transformer(src_crs, dst_crs).transform(xs, ys, errcheck=False)
    if not np.all(np.isfinite(out_x)) or not np.all(np.isfinite(out_y)):
        raise ImageryError("Coordinates fall outside the area where the projection is defined.")
    return out_x, out_y


def transform_bounds(bounds: Sequence[float], src_crs: Any, dst_crs: Any, densify: int = 21) -> Box:
    """Axis-aligned bounds of a box after reprojection (edges densified: boxes bend)."""
    w, s, e, n = (float(v) for v in bounds)
    if same_crs(src_crs, dst_crs):
        return (w, s, e, n)
    try:
        out = transformer(src_crs, dst_crs).transform_bounds(w, s, e, n, densify_pts=densify)
    except Exception as exc:
        raise ImageryError(
            f"The box {bounds} cannot be converted from {as_crs(src_crs).to_string()} to "
            f"{as_crs(dst_crs).to_string()}: {exc}"
        ) from exc
    if not all(math.isfinite(v) for v in out):
        raise ImageryError(f"The box {bounds} is outside the area the projection covers.")
    return tuple(float(v) for v in out)  # type: ignore[return-value]


def transform_geometry(geom: BaseGeometry, src_crs: Any, dst_crs: Any) -> BaseGeometry:
    """Any shapely geometry from ``src_crs`` to ``dst_crs`` (vertices only, not densified)."""
    if same_crs(src_crs, dst_crs):
        return geom
    tr = transformer(src_crs, dst_crs)

    def _apply(coords: np.ndarray) -> np.ndarray:
        x, y = tr.transform(coords[:, 0], coords[:, 1], errcheck=False)
        return np.column_stack([x, y])

    return shapely_transform(geom, _apply)


# --- pixels <-> CRS through an affine transform ---------------------------------------------


def px_to_crs(transform: Affine, x: Any, y: Any) -> tuple[Any, Any]:
    """Chip pixel ``(col, row)`` -> CRS coordinates of the chip."""
    a, b, c, d, e, f = transform.a, transform.b, transform.c, transform.d, transform.e, transform.f
    x = np.asarray(x, dtype=float) if not np.isscalar(x) else float(x)
    y = np.asarray(y, dtype=float) if not np.isscalar(y) else float(y)
    return a * x + b * y + c, d * x + e * y + f


def crs_to_px(transform: Affine, x: Any, y: Any) -> tuple[Any, Any]:
    """CRS coordinates of the chip -> chip pixel ``(col, row)``."""
    return px_to_crs(~transform, x, y)


def px_to_lonlat(transform: Affine, crs: Any, x: Any, y: Any) -> tuple[Any, Any]:
    return transform_points(*px_to_crs(transform, x, y), crs, LONLAT)


def lonlat_to_px(transform: Affine, crs: Any, lon: Any, lat: Any) -> tuple[Any, Any]:
    return crs_to_px(transform, *transform_points(lon, lat, LONLAT, crs))


# --- boxes ----------------------------------------------------------------------------------


def norm_to_px(box: Sequence[float], width: int, height: int, scale: float = 1000) -> Box:
    """Normalized ``(x1, y1, x2, y2)`` in ``0..scale`` -> pixels of a width x height chip."""
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    return (x1 * width / scale, y1 * height / scale, x2 * width / scale, y2 * height / scale)


def px_to_norm(box: Sequence[float], width: int, height: int, scale: float = 1000) -> Box:
    """Pixels -> normalized ``0..scale`` (floats; round them for the model's integer grammar)."""
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    return (x1 * scale / width, y1 * scale / height, x2 * scale / width, y2 * scale / height)


def box_corners(box: Sequence[float]) -> np.ndarray:
    """The 4 corners of an axis-aligned box, clockwise on screen from top-left, shape (4, 2)."""
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]])


def obb_corners(cx: float, cy: float, w: float, h: float, angle_deg: float) -> np.ndarray:
    """Corners of an oriented box in pixels, shape (4, 2); ``angle_deg`` turns it clockwise."""
    t = math.radians(angle_deg)
    cos, sin = math.cos(t), math.sin(t)
    half = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2.0
    # With y pointing down, this standard rotation matrix turns clockwise on screen.
    rot = np.array([[cos, -sin], [sin, cos]])
    return half @ rot.T + np.array([cx, cy])


def obb_from_corners(corners: Any) -> tuple[float, float, float, float, float]:
    """Inverse of :func:`obb_corners` for 4 corners in its order -> ``(cx, cy, w, h, angle)``."""
    p = np.asarray(corners, dtype=float).reshape(4, 2)
    cx, cy = p.mean(axis=0)
    w = float(np.hypot(*(p[1] - p[0])))
    h = float(np.hypot(*(p[3] - p[0])))
    angle = math.degrees(math.atan2(p[1][1] - p[0][1], p[1][0] - p[0][0]))
    return float(cx), float(cy), w, h, angle


def ring_px_to_crs(points_px: Any, transform: Affine, crs: Any, dst_crs: Any) -> np.ndarray:
    """Pixel ring (N, 2) -> ring in ``dst_crs`` (``None`` means the chip's own CRS)."""
    p = np.asarray(points_px, dtype=float).reshape(-1, 2)
    x, y = px_to_crs(transform, p[:, 0], p[:, 1])
    if dst_crs is not None:
        x, y = transform_points(x, y, crs, dst_crs)
    return np.column_stack([x, y])


def polygon_px_to_crs(poly_px: Polygon | Any, transform: Affine, crs: Any, dst_crs: Any = LONLAT):
    """A pixel polygon (shapely or an (N, 2) ring) -> shapely polygon in ``dst_crs``."""
    if not isinstance(poly_px, BaseGeometry):
        poly_px = Polygon(np.asarray(poly_px, dtype=float).reshape(-1, 2))

    def _apply(coords: np.ndarray) -> np.ndarray:
        return ring_px_to_crs(coords, transform, crs, dst_crs)

    return shapely_transform(poly_px, _apply)


def polygon_crs_to_px(geom: BaseGeometry, transform: Affine, crs: Any, src_crs: Any = LONLAT):
    """A shapely geometry in ``src_crs`` -> the same geometry in chip pixels."""
    geom = transform_geometry(geom, src_crs, crs)
    inv = ~transform

    def _apply(coords: np.ndarray) -> np.ndarray:
        x, y = px_to_crs(inv, coords[:, 0], coords[:, 1])
        return np.column_stack([x, y])

    return shapely_transform(geom, _apply)


def box_px_to_polygon(box: Sequence[float], transform: Affine, crs: Any, dst_crs: Any = LONLAT):
    """An axis-aligned pixel box -> polygon in ``dst_crs`` (not axis-aligned after reprojection)."""
    return Polygon(ring_px_to_crs(box_corners(box), transform, crs, dst_crs))


def obb_px_to_polygon(obb: Sequence[float], transform: Affine, crs: Any, dst_crs: Any = LONLAT):
    """An oriented pixel box ``(cx, cy, w, h, angle_deg)`` -> polygon in ``dst_crs``."""
    return Polygon(ring_px_to_crs(obb_corners(*obb[:5]), transform, crs, dst_crs))


def bounds_to_box_px(bounds: Sequence[float], transform: Affine, crs: Any, src_crs: Any = LONLAT):
    """A ``(W, S, E, N)`` box in ``src_crs`` -> the enclosing pixel box ``(x1, y1, x2, y2)``."""
    w, s, e, n = (float(v) for v in bounds)
    t = np.linspace(0.0, 1.0, 11)
    # Densified edges: a lon/lat rectangle is curved in most projected CRSs.
    xs = np.concatenate([w + (e - w) * t, np.full_like(t, e), e - (e - w) * t, np.full_like(t, w)])
    ys = np.concatenate([np.full_like(t, s), s + (n - s) * t, np.full_like(t, n), n - (n - s) * t])
    px, py = crs_to_px(transform, *transform_points(xs, ys, src_crs, crs))
    return (float(np.min(px)), float(np.min(py)), float(np.max(px)), float(np.max(py)))
