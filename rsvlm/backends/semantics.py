"""OSM features of a chip as short text lines for a prompt's context (and the semantics panel).

    osm = osm_context("region/osm_buildings.geojson")   # or a GeoDataFrame
    engine = ChatEngine(loaded, osm=osm)                # each chip's features reach the prompt

Lines count the tag values of the features that intersect the chip (``building=house: 12``),
most frequent first, at most ``max_lines``: the few facts a model can use, in few tokens.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

_SKIP = {"osm_id", "id", "@id", "fid", "osm_type", "geometry", "attributes", "tags", "kind"}


def tag_lines(features: Any, max_lines: int = 8) -> list[str]:
    """``key=value: count`` lines over the features' tag columns, most frequent first."""
    if features is None or len(features) == 0:
        return []
    counts: Counter[tuple[str, str]] = Counter()
    geometry = features.geometry.name
    for column in features.columns:
        if column == geometry or str(column).lower() in _SKIP:
            continue
        for value in features[column].dropna():
            text = " ".join(str(value).split())[:60]
            if text:
                counts[(str(column), text)] += 1
    return [f"OSM {k}={v}: {n}" for (k, v), n in counts.most_common(max_lines)]


def osm_context(source: str | Path | Any, max_lines: int = 8) -> Callable[[Any], list[str]]:
    """``fn(chip) -> lines`` for a vector file (GeoJSON/GPKG/...) or a GeoDataFrame of OSM
    features; chips without a georeference get no lines."""
    import geopandas as gpd
    from shapely.geometry import box

    frame = gpd.read_file(source) if isinstance(source, str | Path) else source
    if frame.crs is not None and frame.crs.to_epsg() != 4326:
        frame = frame.to_crs(4326)

    def lines(chip: Any) -> list[str]:
        bounds = getattr(chip, "bounds_lonlat", None)
        if bounds is None:
            return []
        return tag_lines(frame[frame.intersects(box(*bounds))], max_lines)

    return lines
