"""A region: one imagery file plus its OpenStreetMap features, loaded once at start."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import geopandas as gpd

    from tiles import Overlay

log = logging.getLogger(__name__)

DEMO_REGION = Path(__file__).resolve().parent.parent / "assets" / "demo" / "kampala"
IMAGERY_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".png", ".jpg", ".jpeg")
OSM_SUFFIXES = (".geojson", ".gpkg", ".json", ".fgb", ".shp")
#: Columns that identify a feature rather than describe it: not shown as tags.
_ID_COLUMNS = {"osm_id", "id", "osm_type", "@id", "fid", "geometry", "full_id", "osm_way_id"}
MAX_TAG_ROWS = 60


@dataclass
class Region:
    name: str
    imagery: Path
    osm: gpd.GeoDataFrame | None
    preview: Overlay
    bounds_lonlat: tuple[float, float, float, float] | None
    attribution: str = ""

    @classmethod
    def load(cls, folder: str | Path, preview_size: int = 1024) -> Region:
        """Find the imagery and OSM file in ``folder`` (raises ``ValueError`` with a reason)."""
        from tiles import open_source

        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"Region folder {str(folder)!r} does not exist.")
        rasters = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGERY_SUFFIXES
                         and not p.name.startswith("preview"))
        if not rasters:
            raise ValueError(f"No imagery ({', '.join(IMAGERY_SUFFIXES)}) in {str(folder)!r}.")
        imagery = next((p for p in rasters if "rgb" in p.name.lower()), rasters[0])
        with open_source(imagery) as src:
            preview = src.preview(preview_size)
            bounds = src.bounds_lonlat
        osm_files = sorted(p for p in folder.iterdir() if p.suffix.lower() in OSM_SUFFIXES)
        extracts = sorted(p for p in folder.iterdir() if p.name.lower().endswith(".osm.pbf"))
        osm = None
        if not osm_files and extracts and bounds is not None:
            # An extract may cover a country: only the imagery's area is read (pyrosm).
            from training.osm_source import OSMError, PbfSource

            try:
                osm = PbfSource(extracts[0]).features(bounds)
            except OSMError as exc:
                raise ValueError(str(exc)) from exc
        elif osm_files:
            import geopandas as gpd

            osm = gpd.read_file(osm_files[0])
            osm = osm.to_crs("EPSG:4326") if osm.crs is not None else osm.set_crs("EPSG:4326")
            osm = osm[osm.geometry.notna() & ~osm.geometry.is_empty].reset_index(drop=True)
            osm[osm.geometry.name] = osm.geometry.make_valid()  # OSM polygons can self-touch
        attribution_file = folder / "ATTRIBUTION.md"
        attribution = ""
        if attribution_file.exists():
            attribution = ("Imagery © OpenAerialMap contributors (CC BY 4.0); "
                           "map data © OpenStreetMap contributors (ODbL)")
        elif extracts:
            attribution = "Map data © OpenStreetMap contributors (ODbL)"
        log.info("region %s: %s, %d OSM features", folder.name, imagery.name,
                 0 if osm is None else len(osm))
        return cls(folder.name, imagery, osm, preview, bounds, attribution)

    def osm_in(self, bounds_lonlat: tuple[float, float, float, float] | None
               ) -> gpd.GeoDataFrame | None:
        """OSM features that intersect ``bounds_lonlat`` (W, S, E, N), whole (not cut), so a
        building on the chip's edge counts once."""
        if self.osm is None or bounds_lonlat is None:
            return None
        from shapely.geometry import box

        return self.osm[self.osm.intersects(box(*bounds_lonlat))]


def tag_counts(features: gpd.GeoDataFrame | None) -> list[tuple[str, str, int]]:
    """``(key, value, count)`` over every tag column, most frequent first."""
    if features is None or len(features) == 0:
        return []
    counts: Counter[tuple[str, str]] = Counter()
    for col in features.columns:
        if col in _ID_COLUMNS or col == features.geometry.name:
            continue
        for value in features[col].dropna():
            text = str(value)
            if text:
                counts[(str(col), text)] += 1
    return [(k, v, n) for (k, v), n in counts.most_common(MAX_TAG_ROWS)]


def features_geojson(features: gpd.GeoDataFrame | None, limit: int = 2000) -> dict[str, Any]:
    """Features as a GeoJSON dict with string properties (for the map's OSM layer)."""
    if features is None or len(features) == 0:
        return {"type": "FeatureCollection", "features": []}
    from shapely.geometry import mapping

    geom_col = features.geometry.name
    out = []
    for _, row in features.head(limit).iterrows():
        props = {str(k): str(v) for k, v in row.items()
                 if k != geom_col and v is not None and str(v) not in ("", "nan", "None")}
        out.append({"type": "Feature", "geometry": mapping(row[geom_col]), "properties": props})
    return {"type": "FeatureCollection", "features": out}
