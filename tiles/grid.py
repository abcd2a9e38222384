"""Whole-scene geometry: a grid of chip windows over a raster, the metric CRS to measure boxes
in, and merging the boxes of neighbouring chips into one detection per object.

`rsvlm.scan` asks the model about every window and hands the boxes back here; everything that
knows a CRS stays in `tiles`. The merge rule (see `merge_boxes`):

* A box is *cut* when it comes within a margin of a chip edge that is not the raster's edge:
  the object probably continues in the neighbour chip.
* Two boxes (same label, different chips) whose chips overlap are the *same object* when their
  parts inside the shared strip agree: IoU of ``box_a ∩ strip`` and ``box_b ∩ strip`` >=
  ``iou_threshold``. Both chips saw exactly those pixels, so a whole box and the cut remainder of
  the same object agree there even though the whole boxes do not. Same objects are merged
  (union-find) into the envelope of their union.
* Score: 1.0 for a merged object or an uncut box; `CUT_SCORE` for a cut box that no neighbour
  confirmed.
* Finally class-aware NMS (highest score, then largest area first) removes remaining duplicates
  whose IoU >= ``iou_threshold``, e.g. a model repeating a box in one chip.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from tiles.errors import ImageryError
from tiles.geometry import LONLAT, transform_geometry

CUT_SCORE = 0.5  # a box cut by an inner chip border that no neighbour confirmed


@dataclass(frozen=True)
class Window:
    """One chip of the grid: source-CRS bounds and which of its edges are the raster's edges."""

    index: int
    bounds: tuple[float, float, float, float]  # minx, miny, maxx, maxy in the source CRS
    outer: tuple[bool, bool, bool, bool]  # left, bottom, right, top edge lies on the raster edge


@dataclass
class ChipBox:
    """A box found in one window, as a polygon in the metric CRS."""

    label: str
    window: int
    polygon: Any  # shapely Polygon in the metric CRS
    cut: bool


# ----------------------------------------------------------------------------------------------
# Grid
# ----------------------------------------------------------------------------------------------


def _starts(length: int, size: int, step: int) -> list[int]:
    if length <= size:
        return [0]
    starts = list(range(0, length - size, step))
    starts.append(length - size)  # the last chip ends at the raster's edge
    return starts


def grid_windows(
    bounds: Sequence[float], resolution: tuple[float, float], chip_size: int, overlap: float
) -> list[Window]:
    """Square windows of ``chip_size`` source pixels over ``bounds`` (row-major, top first)."""
    if not 0 <= overlap < 0.9:
        raise ImageryError(f"overlap must be in [0, 0.9), got {overlap!r}")
    if chip_size < 16:
        raise ImageryError(f"chip size must be at least 16 pixels, got {chip_size!r}")
    minx, miny, maxx, maxy = (float(v) for v in bounds)
    rx, ry = abs(float(resolution[0])), abs(float(resolution[1]))
    width, height = round((maxx - minx) / rx), round((maxy - miny) / ry)
    if width < 1 or height < 1:
        raise ImageryError(f"The raster has no area to scan ({width}x{height} pixels).")
    step = max(1, int(round(chip_size * (1.0 - overlap))))
    cols, rows = _starts(width, chip_size, step), _starts(height, chip_size, step)
    windows = []
    for row in rows:
        for col in cols:
            w_px, h_px = min(chip_size, width - col), min(chip_size, height - row)
            x0, y1 = minx + col * rx, maxy - row * ry
            x1, y0 = x0 + w_px * rx, y1 - h_px * ry
            outer = (col == 0, row + h_px >= height, col + w_px >= width, row == 0)
            windows.append(Window(len(windows), (x0, y0, x1, y1), outer))
    return windows


def metric_crs(source_crs: Any, bounds_lonlat: Sequence[float]) -> Any:
    """The source CRS when projected (metres or feet), else the UTM zone of the scene centre."""
    from pyproj import CRS

    crs = CRS.from_user_input(source_crs)
    if crs.is_projected:
        return crs
    lon = (bounds_lonlat[0] + bounds_lonlat[2]) / 2
    lat = (bounds_lonlat[1] + bounds_lonlat[3]) / 2
    zone = min(60, max(1, int(math.floor((lon + 180) / 6)) + 1))
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)

# ----------------------------------------------------------------------------------------------
# Merging
# ----------------------------------------------------------------------------------------------


def merge_detections(boxes: list[ChipBox], windows: Sequence[Window], source_crs: Any,
                     metric: Any, iou_threshold: float) -> list[tuple[str, Any, float]]:
    """`merge_boxes` over the windows' footprints; ``(label, polygon in EPSG:4326, score)``."""
    from shapely.geometry import box as shapely_box

    footprints = {  # only chips that reported something need their area in the metric CRS
        i: transform_geometry(shapely_box(*windows[i].bounds), source_crs, metric)
        for i in {b.window for b in boxes}
    }
    return [(label, transform_geometry(polygon, metric, LONLAT), score)
            for label, polygon, score in merge_boxes(boxes, footprints, iou_threshold)]


def merge_boxes(
    boxes: list[ChipBox], footprints: dict[int, Any], iou_threshold: float
) -> list[tuple[str, Any, float]]:
    """Cross-border merge, then NMS (module docstring); ``(label, polygon, score)`` best first.

    ``footprints[window]`` is each chip's area in the boxes' (metric) CRS.
    """
    if not boxes:
        return []
    import shapely

    polys = [b.polygon for b in boxes]

    def links() -> Iterator[tuple[int, int]]:
        left, right = shapely.STRtree(polys).query(polys, predicate="intersects")
        for i, j in zip(left.tolist(), right.tolist(), strict=True):
            a, b = boxes[i], boxes[j]
            if i >= j or a.window == b.window or a.label != b.label:
                continue
            strip = footprints[a.window].intersection(footprints[b.window])
            if strip.is_empty:
                continue
            if polygon_iou(a.polygon.intersection(strip), b.polygon.intersection(strip)) >= iou_threshold:
                yield i, j

    candidates = []
    for members in linked_groups(len(boxes), links()):
        first = boxes[members[0]]
        if len(members) == 1:  # seen by one chip only: down-weighted when cut by its border
            candidates.append((first.label, first.polygon, CUT_SCORE if first.cut else 1.0))
        else:  # confirmed by neighbouring chips: one whole object
            union = shapely.union_all([boxes[m].polygon for m in members]).envelope
            candidates.append((first.label, union, 1.0))
    return _nms(candidates, iou_threshold)


def linked_groups(n: int, links: Iterable[tuple[int, int]]) -> list[list[int]]:
    """Items ``0..n-1`` grouped by the links between them (union-find), ordered by first member."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in links:
        parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def polygon_iou(a: Any, b: Any) -> float:
    """Intersection over union of two shapely polygons (0 when either is empty)."""
    if a.is_empty or b.is_empty:
        return 0.0
    inter = a.intersection(b).area
    union = a.area + b.area - inter
    return float(inter / union) if union > 0 else 0.0


def _nms(
    candidates: list[tuple[str, Any, float]], iou_threshold: float
) -> list[tuple[str, Any, float]]:
    """Class-aware NMS; an R-tree limits the IoU tests to boxes that touch."""
    import shapely

    order = sorted(candidates, key=lambda c: (-c[2], -c[1].area))
    tree = shapely.STRtree([c[1] for c in order])
    suppressed = [False] * len(order)
    kept = []
    for i, (label, poly, score) in enumerate(order):
        if suppressed[i]:
            continue
        kept.append((label, poly, score))
        for j in tree.query(poly, predicate="intersects").tolist():
            same = j > i and not suppressed[j] and order[j][0] == label
            if same and polygon_iou(poly, order[j][1]) >= iou_threshold:
                suppressed[j] = True
    return kept

__all__ = [
    "CUT_SCORE",
    "ChipBox",
    "Window",
    "grid_windows",
    "merge_boxes",
    "merge_detections",
    "metric_crs",
]
