"""OSM semantics for the analyst's own imagery: an uploaded GeoTIFF outside the region gets its
area's features from the app's OSM source (a local extract, or Overpass with its failures)."""

from __future__ import annotations

import html
import json
import socket
from pathlib import Path

import pytest

from app import handlers as h
from app.backend import FakeBackend
from app.handlers import AppContext
from app.main import build_context, parse_args
from training.osm_source import ATTRIBUTION, OverpassSource, PbfSource, open_osm

XSS = "<img src=x onerror=alert(1)>"


def _ctx(demo_region, tmp_path: Path, osm) -> AppContext:
    return AppContext(backend=FakeBackend(), region=demo_region, export_dir=tmp_path / "exports",
                      osm=osm)


def _osm_rows(html: str) -> int:
    head = html.split("OSM features in this chip: ")[1]
    return int(head.split("<")[0])


def test_an_upload_outside_the_region_gets_its_areas_features(
        demo_region, tmp_path: Path, helsinki_pbf: Path, helsinki_raster: Path) -> None:
    ctx = _ctx(demo_region, tmp_path, PbfSource(helsinki_pbf))
    state, start = h.start_session(ctx)
    assert _osm_rows(start.semantics_html) > 0  # the Kampala region's own file still works
    update = h.upload(ctx, state, str(helsinki_raster))
    assert update.notice is None
    whole = _osm_rows(update.semantics_html)
    assert whole > 50
    for tag in ("highway", "building", "railway"):
        assert f"<td>{tag}</td>" in update.semantics_html
    assert "Helsinki.osm.pbf" in update.semantics_html
    assert "© OpenStreetMap contributors" in update.semantics_html
    assert '"osm_id":"way/' in html.unescape(update.map_html)  # the upload's features, mapped
    # A rectangle inside the upload: fewer features, from the session's area (no new read).
    w, s, e, n = state.upload_layer.bounds_lonlat
    part = h.select_bbox(ctx, state, (w, s, (w + e) / 2, (s + n) / 2))
    assert 0 < _osm_rows(part.semantics_html) < whole


def test_overpass_features_for_an_upload(demo_region, tmp_path: Path, overpass_server,
                                         helsinki_raster: Path) -> None:
    osm = OverpassSource(overpass_server.url, cache_dir=tmp_path / "cache", min_interval_s=0)
    ctx = _ctx(demo_region, tmp_path, osm)
    state, _ = h.start_session(ctx)
    update = h.upload(ctx, state, str(helsinki_raster))
    assert len(overpass_server.queries) == 1
    assert _osm_rows(update.semantics_html) > 50
    assert "Overpass API at http://127.0.0.1" in update.semantics_html


def test_unreachable_overpass_leaves_the_upload_working(demo_region, tmp_path: Path,
                                                        helsinki_raster: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    osm = OverpassSource(f"http://127.0.0.1:{port}/api/interpreter", cache_dir=tmp_path,
                         timeout_s=2, min_interval_s=0)
    ctx = _ctx(demo_region, tmp_path, osm)
    state, _ = h.start_session(ctx)
    update = h.upload(ctx, state, str(helsinki_raster))
    assert state.chip is not None and state.chip_source == str(helsinki_raster)
    assert "OSM unavailable: cannot reach Overpass" in update.semantics_html
    assert _osm_rows(update.semantics_html) == 0


def test_osm_tags_are_escaped_in_the_panel_and_the_map(demo_region, tmp_path: Path,
                                                       helsinki_raster: Path) -> None:
    path = tmp_path / "hostile.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "properties": {"osm_id": 1, "building": "yes", "name": XSS,
                                          XSS: "value"},
        "geometry": {"type": "Point", "coordinates": [24.941, 60.168]}}]}))
    ctx = _ctx(demo_region, tmp_path, open_osm(path))
    state, _ = h.start_session(ctx)
    update = h.upload(ctx, state, str(helsinki_raster))
    assert _osm_rows(update.semantics_html) == 1
    assert XSS not in update.semantics_html and "&lt;img src=x onerror=alert(1)&gt;" in \
        update.semantics_html
    page = html.unescape(update.map_html)  # the page inside the iframe's srcdoc
    assert "onerror=alert(1)" in page.replace("\\u003c", "<")  # the tag is there, as data
    assert XSS not in page


def test_app_osm_option(tmp_path: Path, helsinki_pbf: Path) -> None:
    from app.main import make_osm_source

    assert make_osm_source(parse_args(["--fake-model"])) is None  # no network unless asked
    assert make_osm_source(parse_args(["--fake-model", "--basemaps"])) is None
    with pytest.raises(ValueError, match="--offline"):
        make_osm_source(parse_args(["--offline", "--osm", "auto"]))
    args = parse_args(["--fake-model", "--osm", "auto", "--overpass-url",
                       "http://127.0.0.1:1/api/interpreter"])
    osm = make_osm_source(args)
    assert isinstance(osm, OverpassSource) and osm.endpoint == "http://127.0.0.1:1/api/interpreter"
    assert osm.attribution == ATTRIBUTION
    args = parse_args(["--fake-model", "--region", "", "--osm", str(helsinki_pbf)])
    ctx = build_context(args, FakeBackend())
    assert isinstance(ctx.osm, PbfSource)
    with pytest.raises(ValueError, match="OSM file not found"):
        make_osm_source(parse_args(["--osm", str(tmp_path / "nope.osm.pbf")]))


def test_a_region_folder_with_an_extract(tmp_path: Path, helsinki_pbf: Path,
                                         helsinki_raster: Path) -> None:
    from app.region import Region

    folder = tmp_path / "kamppi"
    folder.mkdir()
    (folder / "scene_rgb.tif").symlink_to(helsinki_raster)
    (folder / "helsinki.osm.pbf").symlink_to(helsinki_pbf)
    region = Region.load(folder)
    assert region.osm is not None and len(region.osm) > 50
    assert "OpenStreetMap contributors" in region.attribution
    ctx = AppContext(backend=FakeBackend(), region=region, export_dir=tmp_path / "e")
    _, update = h.start_session(ctx)
    assert _osm_rows(update.semantics_html) > 50
    (folder / "helsinki.osm.pbf").unlink()
    (folder / "broken.osm.pbf").write_bytes(b"nope")
    with pytest.raises(ValueError, match="broken.osm.pbf"):
        Region.load(folder)


def test_an_uploads_features_reach_a_pretrained_models_prompt(
        demo_region, tmp_path: Path, helsinki_pbf: Path, helsinki_raster: Path) -> None:
    """The prompt context of a pretrained family (tiny Qwen2.5-VL) gets the features the panel
    shows for an upload outside the region, from the area fetched at upload (no second read)."""
    import functools

    from app.backend import EngineBackend
    from app.osm_panel import AreaStore, prompt_lines
    from rsvlm.backends.tiny import write_tiny_checkpoint
    from rsvlm.loading import load

    store = AreaStore()
    loaded = load(str(write_tiny_checkpoint("qwen2_5_vl", tmp_path / "tiny")), device="cpu")
    backend = EngineBackend(loaded, osm=functools.partial(prompt_lines, demo_region, store))
    source = PbfSource(helsinki_pbf)
    ctx = AppContext(backend=backend, region=demo_region, export_dir=tmp_path / "e", osm=source,
                     osm_areas=store)
    state, _ = h.start_session(ctx)
    h.upload(ctx, state, str(helsinki_raster))
    reads = []
    source.features = lambda bounds: reads.append(bounds)  # a second read would show here
    updates = list(h.ask(ctx, state, "Describe this image."))
    prompt = updates[-1].prompt
    assert "OSM highway=" in prompt or "OSM building=" in prompt, prompt
    assert not reads
    # On the region, the region's own features are the context.
    state2, _ = h.start_session(ctx)
    assert "OSM building=yes" in list(h.ask(ctx, state2, "Describe this image."))[-1].prompt
