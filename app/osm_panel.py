"""OSM features of the question area, for any georeferenced imagery (not only the region's).

The region folder brings its own OSM file; everything else (an uploaded GeoTIFF, a fetched
basemap tile) gets its features from the app's OSM source (`training.osm_source`: Overpass when
online, cached on disk, or a local ``.osm.pbf`` extract). They are fetched once per area (the
upload's bounds) and kept in the session, so a new chip inside the area costs no request.
Tag values are untrusted text: the panel escapes them (`html_safe`), the map builds popups from
text nodes.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from app.html_safe import esc, table
from app.region import features_geojson, tag_counts

if TYPE_CHECKING:
    import geopandas as gpd

log = logging.getLogger(__name__)

Bounds = tuple[float, float, float, float]
#: The most features kept per session area (memory stays bounded; the table shows tag counts).
MAX_AREA_FEATURES = 20000


@dataclass
class AreaOSM:
    """The OSM features of one area (an upload's bounds), or why there are none."""

    bounds: Bounds
    features: gpd.GeoDataFrame | None
    source: str = ""
    attribution: str = ""
    note: str = ""  # a failure or limit, said in the panel

    def within(self, bounds: Bounds) -> gpd.GeoDataFrame | None:
        if self.features is None or len(self.features) == 0:
            return self.features
        from shapely.geometry import box

        idx = self.features.sindex.query(box(*bounds), predicate="intersects")
        return self.features.iloc[sorted(idx)]


class AreaStore:
    """The areas fetched lately (shared by sessions), so a model's prompt context can reuse
    them without another request or read (`prompt_lines`)."""

    def __init__(self, max_areas: int = 32) -> None:
        self._areas: OrderedDict[Bounds, AreaOSM] = OrderedDict()
        self._max = max_areas
        self._lock = threading.Lock()

    def add(self, area: AreaOSM | None) -> AreaOSM | None:
        if area is not None and area.features is not None:
            with self._lock:
                self._areas[area.bounds] = area
                self._areas.move_to_end(area.bounds)
                while len(self._areas) > self._max:
                    self._areas.popitem(last=False)
        return area

    def find(self, bounds: Bounds | None) -> AreaOSM | None:
        """The latest area that holds the centre of ``bounds``."""
        if bounds is None:
            return None
        with self._lock:
            areas = list(self._areas.values())
        return next((a for a in reversed(areas) if _inside(bounds, a.bounds)), None)


def prompt_lines(region: Any, store: AreaStore, chip: Any, max_lines: int = 8) -> list[str]:
    """``OSM key=value: count`` lines of the chip's features (the panel's), for a pretrained
    model's prompt: the region's file on the region, a fetched area elsewhere."""
    from rsvlm.backends.semantics import tag_lines

    bounds = getattr(chip, "bounds_lonlat", None)
    features, _, _ = features_for(region, store.find(bounds), bounds)
    return tag_lines(features, max_lines)


def fetch_area(osm: Any, bounds: Bounds | None, store: AreaStore | None = None
               ) -> AreaOSM | None:
    """Features of ``bounds`` from the app's OSM source; a failure becomes the note (never
    raises: the upload or chip it belongs to still works without OSM)."""
    if osm is None or bounds is None:
        return None
    area = _fetch(osm, bounds)
    return store.add(area) if store is not None else area


def _fetch(osm: Any, bounds: Bounds) -> AreaOSM:
    from training.osm_source import OSMError

    try:
        feats = osm.features(bounds)
    except OSMError as exc:
        log.warning("OSM features unavailable: %s", exc)
        return AreaOSM(bounds, None, osm.description, osm.attribution, f"OSM unavailable: {exc}")
    except Exception as exc:  # a reader crash must not end the session
        log.exception("OSM features failed")
        return AreaOSM(bounds, None, osm.description, osm.attribution,
                       f"OSM unavailable ({type(exc).__name__}).")
    note = ""
    if len(feats) > MAX_AREA_FEATURES:
        note = f"showing the first {MAX_AREA_FEATURES} of {len(feats)} OSM features"
        feats = feats.iloc[:MAX_AREA_FEATURES]
    return AreaOSM(bounds, feats, osm.description, osm.attribution, note)


def _inside(inner: Bounds, outer: Bounds | None) -> bool:
    if outer is None:
        return False
    cx, cy = (inner[0] + inner[2]) / 2, (inner[1] + inner[3]) / 2
    return outer[0] <= cx <= outer[2] and outer[1] <= cy <= outer[3]


def features_for(region: Any, area: AreaOSM | None, bounds: Bounds | None
                 ) -> tuple[gpd.GeoDataFrame | None, str, str]:
    """(features intersecting ``bounds``, where they come from, a note) for the panel: the
    region's own OSM file for chips on the region, the session's area otherwise."""
    if bounds is None:
        return None, "", ""
    if (region is not None and region.osm is not None
            and _inside(bounds, region.bounds_lonlat)):
        return region.osm_in(bounds), f"region {region.name}", ""
    if area is not None and _inside(bounds, area.bounds):
        return area.within(bounds), area.source, area.note
    return None, "", ""


def panel_html(features: gpd.GeoDataFrame | None, where: str, source: str, note: str,
               attribution: str = "") -> str:
    """The OSM part of the semantics panel: tag counts, source, attribution, any note."""
    n = 0 if features is None else len(features)
    parts = [f"<h4>OSM features in {esc(where)}: {n}</h4>"]
    if note:
        parts.append(f'<p class="rsvlm-note">{esc(note)}</p>')
    parts.append(table(["tag", "value", "count"], tag_counts(features),
                       empty="no OSM features here"))
    if source:
        from training.osm_source import ATTRIBUTION

        parts.append(f"<p><small>Source: {esc(source)} · {esc(attribution or ATTRIBUTION)}"
                     "</small></p>")
    return "\n".join(parts)


def map_layer(region_osm: dict[str, Any] | None, area: AreaOSM | None) -> dict[str, Any] | None:
    """The map's OSM layer: the region's features plus the session area's."""
    if area is None or area.features is None or len(area.features) == 0:
        return region_osm
    extra = features_geojson(area.features)
    if not region_osm:
        return extra
    return {"type": "FeatureCollection",
            "features": [*region_osm.get("features", []), *extra["features"]]}
