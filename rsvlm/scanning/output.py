"""The end of a run: merge the committed raw boxes per area and write one file.

The merged detections are a GeoDataFrame in EPSG:4326 with ``label``, ``score``, ``source``
(the raster or rasters that saw the object, ``;``-separated), ``window`` (``name#index`` of
each window that saw it) and ``question``. The file format follows the suffix: ``.parquet`` /
``.geoparquet`` (GeoParquet), ``.gpkg`` (GeoPackage), ``.geojson`` / ``.json`` (RFC 7946).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rsvlm.scan import ScanError
from rsvlm.scanning.merge import Key, RawBox, merge_area
from rsvlm.scanning.plan import RasterPlan
from tiles.atomic import atomic_path

OUTPUT_COLUMNS = ("label", "score", "source", "window", "question")
FORMATS = {".parquet": "parquet", ".geoparquet": "parquet", ".gpkg": "gpkg",
           ".geojson": "geojson", ".json": "geojson"}  # fmt: skip


def output_format(path: str | Path, gpkg: bool = False) -> str:
    suffix = Path(path).suffix.lower()
    if gpkg:
        return "gpkg"
    if suffix not in FORMATS:
        raise ScanError(
            f"Cannot tell the output format of {str(path)!r}: end it in .parquet, .gpkg or "
            ".geojson."
        )
    return FORMATS[suffix]


def _to_crs(geoms: Sequence[Any], src: str, dst: str) -> list[Any]:
    import numpy as np
    import shapely

    from tiles.geometry import transformer

    t = transformer(src, dst)

    def apply(coords: np.ndarray) -> np.ndarray:
        xs, ys = t.transform(coords[:, 0], coords[:, 1])
        return np.column_stack([xs, ys])

    return list(shapely.transform(np.asarray(geoms, dtype=object), apply))


def merge_raw(
    raw: Any, plans: Sequence[RasterPlan], iou_threshold: float, margin_frac: float
) -> Any:
    """Raw boxes (a `RunStore.read_parts` frame) -> merged detections (GeoDataFrame, EPSG:4326)."""
    import geopandas as gpd
    from shapely.geometry import box

    by_id = {p.id: p for p in plans}
    records: list[dict[str, Any]] = []
    geoms: list[Any] = []
    for _area, frame in raw.groupby("area", sort=True):
        metric = by_id[int(frame["raster"].iloc[0])].metric_crs
        polys = _to_crs(list(frame.geometry), "EPSG:4326", metric)
        keys: list[Key] = [
            (int(r), int(w)) for r, w in zip(frame["raster"], frame["window"], strict=True)
        ]
        footprints: dict[Key, Any] = {}
        bounds = frame[["x0", "y0", "x1", "y1"]].itertuples(index=False)
        for k, row in zip(keys, bounds, strict=True):
            if k not in footprints:
                footprints[k] = _to_crs([box(*row)], by_id[k[0]].crs, metric)[0]
        boxes = [
            RawBox(label, k, poly, bool(cut))
            for label, k, poly, cut in zip(frame["label"], keys, polys, frame["cut"], strict=True)
        ]
        merged = merge_area(boxes, footprints, iou_threshold, margin_frac)
        question = str(frame["question"].iloc[0])
        for m in merged:
            names = list(dict.fromkeys(by_id[boxes[i].key[0]].name for i in m.members))
            wins = [f"{by_id[boxes[i].key[0]].name}#{boxes[i].key[1]}" for i in m.members]
            records.append(
                {
                    "label": m.label,
                    "score": m.score,
                    "source": ";".join(names),
                    "window": ";".join(dict.fromkeys(wins)),
                    "question": question,
                }
            )
        geoms += _to_crs([m.polygon for m in merged], metric, "EPSG:4326")
    columns = {c: [r[c] for r in records] for c in OUTPUT_COLUMNS}
    frame = gpd.GeoDataFrame(columns, geometry=gpd.GeoSeries(geoms, crs="EPSG:4326"))
    frame["score"] = frame["score"].astype("float64")
    return frame


def write_detections(frame: Any, path: str | Path, fmt: str) -> Path:
    """Write ``frame`` atomically (a temporary sibling renamed into place)."""
    import shapely

    path = Path(path)
    if not path.parent.is_dir():
        raise ScanError(f"Cannot write {str(path)!r}: folder {str(path.parent)!r} does not exist.")
    frame = frame.set_geometry(shapely.orient_polygons(frame.geometry.values, exterior_cw=False))
    with atomic_path(path) as tmp:  # keeps the suffix: GDAL picks its driver by it
        if fmt == "parquet":
            frame.to_parquet(tmp, index=False)
        elif fmt == "gpkg":
            frame.to_file(tmp, driver="GPKG", layer="detections")
        else:
            data = json.loads(frame.to_json(drop_id=True))
            data.pop("crs", None)  # RFC 7946: EPSG:4326 is implied, no crs member
            tmp.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path
