"""Merging raw boxes of many windows of many rasters into one detection per object.

Within one raster this is exactly `rsvlm.scan`'s rule: two boxes of the same label from two
overlapping windows are the same object when their parts inside the shared strip agree
(IoU >= threshold); merged objects score 1.0, a cut box no neighbour confirmed 0.5; a
class-aware NMS removes what is left over.

Across rasters the windows of two neighbours may overlap (then the same strip rule holds) or
only *abut*: orthophoto tiles usually share an edge and no pixel, so the strip has no area. The
rule then runs on a strip ``2 * m`` wide around the seam, with both boxes grown by ``m`` (the
cut margin in metres): a box that ends at the seam and its continuation that starts there
overlap in that strip exactly as far as they agree along the seam. Everything happens in the
area's metric CRS, so ``m`` and IoU are ground quantities.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from tiles.grid import CUT_SCORE, linked_groups, polygon_iou

Key = tuple[int, int]


@dataclass
class RawBox:
    label: str
    key: Key  # (raster, window)
    polygon: Any  # shapely polygon in the area's metric CRS
    cut: bool


@dataclass
class Merged:
    label: str
    polygon: Any
    score: float
    members: list[int] = field(default_factory=list)  # indexes into the raw boxes


def _grow(geom: Any, m: float) -> Any:
    return geom.buffer(m, join_style="mitre") if m > 0 else geom


def same_object(
    a: RawBox, b: RawBox, footprints: dict[Key, Any], iou_threshold: float, margin_frac: float
) -> bool:
    """The strip rule (module docstring) for two boxes of different windows."""
    fa, fb = footprints[a.key], footprints[b.key]
    if a.key[0] == b.key[0]:  # one raster: its windows overlap by construction
        strip = fa.intersection(fb)
        pa, pb = a.polygon, b.polygon
    else:
        m = margin_frac * max(fa.area, fb.area) ** 0.5
        strip = _grow(fa, m).intersection(_grow(fb, m))
        pa, pb = _grow(a.polygon, m), _grow(b.polygon, m)
    if strip.is_empty or strip.area <= 0:
        return False
    return polygon_iou(pa.intersection(strip), pb.intersection(strip)) >= iou_threshold


def merge_area(
    boxes: Sequence[RawBox],
    footprints: dict[Key, Any],
    iou_threshold: float,
    margin_frac: float,
) -> list[Merged]:
    """One area's boxes -> merged detections, best first (deterministic for a given order)."""
    import shapely

    if not boxes:
        return []
    polys = [b.polygon for b in boxes]
    reach = 2 * margin_frac * max(f.area for f in footprints.values()) ** 0.5

    def links() -> Iterator[tuple[int, int]]:
        left, right = shapely.STRtree(polys).query(polys, predicate="dwithin", distance=reach)
        for i, j in zip(left.tolist(), right.tolist(), strict=True):
            a, b = boxes[i], boxes[j]
            if i >= j or a.key == b.key or a.label != b.label:
                continue
            if same_object(a, b, footprints, iou_threshold, margin_frac):
                yield i, j

    candidates = []
    for members in linked_groups(len(boxes), links()):
        first = boxes[members[0]]
        if len(members) == 1:  # seen by one window only: down-weighted when cut
            candidates.append(
                Merged(first.label, first.polygon, CUT_SCORE if first.cut else 1.0, members)
            )
        else:
            union = shapely.union_all([boxes[m].polygon for m in members]).envelope
            candidates.append(Merged(first.label, union, 1.0, members))
    return nms(candidates, iou_threshold)


def nms(candidates: list[Merged], iou_threshold: float) -> list[Merged]:
    """Class-aware NMS (highest score, then largest area, then first seen, kept first)."""
    import shapely

    order = sorted(
        candidates, key=lambda c: (-c.score, -c.polygon.area, min(c.members, default=0))
    )
    tree = shapely.STRtree([c.polygon for c in order])
    suppressed = [False] * len(order)
    kept = []
    for i, cand in enumerate(order):
        if suppressed[i]:
            continue
        kept.append(cand)
        for j in tree.query(cand.polygon, predicate="intersects").tolist():
            other = order[j]
            same = j > i and not suppressed[j] and other.label == cand.label
            if same and polygon_iou(cand.polygon, other.polygon) >= iou_threshold:
                suppressed[j] = True
                cand.members = sorted(cand.members + other.members)  # provenance
    return kept
