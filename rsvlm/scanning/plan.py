"""The plan of a multi-raster scan: which rasters, which areas, where windows lie.

1. **Headers.** Each raster's header is read (CRS, bounds, pixel size; a thread pool, since
   GDAL releases the GIL and remote COGs wait on the network). A raster that cannot be opened
   or has no georeference becomes a `RasterPlan` with ``error`` set: the run reports it and
   skips it.
2. **Areas.** Rasters whose footprints touch or overlap form one *area* (connected components
   on lon/lat bounds). Each area has one metric CRS: the rasters' own when they share a
   projected CRS, else the UTM zone of the area's centre. Detections are merged per area in
   that CRS, so IoU is measured on the ground, across raster edges too.
3. **Windows.** `list_windows` yields one raster's windows on demand (a Ray task calls it per
   raster, so the full list of a city's windows never exists at once). Window edges on a
   raster's edge count as *outer* (a box touching them is not cut) unless a neighbouring
   raster continues beyond that edge: then the edge is a *seam*, and a box touching it is cut
   like one touching an inner chip border.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from rsvlm.scanning.sources import RasterRef, is_remote

logger = logging.getLogger(__name__)

#: Lon/lat tolerance for "these footprints touch" (about 1 cm at the equator): rasters that
#: abut exactly in their own CRS may miss each other by rounding after reprojection.
TOUCH_DEG = 1e-7
HEADER_THREADS = 8


@dataclass
class RasterPlan:
    """One raster as the scan sees it (JSON-ready: it is stored in the run's ``run.json``)."""

    id: int
    uri: str
    name: str
    crs: str = ""
    bounds: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    bounds_lonlat: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    resolution: tuple[float, float] = (0.0, 0.0)
    windows: int = 0
    area: int = -1
    metric_crs: str = ""
    #: Bounds of neighbouring rasters of the same area, in this raster's CRS.
    neighbours: list[tuple[float, float, float, float]] = field(default_factory=list)
    error: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RasterPlan:
        data = dict(data)
        for key in ("bounds", "bounds_lonlat", "resolution"):
            data[key] = tuple(data[key])
        data["neighbours"] = [tuple(b) for b in data.get("neighbours", [])]
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Grid:
    """How windows are cut: chip side in source pixels and the overlap between neighbours."""

    chip_size: int = 512
    overlap: float = 0.125


def open_raster(uri: str) -> Any:
    """A `tiles` source for ``uri`` (remote COGs straight through GDAL's /vsicurl/)."""
    import tiles

    if is_remote(uri):
        return tiles.RasterSource(uri)
    return tiles.open_source(uri)


def _crs_text(crs: Any) -> str:
    code = crs.to_authority(min_confidence=100)
    return f"{code[0]}:{code[1]}" if code else crs.to_wkt()


def read_header(ref: RasterRef, index: int, grid: Grid) -> RasterPlan:
    """Header facts of one raster; errors are kept in the plan, never raised."""
    from rsvlm.scan import ScanError
    from tiles.grid import grid_windows

    plan = RasterPlan(id=index, uri=ref.uri, name=ref.name, error=ref.error)
    if ref.error:
        return plan
    try:
        with open_raster(ref.uri) as source:
            if not source.georeferenced:
                raise ScanError("no georeference (a scan writes map coordinates)")
            res = source.info().get("resolution")
            if not res or not all(float(r) > 0 for r in res):
                raise ScanError("no pixel size")
            plan.crs = _crs_text(source.crs)
            plan.bounds = tuple(float(v) for v in source.bounds)
            plan.bounds_lonlat = tuple(float(v) for v in source.bounds_lonlat)
            plan.resolution = (float(res[0]), float(res[1]))
        plan.windows = len(grid_windows(plan.bounds, plan.resolution, grid.chip_size, grid.overlap))
    except Exception as exc:  # any raster may be broken; the run goes on and reports it
        plan.error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        logger.warning("skipping %s: %s", ref.name, plan.error)
    return plan


def plan_rasters(refs: Sequence[RasterRef], grid: Grid) -> list[RasterPlan]:
    """Read every header (in threads), then group the good rasters into areas."""
    from rsvlm.scan import ScanError

    if not 0 <= grid.overlap < 0.9:
        raise ScanError(f"overlap must be in [0, 0.9), got {grid.overlap!r}")
    if grid.chip_size < 16:
        raise ScanError(f"chip size must be at least 16 pixels, got {grid.chip_size!r}")
    with ThreadPoolExecutor(max_workers=HEADER_THREADS) as pool:
        plans = list(pool.map(lambda a: read_header(a[1], a[0], grid), enumerate(refs)))
    assign_areas([p for p in plans if not p.error])
    return plans


def assign_areas(plans: Sequence[RasterPlan]) -> None:
    """Connected components of touching footprints; metric CRS and neighbours for each."""
    import shapely
    from shapely.geometry import box

    from tiles.geometry import transform_bounds
    from tiles.grid import metric_crs

    if not plans:
        return
    boxes = [box(*p.bounds_lonlat).buffer(TOUCH_DEG, join_style="mitre") for p in plans]
    parent = list(range(len(plans)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    left, right = shapely.STRtree(boxes).query(boxes, predicate="intersects")
    touching: dict[int, list[int]] = {}
    for i, j in zip(left.tolist(), right.tolist(), strict=True):
        if i != j:
            parent[find(i)] = find(j)
            touching.setdefault(i, []).append(j)
    groups: dict[int, list[RasterPlan]] = {}
    for i, p in enumerate(plans):
        groups.setdefault(find(i), []).append(p)
    for n, members in enumerate(groups.values()):
        crss = {p.crs for p in members}
        w = min(p.bounds_lonlat[0] for p in members)
        s = min(p.bounds_lonlat[1] for p in members)
        e = max(p.bounds_lonlat[2] for p in members)
        north = max(p.bounds_lonlat[3] for p in members)
        only = crss.pop() if len(crss) == 1 else "EPSG:4326"  # mixed CRSs: UTM of the centre
        metric = _crs_text(metric_crs(only, (w, s, e, north)))
        for p in members:
            p.area, p.metric_crs = n, metric
    for i, p in enumerate(plans):
        p.neighbours = [
            tuple(transform_bounds(plans[j].bounds, plans[j].crs, p.crs))
            for j in sorted(touching.get(i, []))
        ]


# ----------------------------------------------------------------------------------------------
# Windows
# ----------------------------------------------------------------------------------------------


def list_windows(plan: RasterPlan, grid: Grid) -> Iterator[dict[str, Any]]:
    """The windows of one raster as rows (``raster``, ``window``, bounds, outer edges)."""
    from shapely.geometry import box

    from tiles.grid import grid_windows

    neighbours = [box(*b) for b in plan.neighbours]
    rx, ry = plan.resolution
    for w in grid_windows(plan.bounds, plan.resolution, grid.chip_size, grid.overlap):
        x0, y0, x1, y1 = w.bounds
        outside = (  # one pixel just beyond each of the window's edges
            (x0 - rx, y0, x0, y1),
            (x0, y0 - ry, x1, y0),
            (x1, y0, x1 + rx, y1),
            (x0, y1, x1, y1 + ry),
        )
        outer = [
            edge and not any(n.intersection(box(*strip)).area > 0 for n in neighbours)
            for edge, strip in zip(w.outer, outside, strict=True)
        ]
        yield {
            "raster": plan.id,
            "window": w.index,
            "x0": x0,
            "y0": y0,
            "x1": x1,
            "y1": y1,
            "outer": int(sum(bit << k for k, bit in enumerate(outer))),  # left,bottom,right,top
        }


def outer_flags(bits: int) -> tuple[bool, bool, bool, bool]:
    return tuple(bool(int(bits) >> k & 1) for k in range(4))  # type: ignore[return-value]


def total_windows(plans: Sequence[RasterPlan]) -> int:
    return sum(p.windows for p in plans if not p.error)


def seam_margin(chip_size: int, model_size: int, border_px: float | None) -> float:
    """How close to a chip edge (as a fraction of the chip side) a box counts as cut."""
    margin_px = border_px if border_px is not None else max(2.0, 0.01 * model_size)
    return float(margin_px) / float(model_size) if model_size else 0.0
