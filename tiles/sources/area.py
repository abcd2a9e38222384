"""A source seen through a window: part of a georeferenced source, as a source of its own."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tiles.chip import Chip
from tiles.errors import ImageryError
from tiles.sources.base import Source


class AreaSource(Source):
    """``source`` limited to ``bounds`` (in the source's CRS): its `bounds`, `bounds_lonlat` and
    `info` describe the area, `chip(None)` is the whole area, and other chips read the source.
    It borrows the source (closing it is the owner's business). Whole-scene scans of a drawn
    area read through one (`rsvlm.scan.scan` takes any georeferenced source)."""

    def __init__(self, source: Source, bounds: Sequence[float]) -> None:
        if not source.georeferenced:
            raise ImageryError(f"{source.name!r} has no georeference: an area of it has no "
                               "bounds on the map.")
        sb = source.bounds
        area = (max(float(bounds[0]), sb[0]), max(float(bounds[1]), sb[1]),
                min(float(bounds[2]), sb[2]), min(float(bounds[3]), sb[3]))
        if not (area[0] < area[2] and area[1] < area[3]):
            raise ImageryError(f"The area {list(bounds)} does not overlap {source.name!r}.")
        self.source = source
        self.name = source.name
        self.crs = source.crs
        self.bounds = area

    def info(self) -> dict[str, Any]:
        return {**self.source.info(), "bounds": list(self.bounds),
                "bounds_lonlat": self.bounds_lonlat}

    def chip(self, bbox: Sequence[float] | None = None, **kwargs: Any) -> Chip:
        if bbox is None:
            bbox, kwargs = self.bounds, {**kwargs, "crs": self.crs}
        return self.source.chip(bbox, **kwargs)
