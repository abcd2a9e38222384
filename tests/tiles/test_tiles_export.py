"""GeoJSON (RFC 7946) and GeoPackage export of detections, re-read with geopandas."""

from __future__ import annotations

import json

import pytest
from shapely import MultiPolygon, Polygon
from shapely.geometry import shape

import tiles
from tiles import Detection, ImageryError, export


@pytest.fixture
def detections(demo_raster):
    with tiles.open_source(demo_raster) as src:
        chip = src.chip(None, size=512)
    # A clockwise (screen) pixel box becomes a lon/lat polygon; export must orient it CCW.
    house = chip.box_to_polygon((100, 100, 160, 140))
    tank = chip.obb_to_polygon(300, 200, 40, 20, 25)
    cw = Polygon(list(house.exterior.coords)[::-1])
    return [
        Detection("building", house, score=0.91, source="oam", question="find buildings"),
        Detection("tank", tank, score=None, source="oam", question="storage tanks?"),
        Detection("block", MultiPolygon([cw]), score=0.5),
    ]


def _is_ccw(ring) -> bool:
    from shapely import LinearRing

    return LinearRing(ring).is_ccw


def test_geojson_is_rfc7946(detections, tmp_path):
    path = export.write_geojson(detections, tmp_path / "out.geojson")
    doc = json.loads(path.read_text())
    assert doc["type"] == "FeatureCollection" and "crs" not in doc
    for feat in doc["features"]:
        geom = feat["geometry"]
        polys = geom["coordinates"] if geom["type"] == "MultiPolygon" else [geom["coordinates"]]
        for poly in polys:
            assert _is_ccw(poly[0])
            lon, lat = poly[0][0]
            assert 32.59 < lon < 32.60 and 0.35 < lat < 0.352  # lon first
        assert set(feat["properties"]) == {"label", "score", "source", "question", "time"}
    assert doc["features"][0]["properties"]["score"] == pytest.approx(0.91)
    assert doc["features"][1]["properties"]["score"] is None
    assert shape(doc["features"][0]["geometry"]).equals(detections[0].geometry)


def test_geojson_reread_with_geopandas(detections, tmp_path):
    import geopandas as gpd

    path = export.write_geojson(detections, tmp_path / "out.geojson")
    frame = gpd.read_file(path)
    assert frame.crs.to_epsg() == 4326
    assert list(frame["label"]) == ["building", "tank", "block"]
    minx, miny, maxx, maxy = frame.total_bounds
    assert 32.59 < minx < maxx < 32.60 and 0.35 < miny < maxy < 0.352
    assert frame.geometry[0].equals(detections[0].geometry)


def test_gpkg_round_trip(detections, tmp_path):
    import geopandas as gpd

    path = export.write_gpkg(detections, tmp_path / "out.gpkg")
    frame = gpd.read_file(path, layer="detections")
    assert frame.crs.to_epsg() == 4326 and len(frame) == 3
    # GeoPackage layers hold one geometry type, so polygons come back as multipolygons.
    assert frame.geometry[1].equals(MultiPolygon([detections[1].geometry]))
    assert frame["question"][1] == "storage tanks?"
    assert list(tmp_path.iterdir()) == [path]  # no temporary files left behind


@pytest.mark.parametrize("writer", ["write_geojson", "write_gpkg"])
def test_failed_export_leaves_no_partial_file(detections, tmp_path, writer, monkeypatch):
    target = tmp_path / ("out.geojson" if writer == "write_geojson" else "out.gpkg")
    getattr(export, writer)(detections[:1], target)
    before = target.read_bytes()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    if writer == "write_geojson":
        monkeypatch.setattr("pathlib.Path.write_text", explode)
    else:
        monkeypatch.setattr("geopandas.GeoDataFrame.to_file", explode)
    with pytest.raises((OSError, ImageryError)):
        getattr(export, writer)(detections, target)
    assert target.read_bytes() == before  # the previous export is intact
    assert list(tmp_path.iterdir()) == [target]


def test_bad_detections(tmp_path):
    utm = Polygon([(453000, 38000), (453100, 38000), (453100, 38100)])
    with pytest.raises(ImageryError, match="outside lon/lat"):
        export.write_geojson([Detection("x", utm)], tmp_path / "a.geojson")
    with pytest.raises(ImageryError, match="no geometry"):
        export.to_feature_collection([Detection("x", None)])
    with pytest.raises(ImageryError, match="does not exist"):
        export.write_geojson([], tmp_path / "missing" / "a.geojson")
    assert not (tmp_path / "a.geojson").exists()


def test_detection_time_is_iso8601():
    from datetime import datetime

    det = Detection("x", Polygon([(0, 0), (1, 0), (1, 1)]))
    assert datetime.fromisoformat(det.time).tzinfo is not None
