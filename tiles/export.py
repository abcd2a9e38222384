"""Detections out: GeoJSON (RFC 7946) and GeoPackage, written atomically.

RFC 7946 means EPSG:4326 with lon/lat order and counter-clockwise exterior rings. Files are
written to a temporary sibling and renamed into place, so a failure never leaves half a file
(and never clobbers a good previous export).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tiles.atomic import atomic_path
from tiles.errors import ImageryError

PROPERTIES = ("label", "score", "source", "question", "time")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Detection:
    """One answer on the map: ``geometry`` is a shapely geometry in EPSG:4326 (lon, lat)."""

    label: str
    geometry: Any
    score: float | None = None
    source: str = ""
    question: str = ""
    time: str = field(default_factory=_now)


def _checked_geometry(det: Detection, i: int) -> Any:
    import shapely
    from shapely.geometry.base import BaseGeometry

    geom = det.geometry
    if not isinstance(geom, BaseGeometry) or geom.is_empty:
        raise ImageryError(f"Detection {i} ({det.label!r}) has no geometry to export.")
    w, s, e, n = geom.bounds
    if not all(math.isfinite(v) for v in (w, s, e, n)) or w < -180 or e > 180 or s < -90 or n > 90:
        raise ImageryError(
            f"Detection {i} ({det.label!r}) has coordinates outside lon/lat range "
            f"{[w, s, e, n]}; exports take EPSG:4326 (lon, lat) geometries."
        )
    # RFC 7946 section 3.1.6: exterior rings counter-clockwise, holes clockwise.
    return shapely.orient_polygons(geom, exterior_cw=False)


def _properties(det: Detection) -> dict[str, Any]:
    score = None if det.score is None else float(det.score)
    return {
        "label": str(det.label),
        "score": score,
        "source": str(det.source),
        "question": str(det.question),
        "time": str(det.time),
    }


def to_feature_collection(detections: Iterable[Detection]) -> dict[str, Any]:
    """A GeoJSON FeatureCollection dict (RFC 7946)."""
    from shapely.geometry import mapping

    features = []
    for i, det in enumerate(detections):
        geom = _checked_geometry(det, i)
        features.append(
            {"type": "Feature", "geometry": mapping(geom), "properties": _properties(det)}
        )
    return {"type": "FeatureCollection", "features": features}


def _atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a temporary sibling of ``path``, then rename it into place."""
    path = Path(path)
    if path.parent and not path.parent.is_dir():
        raise ImageryError(
            f"Cannot export to {str(path)!r}: folder {str(path.parent)!r} does not exist."
        )
    with atomic_path(path) as tmp:
        write(tmp)
    return path


def write_geojson(detections: Iterable[Detection], path: str | Path) -> Path:
    """Write detections as GeoJSON; returns the path."""
    text = json.dumps(to_feature_collection(detections), ensure_ascii=False)

    def _write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    return _atomic(path, _write)


def write_gpkg(
    detections: Iterable[Detection], path: str | Path, layer: str = "detections"
) -> Path:
    """Write detections as a GeoPackage layer (EPSG:4326); returns the path."""
    import geopandas as gpd

    dets = list(detections)
    geoms = [_checked_geometry(d, i) for i, d in enumerate(dets)]
    columns = {k: [_properties(d)[k] for d in dets] for k in PROPERTIES}
    frame = gpd.GeoDataFrame(columns, geometry=gpd.GeoSeries(geoms, crs="EPSG:4326"))
    frame["score"] = frame["score"].astype("float64")

    def _write(tmp: Path) -> None:
        frame.to_file(tmp, driver="GPKG", layer=layer)

    try:
        return _atomic(path, _write)
    except (OSError, ValueError, RuntimeError) as exc:
        if isinstance(exc, ImageryError):
            raise
        raise ImageryError(f"Could not write GeoPackage {str(path)!r}: {exc}") from exc
