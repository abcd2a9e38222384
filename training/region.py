"""A region: rasters + OSM vector features, cut into chips with the features of each chip.

Layers: `RegionSpec` says what the region is (paths, chip grid, split); `read_features` reads and
classifies the vectors; `chip_grid` decides where chips are; `chip_objects` joins the features of
one chip and converts them into chip pixels. Pixels are read through `tiles` (windowed reads).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from training.osm import Semantic, classify, parse_other_tags, prune_tags

log = logging.getLogger(__name__)

RASTER_SUFFIXES = (".tif", ".tiff", ".jp2", ".vrt", ".img")
VECTOR_SUFFIXES = (".geojson", ".gpkg", ".shp", ".fgb", ".osm.pbf", ".osm", ".json")
SPEC_SUFFIXES = (".yaml", ".yml", ".json")


class RegionError(ValueError):
    """A region spec or its files cannot be used; the message is written for a user."""


@dataclass
class RegionSpec:
    """What to build from: rasters, vectors and how to cut chips.

    Paths in a spec file are relative to the spec file's folder.
    """

    name: str
    rasters: list[Path]
    vectors: list[Path]
    chip_size: int = 512  # chip side in output pixels
    overlap: int = 0  # overlap between neighbouring chips, in output pixels
    resolution: float | None = None  # output pixel size in raster CRS units (None: native)
    val_fraction: float = 0.1  # share of spatial blocks held back for validation
    block_chips: int = 4  # a split block is block_chips x block_chips chips
    min_valid: float = 0.5  # skip chips with less than this share of non-empty pixels

    def __post_init__(self) -> None:
        if self.chip_size < 32 or self.chip_size > 4096:
            raise RegionError(f"chip_size must be between 32 and 4096 pixels, got {self.chip_size}")
        if not 0 <= self.overlap < self.chip_size:
            raise RegionError(f"overlap must be in [0, chip_size), got {self.overlap}")
        if self.resolution is not None and self.resolution <= 0:
            raise RegionError(f"resolution must be positive, got {self.resolution}")
        if not 0 <= self.val_fraction < 1:
            raise RegionError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not self.rasters:
            raise RegionError(f"region {self.name!r} has no raster (.tif/.tiff/.jp2/.vrt)")
        for p in [*self.rasters, *self.vectors]:
            if not p.exists():
                raise RegionError(f"region {self.name!r}: file not found: {p}")


def load_region(path: str | Path, **overrides: Any) -> RegionSpec:
    """A region from a folder (rasters + vector files) or a YAML/JSON spec file.

    Spec keys: name, rasters, vectors, chip_size, overlap, resolution, val_fraction, block_chips.
    `overrides` (not None) replace spec values.
    """
    path = Path(path)
    if not path.exists():
        raise RegionError(f"region not found: {path}")
    if path.is_dir():
        spec_files = [p for p in sorted(path.iterdir()) if p.name in {"region.yaml", "region.yml",
                                                                       "region.json"}]
        if spec_files:
            return load_region(spec_files[0], **overrides)
        files = sorted(p for p in path.iterdir() if p.is_file())
        data: dict[str, Any] = {
            "name": path.name,
            "rasters": [p for p in files if p.name.lower().endswith(RASTER_SUFFIXES)],
            "vectors": [p for p in files if _is_vector(p)],
        }
    elif path.suffix.lower() in SPEC_SUFFIXES:
        try:
            text = path.read_text()
            if path.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as exc:  # noqa: BLE001 - any parse error is a bad spec for the user
            raise RegionError(f"cannot read region spec {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise RegionError(f"region spec {path} must be a mapping")
        base = path.parent
        data.setdefault("name", path.stem)
        for key in ("rasters", "vectors"):
            value = data.get(key) or []
            value = [value] if isinstance(value, str) else value
            data[key] = [(base / v) if not Path(v).is_absolute() else Path(v) for v in value]
    elif path.name.lower().endswith(RASTER_SUFFIXES):
        data = {"name": path.stem, "rasters": [path], "vectors": []}
    else:
        raise RegionError(f"{path} is neither a folder, a raster nor a .yaml/.json region spec")
    known = {f.name for f in fields(RegionSpec)}
    unknown = set(data) - known
    if unknown:
        raise RegionError(f"unknown region spec keys: {', '.join(sorted(unknown))}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return RegionSpec(**data)


def _is_vector(p: Path) -> bool:
    name = p.name.lower()
    if name.endswith(SPEC_SUFFIXES) and name.startswith("region."):
        return False
    if name.endswith(".json") and not name.endswith(".geojson"):
        # Plain JSON only counts when it looks like GeoJSON.
        try:
            with p.open() as f:
                head = f.read(2048)
        except OSError:
            return False
        return '"FeatureCollection"' in head or '"Feature"' in head
    return name.endswith(VECTOR_SUFFIXES)


# ----------------------------------------------------------------------------------- features


def read_features(paths: list[Path], crs: Any) -> Any:
    """Read, prune and classify OSM features; returns a GeoDataFrame in `crs`.

    Columns: geometry, cls, plural, detail, attributes, tags (pruned dict), osm_id, kind.
    `.osm.pbf` files are read with GDAL's OSM driver (all layers); other formats with pyogrio.
    """
    frames = []
    for path in paths:
        for frame in _read_vector(path):
            if frame.crs is None:
                log.warning("%s has no CRS; assuming EPSG:4326", path)
                frame = frame.set_crs("EPSG:4326")
            frames.append(frame.to_crs(crs))
    gdf = classify_features(frames, crs)
    log.info("read %d visible features (%d classes) from %d files", len(gdf),
             gdf["cls"].nunique() if len(gdf) else 0, len(paths))
    return gdf


FEATURE_COLUMNS = ["cls", "plural", "detail", "attributes", "tags", "osm_id", "kind", "geometry"]


def classify_features(frames: list[Any], crs: Any) -> Any:
    """Raw feature frames (one column per tag, GDAL's ``other_tags`` or not) -> the visible,
    classified features in `crs` (the columns of `read_features`); the rest is dropped."""
    import geopandas as gpd
    import pandas as pd

    frames = [f.to_crs(crs) for f in frames if len(f)]
    if not frames:
        return gpd.GeoDataFrame(columns=FEATURE_COLUMNS, geometry="geometry", crs=crs)
    raw = pd.concat(frames, ignore_index=True)
    rows = []
    geoms = []
    for record, geom in zip(raw.drop(columns="geometry").to_dict("records"), raw.geometry,
                            strict=True):
        if geom is None or geom.is_empty:
            continue
        tags = {k: v for k, v in record.items() if _present(v)}
        tags.update(parse_other_tags(tags.pop("other_tags", None)))
        sem: Semantic | None = classify(tags)
        if sem is None:
            continue
        if not geom.is_valid:
            geom = geom.buffer(0) if geom.geom_type.endswith("Polygon") else geom
        osm_id = next((_id_text(tags[k]) for k in ("osm_id", "@id", "id", "osm_way_id")
                       if k in tags), None)
        rows.append({
            "cls": sem.cls, "plural": sem.plural, "detail": sem.detail,
            "attributes": list(sem.attributes), "tags": prune_tags(tags), "osm_id": osm_id,
            "kind": _kind(geom.geom_type),
        })
        geoms.append(geom)
    return gpd.GeoDataFrame(rows, columns=FEATURE_COLUMNS[:-1], geometry=geoms, crs=crs)


def _id_text(v: Any) -> str:
    # GeoJSON readers turn integer ids with gaps into floats: 614862647.0 -> "614862647".
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _present(v: Any) -> bool:
    if v is None:
        return False
    return not (isinstance(v, float) and math.isnan(v))


def _kind(geom_type: str) -> str:
    if "Polygon" in geom_type:
        return "area"
    if "Line" in geom_type:
        return "line"
    return "point"


def _read_vector(path: Path) -> Iterator[Any]:
    import pyogrio

    name = path.name.lower()
    try:
        if name.endswith((".osm.pbf", ".osm")):
            # GDAL's OSM driver: tags not promoted to columns sit in `other_tags`.
            for layer in ("points", "lines", "multipolygons"):
                yield pyogrio.read_dataframe(path, layer=layer, on_invalid="ignore")
        else:
            layers = pyogrio.list_layers(path)
            for layer_name, _ in layers:
                yield pyogrio.read_dataframe(path, layer=layer_name, on_invalid="ignore")
    except Exception as exc:  # noqa: BLE001 - GDAL raises many types for unreadable files
        raise RegionError(f"cannot read vector file {path}: {exc}") from exc


# ----------------------------------------------------------------------------------- grid


@dataclass(frozen=True)
class GridCell:
    """One chip position: bounds in the raster CRS and grid indices."""

    raster_index: int
    row: int
    col: int
    bounds: tuple[float, float, float, float]  # minx, miny, maxx, maxy in raster CRS

    @property
    def chip_id(self) -> str:
        return f"r{self.raster_index}_{self.row:04d}_{self.col:04d}"


@dataclass
class RasterInfo:
    path: Path
    crs: Any
    bounds: tuple[float, float, float, float]
    res: tuple[float, float]
    width: int
    height: int


def raster_info(path: Path) -> RasterInfo:
    import rasterio

    try:
        with rasterio.open(path) as ds:
            if ds.crs is None:
                raise RegionError(f"raster {path} has no CRS; a region needs georeferenced rasters")
            return RasterInfo(path, ds.crs, tuple(ds.bounds), tuple(ds.res), ds.width, ds.height)
    except rasterio.errors.RasterioIOError as exc:
        raise RegionError(f"cannot open raster {path}: {exc}") from exc


def _starts(extent: float, size: float, stride: float) -> list[float]:
    """Chip origins along one axis; a last chip flush with the edge when the rest is large."""
    if extent < size * 0.999:
        return []
    n = int(math.floor((extent - size) / stride + 1e-9)) + 1
    starts = [i * stride for i in range(n)]
    rest = extent - (starts[-1] + size)
    if rest > stride / 2:
        starts.append(extent - size)
    return starts


def chip_grid(info: RasterInfo, spec: RegionSpec, raster_index: int = 0) -> list[GridCell]:
    """Chip cells over a raster, row-major from the top-left corner."""
    res = spec.resolution or info.res[0]
    res_y = spec.resolution or info.res[1]
    size_x, size_y = spec.chip_size * res, spec.chip_size * res_y
    stride_x = (spec.chip_size - spec.overlap) * res
    stride_y = (spec.chip_size - spec.overlap) * res_y
    minx, miny, maxx, maxy = info.bounds
    xs = _starts(maxx - minx, size_x, stride_x)
    ys = _starts(maxy - miny, size_y, stride_y)
    cells = []
    for r, dy in enumerate(ys):
        for c, dx in enumerate(xs):
            x0, y1 = minx + dx, maxy - dy
            cells.append(GridCell(raster_index, r, c, (x0, y1 - size_y, x0 + size_x, y1)))
    return cells


def _block(cell: GridCell, spec: RegionSpec) -> tuple[int, int, int]:
    return (cell.raster_index, cell.row // spec.block_chips, cell.col // spec.block_chips)


def assign_splits(cells: list[GridCell], spec: RegionSpec, seed: int) -> dict[str, str]:
    """Split per chip id: 'train', 'val', or 'gap' (train chips that overlap a val chip).

    Whole spatial blocks (block_chips x block_chips chips) go to validation: the
    round(val_fraction x blocks) blocks ranked first by a seeded hash, at least one when there
    are two blocks or more. With overlapping grids, neighbouring chips share pixels; dropping the
    train side of a shared border keeps validation pixels out of training.
    """
    blocks = sorted({_block(c, spec) for c in cells})
    n_val = round(spec.val_fraction * len(blocks))
    if spec.val_fraction > 0 and len(blocks) >= 2:
        n_val = min(max(n_val, 1), len(blocks) - 1)

    def rank(b: tuple[int, int, int]) -> bytes:
        return hashlib.sha256(f"{seed}:{spec.name}:{b}".encode()).digest()

    val_blocks = set(sorted(blocks, key=rank)[:n_val])
    splits = {c.chip_id: "val" if _block(c, spec) in val_blocks else "train" for c in cells}
    if spec.overlap == 0:
        return splits
    val_cells = [c for c in cells if splits[c.chip_id] == "val"]
    if not val_cells:
        return splits
    from shapely import STRtree, box

    tree = STRtree([box(*c.bounds) for c in val_cells])
    for c in cells:
        if splits[c.chip_id] != "train":
            continue
        hits = tree.query(box(*c.bounds), predicate="intersects")
        if any(box(*c.bounds).intersection(box(*val_cells[i].bounds)).area > 0 for i in hits):
            splits[c.chip_id] = "gap"
    return splits


# ----------------------------------------------------------------------------------- objects


@dataclass
class ChipObject:
    """One OSM feature inside a chip, in chip pixels."""

    cls: str
    plural: str
    detail: str
    attributes: list[str]
    tags: dict[str, str]
    kind: str  # "area" | "line" | "point"
    geom: Any  # shapely geometry in chip pixels (clipped)
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 pixels
    area_m2: float
    length_m: float
    visible: float  # visible share of the feature (area or length); 1 for points
    osm_id: str | None = None

    @property
    def center(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)


@dataclass
class ChipContext:
    """What the task generators see of one chip."""

    chip_id: str
    width: int
    height: int
    gsd: float  # ground metres per chip pixel
    objects: list[ChipObject]
    split: str = "train"
    meta: dict[str, Any] = field(default_factory=dict)

    def of_class(self, cls: str) -> list[ChipObject]:
        return [o for o in self.objects if o.cls == cls]

    @property
    def classes(self) -> list[str]:
        return sorted({o.cls for o in self.objects})


def object_order(o: ChipObject) -> tuple[str, float, float, float]:
    """A stable order that does not depend on file order: class, then top-to-bottom,
    left-to-right."""
    return (o.cls, round(o.box[1], 3), round(o.box[0], 3), -o.area_m2)


def ground_resolution(bounds_lonlat: tuple[float, float, float, float] | None,
                      width_px: int, fallback: float) -> float:
    """Metres on the ground per chip pixel, measured geodesically across the chip's middle."""
    if bounds_lonlat is None:
        return fallback
    from pyproj import Geod

    w, s, e, n = bounds_lonlat
    lat = (s + n) / 2
    _, _, dist = Geod(ellps="WGS84").inv(w, lat, e, lat)
    return float(dist) / max(width_px, 1)


def chip_objects(features: Any, bounds: tuple[float, float, float, float], width: int,
                 height: int, gsd: float, *, min_area_px: float = 24.0,
                 min_visible: float = 0.3, min_length_px: float = 12.0) -> list[ChipObject]:
    """Features of `features` (GeoDataFrame in the raster CRS) clipped to `bounds`, in pixels.

    Objects mostly outside the chip (visible share < min_visible) or tiny are left out, so that
    counts, boxes and captions talk about the same, clearly visible set.
    """
    import shapely
    from shapely import affinity

    if features is None or len(features) == 0:
        return []
    minx, miny, maxx, maxy = bounds
    idx = features.sindex.query(shapely.box(*bounds), predicate="intersects")
    if len(idx) == 0:
        return []
    sub = features.iloc[np.sort(idx)]
    geoms = sub.geometry.values
    clipped = shapely.clip_by_rect(np.asarray(geoms), minx, miny, maxx, maxy)
    sx, sy = width / (maxx - minx), height / (maxy - miny)
    # CRS -> chip pixels: x right, y down from the chip's top-left corner.
    matrix = [sx, 0.0, 0.0, -sy, -minx * sx, maxy * sy]
    out: list[ChipObject] = []
    for rec, full, part in zip(sub.itertuples(index=False), geoms, clipped, strict=True):
        if part is None or part.is_empty:
            continue
        px = affinity.affine_transform(part, matrix)
        kind = rec.kind
        if kind == "area":
            area_px = px.area
            if area_px < min_area_px:
                continue
            visible = float(part.area / full.area) if full.area > 0 else 1.0
            if visible < min_visible:
                continue
            length_px = 0.0
        elif kind == "line":
            length_px = px.length
            if length_px < min_length_px:
                continue
            area_px, visible = 0.0, float(part.length / full.length) if full.length else 1.0
        else:
            area_px, length_px, visible = 0.0, 0.0, 1.0
        x1, y1, x2, y2 = px.bounds
        if kind == "point":
            # Points get a small box (about 5 m) so they can be grounded.
            half = max(2.5 / max(gsd, 1e-6), 4.0)
            x1, y1, x2, y2 = x1 - half, y1 - half, x2 + half, y2 + half
        box = (max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2))
        out.append(ChipObject(
            cls=rec.cls, plural=rec.plural, detail=rec.detail, attributes=list(rec.attributes),
            tags=dict(rec.tags), kind=kind, geom=px, box=box, area_m2=area_px * gsd * gsd,
            length_m=length_px * gsd, visible=visible, osm_id=rec.osm_id,
        ))
    out.sort(key=object_order)
    return out
