"""The app's handlers, called as plain functions with the fake backend (no browser, no model)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
from PIL import Image

from app import handlers as h
from app.backend import FAKE_BOXES, Answer, FakeBackend, LoadingBackend
from app.handlers import AppContext
from app.html_safe import markdown_text
from app.map_html import MapSpec, map_iframe, render_map
from app.region import features_geojson

XSS = "<img src=x onerror=alert(1)>"
DRAWN = (32.5942, 0.3505, 32.5952, 0.3512)  # W, S, E, N inside the Kampala imagery


def drawn_geojson(w: float, s: float, e: float, n: float) -> str:
    """What Leaflet.draw posts for a rectangle (via the bridge)."""
    ring = [[w, s], [w, n], [e, n], [e, s], [w, s]]
    return json.dumps({"geojson": {"type": "Feature", "properties": {},
                                   "geometry": {"type": "Polygon", "coordinates": [ring]}},
                       "t": 1})


def last(updates: Iterator[h.UIUpdate]) -> h.UIUpdate:
    out = list(updates)
    assert out, "a handler generator must yield at least once"
    return out[-1]


def test_draw_bbox_becomes_chip(ctx: AppContext) -> None:
    state, first = h.start_session(ctx)
    assert state.chip is not None and 'id="rsvlm-map-frame"' in first.map_html
    update = h.on_draw(ctx, state, drawn_geojson(*DRAWN))
    assert update.notice is None
    w, s, e, n = state.chip.bounds_lonlat
    px = (DRAWN[2] - DRAWN[0]) / state.chip.width  # one chip pixel, in degrees
    assert np.allclose((w, s, e, n), DRAWN, atol=px)
    assert max(state.chip.width, state.chip.height) == ctx.chip_size
    # The map shows the new chip as the question area.
    assert "rsvlm-chip" in update.map_html


def test_ask_grounds_boxes_at_their_lonlat_inside_the_drawn_box(ctx: AppContext) -> None:
    state, _ = h.start_session(ctx)
    h.on_draw(ctx, state, drawn_geojson(*DRAWN))
    updates = list(h.ask(ctx, state, "Find all buildings"))
    assert len(updates) >= 2  # streamed: the question first, the grounded answer last
    final = updates[-1]
    assert len(state.detections) == len(FAKE_BOXES)
    w, s, e, n = state.chip.bounds_lonlat
    tol = 2 * (e - w) / state.chip.width
    for det, (x1, y1, x2, y2) in zip(state.detections, FAKE_BOXES, strict=True):
        assert det.label == "building"
        bw, bs, be, bn = det.geometry.bounds
        # 0-1000 chip coordinates -> lon/lat; rows grow southwards.
        expected = (w + x1 / 1000 * (e - w), n - y2 / 1000 * (n - s),
                    w + x2 / 1000 * (e - w), n - y1 / 1000 * (n - s))
        assert np.allclose((bw, bs, be, bn), expected, atol=tol), (det.geometry.bounds, expected)
        assert DRAWN[0] - tol <= bw < be <= DRAWN[2] + tol
        assert DRAWN[1] - tol <= bs < bn <= DRAWN[3] + tol
    assert final.detections_html.count("<tr>") == 1 + len(FAKE_BOXES)
    assert final.map_html.count("rsvlm-det") >= 1
    assert final.chip_image is not None and len(final.chip_image[1]) == len(FAKE_BOXES)
    assert "USER: Find all buildings" in final.prompt
    assert "Dense residential" in final.semantics_html


def test_export_geojson_is_rfc7946_and_rereads(ctx: AppContext, tmp_path: Path) -> None:
    state, _ = h.start_session(ctx)
    path, message = h.export(ctx, state)
    assert path is None and "Nothing to export" in message
    h.on_draw(ctx, state, drawn_geojson(*DRAWN))
    last(h.ask(ctx, state, "Find all cars"))
    path, message = h.export(ctx, state, "geojson")
    assert path is not None and path.exists(), message
    doc = json.loads(path.read_text())
    assert doc["type"] == "FeatureCollection" and "crs" not in doc  # RFC 7946: lon/lat only
    frame = gpd.read_file(path)
    assert frame.crs.to_epsg() == 4326
    assert list(frame["label"]) == ["car"] * len(FAKE_BOXES)
    assert frame.total_bounds[0] >= DRAWN[0] - 1e-5 and frame.total_bounds[2] <= DRAWN[2] + 1e-5
    for ring in (f["geometry"]["coordinates"][0] for f in doc["features"]):
        area2 = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:], strict=False))
        assert area2 > 0  # exterior rings counter-clockwise
    gpkg, _ = h.export(ctx, state, "gpkg")
    assert gpkg is not None and len(gpd.read_file(gpkg)) == len(FAKE_BOXES)
    assert not path.exists()  # one export file per session: disk use stays flat


def test_bad_uploads_give_a_message_and_keep_the_session(ctx: AppContext, tmp_path: Path) -> None:
    state, _ = h.start_session(ctx)
    chip_before = state.chip
    fake_tif = tmp_path / "notes.tif"
    fake_tif.write_text("this is not a raster")
    update = h.upload(ctx, state, str(fake_tif))
    assert update.notice and "notes.tif" in update.notice
    assert state.chip is chip_before
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert "empty.png" in (h.upload(ctx, state, str(empty)).notice or "")
    small = AppContext(backend=FakeBackend(), region=ctx.region, export_dir=tmp_path / "e",
                       max_upload_mb=0.001)
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8)).save(big)
    assert "limit is 0.001 MB" in (h.upload(small, state, str(big)).notice or "")
    assert state.chip is chip_before
    # ...and the session goes on.
    assert last(h.ask(ctx, state, "Describe this image.")).notice is None


def test_plain_picture_is_answered_in_pixel_space(ctx: AppContext, tmp_path: Path) -> None:
    state, _ = h.start_session(ctx)
    png = tmp_path / "photo.png"
    Image.fromarray(np.full((300, 400, 3), 120, np.uint8)).save(png)
    update = h.upload(ctx, state, str(png))
    assert update.notice and "pixel space" in update.notice
    assert state.chip is not None and not state.chip.georeferenced
    final = last(h.ask(ctx, state, "Find all trees"))
    assert len(final.chip_image[1]) == len(FAKE_BOXES) and not state.detections
    (x1, y1, x2, y2), label = final.chip_image[1][0]
    assert label == "#1 tree" and x1 == round(FAKE_BOXES[0][0] * state.chip.width / 1000)
    assert "Found 3 trees (numbered 1–3 on the chip)" in final.chat[-1]["content"].replace("\\", "")
    text, geojson = h.api_ask(ctx, str(png), "", "Find all trees")
    features = json.loads(geojson)["features"]
    assert len(features) == len(FAKE_BOXES) and all(f["geometry"] is None for f in features)
    # box_px is in pixels of the uploaded 400x300 picture, whatever the chip size.
    x1, y1, x2, y2 = features[0]["properties"]["box_px"]
    fx1, fy1, fx2, fy2 = FAKE_BOXES[0]
    assert np.allclose((x1, y1, x2, y2), (fx1 * 0.4, fy1 * 0.3, fx2 * 0.4, fy2 * 0.3), atol=1)


def test_api_ask_with_bbox(ctx: AppContext) -> None:
    text, geojson = h.api_ask(ctx, None, ",".join(map(str, DRAWN)), "Count the buildings")
    frame = gpd.GeoDataFrame.from_features(json.loads(geojson)["features"], crs="EPSG:4326")
    assert "building" in text and len(frame) == len(FAKE_BOXES)
    w, s, e, n = frame.total_bounds
    assert DRAWN[0] <= w and e <= DRAWN[2] + 1e-5 and DRAWN[1] - 1e-5 <= s and n <= DRAWN[3]
    for bad in ("1,2,3", "32.6,0.35,32.5,0.36", "a,b,c,d"):
        with pytest.raises(h.UserError):
            h.api_ask(ctx, None, bad, "Describe")
    with pytest.raises(h.UserError, match="does not overlap"):
        h.api_ask(ctx, None, "10,10,10.1,10.1", "Describe")
    with pytest.raises(h.UserError, match="empty"):
        h.api_ask(ctx, None, "", "  ")


def test_hostile_text_is_escaped_everywhere(xss_region, tmp_path: Path) -> None:
    ctx = AppContext(backend=FakeBackend(), region=xss_region, export_dir=tmp_path)
    state, update = h.start_session(ctx)
    # OSM table
    assert "&lt;img src=x onerror=alert(1)&gt;" in update.semantics_html
    assert "<img" not in update.semantics_html
    # Map: tags travel as JSON inside a script and become text nodes; nothing unescaped.
    page = render_map(MapSpec(osm=features_geojson(xss_region.osm)))
    assert "\\u003cimg src=x onerror=alert(1)\\u003e" in page and XSS not in page
    assert XSS not in map_iframe(page)
    # Chat: user text and model text (the fake echoes the question)
    final = last(h.ask(ctx, state, f"hello {XSS} [link](http://evil) ![i](http://x/y.png)"))
    for message in final.chat:
        assert "<img" not in message["content"] and "](" not in message["content"]
    assert markdown_text(XSS) in final.chat[-1]["content"]
    assert markdown_text(XSS).startswith("&lt;img src\\=x")
    # Detections table: a hostile label
    from shapely.geometry import box

    from tiles import Detection

    state.detections.append(Detection(label=XSS, geometry=box(32.594, 0.35, 32.5941, 0.3501)))
    assert "&lt;img" in h._detections_table(state) and "<img" not in h._detections_table(state)


def test_markdown_text_round_trip_is_literal() -> None:
    assert markdown_text("a*b*_c_ `d` <b>") == "a\\*b\\*\\_c\\_ \\`d\\` &lt;b&gt;"
    assert markdown_text("line1\nline2") == "line1\nline2"


class _Boom:
    """A backend whose first answer fails halfway: the user gets a message, the app goes on."""

    def __init__(self) -> None:
        self.calls = 0
        self.info = {"preset": "boom", "state": "ready"}

    def new_session(self, chip):
        outer = self

        class S:
            last: Answer | None = None

            def ask(self, question: str, region_box_px: Sequence[float] | None = None):
                outer.calls += 1
                yield "partial "
                if outer.calls == 1:
                    raise RuntimeError("CUDA out of memory")
                self.last = Answer(text="fine")
                yield "fine"

        return S()


def test_a_failing_request_shows_an_error_and_the_next_one_works(ctx: AppContext) -> None:
    boom = AppContext(backend=_Boom(), region=ctx.region, export_dir=ctx.export_dir)
    state, _ = h.start_session(boom)
    failed = last(h.ask(boom, state, "Describe"))
    assert failed.notice and "CUDA out of memory" in failed.notice
    assert state.session is None
    ok = last(h.ask(boom, state, "Describe"))
    assert ok.notice is None and ok.chat[-1]["content"].startswith("fine")


def test_loading_backend_reports_progress_then_serves(ctx: AppContext) -> None:
    gate = threading.Event()

    def factory(progress) -> FakeBackend:
        progress("converting weights")
        gate.wait(10)
        return FakeBackend()

    loading = LoadingBackend(factory, name="embedded")
    lctx = AppContext(backend=loading, region=ctx.region, export_dir=ctx.export_dir)
    assert "Loading model" in h.status_markdown(lctx) and not h.backend_ready(lctx)
    assert "converting weights" in h.status_markdown(lctx)
    assert loading.info["state"] == "loading"
    state, _ = h.start_session(lctx)
    # A question while the model loads waits for it, showing the loading progress...
    asking = h.ask(lctx, state, "Describe")
    first_two = [next(asking), next(asking)]
    assert "Waiting for the model to load" in str(first_two[-1].chat[-1]["content"])
    assert "converting weights" in str(first_two[-1].chat[-1]["content"])
    gate.set()
    final = last(asking)  # ...and is answered once it is there
    assert final.notice is None and "closely spaced" in str(final.chat[-1]["content"])
    assert h.backend_ready(lctx) and "fake" in h.status_markdown(lctx)
    assert loading.info["state"] == "ready"
    # The wait is bounded.
    gate2 = threading.Event()
    slow = LoadingBackend(lambda progress: (gate2.wait(10), FakeBackend())[1])
    sctx = AppContext(backend=slow, region=ctx.region, export_dir=ctx.export_dir,
                      ready_timeout_s=0.3)
    with pytest.raises(h.UserError, match="still loading"):
        h.api_ask(sctx, None, "", "Describe this image.")
    gate2.set()

    def broken(progress) -> FakeBackend:
        raise OSError("weights not found")

    failed = LoadingBackend(broken)
    failed.wait(10)
    fctx = AppContext(backend=failed, region=ctx.region, export_dir=ctx.export_dir)
    assert "failed to load" in h.status_markdown(fctx) and failed.info["state"] == "failed"
    with pytest.raises(h.UserError, match="failed to load: OSError: weights not found"):
        h.api_ask(fctx, None, "", "Describe this image.")


def test_state_stays_bounded(ctx: AppContext) -> None:
    small = AppContext(backend=FakeBackend(), region=ctx.region, export_dir=ctx.export_dir,
                       max_history=6, max_detections=7)
    state, _ = h.start_session(small)
    for _ in range(5):
        last(h.ask(small, state, "Find all buildings"))
    assert len(state.history) <= 6 and len(state.detections) == 7


def test_quick_actions_and_view(ctx: AppContext) -> None:
    assert h.quick_question("count", "cars") == "How many cars are in this image?"
    with pytest.raises(h.UserError):
        h.quick_question("dance")
    state, _ = h.start_session(ctx)
    # A zoomed-out view is clamped to the imagery; one outside it gets a message.
    update = h.use_view(ctx, state, json.dumps({"bbox": [32.59, 0.34, 32.60, 0.36], "zoom": 15}))
    assert update.notice is None
    assert np.allclose(state.chip.bounds_lonlat, ctx.region.bounds_lonlat, atol=1e-5)
    far = h.select_bbox(ctx, state, (10.0, 10.0, 10.1, 10.1))
    assert far.notice and "no local imagery" in far.notice
    assert "Tick" in (h.on_map_click(ctx, state, json.dumps({"lon": 10, "lat": 10, "zoom": 12}),
                                     allow_network=False).notice or "")
    assert h.on_draw(ctx, state, "{not json").notice


def test_click_outside_imagery_fetches_the_tile_chip(ctx: AppContext, tmp_path: Path) -> None:
    """With tiles allowed, a click where there is no local imagery makes that tile the chip.
    A local z/x/y folder stands in for the tile service (tests never touch the network)."""
    import mercantile

    lon, lat, z = 10.0005, 10.0005, 16
    tile = mercantile.tile(lon, lat, z)
    folder = tmp_path / "tiles" / str(z) / str(tile.x)
    folder.mkdir(parents=True)
    Image.fromarray(np.full((256, 256, 3), 200, np.uint8)).save(folder / f"{tile.y}.png")
    local = AppContext(backend=FakeBackend(), region=ctx.region, export_dir=ctx.export_dir,
                       tile_provider=str(tmp_path / "tiles" / "{z}" / "{x}" / "{y}.png"))
    state, _ = h.start_session(local)
    click = json.dumps({"lon": lon, "lat": lat, "zoom": z, "t": 1})
    update = h.on_map_click(local, state, click, allow_network=True)
    assert update.notice is None, update.notice
    b = mercantile.bounds(tile)
    assert np.allclose(state.chip.bounds_lonlat, (b.west, b.south, b.east, b.north), atol=1e-4)
    assert int(state.chip.pixels.mean()) == 200
    last(h.ask(local, state, "Find all buildings"))
    assert all(b.west <= d.geometry.centroid.x <= b.east for d in state.detections)


def test_status_line_says_who_decodes(ctx: AppContext) -> None:
    class Decoding(FakeBackend):
        @property
        def info(self) -> dict:
            return {"preset": "embedded", "device": "cpu", "precision": "float32",
                    "load_s": 9.0, "decode": "onnx", "state": "ready"}

    line = h.status_markdown(AppContext(backend=Decoding(), region=ctx.region,
                                        export_dir=ctx.export_dir))
    assert "precision float32 · decode onnx · loaded in 9.0 s" in line

    class Detecting(FakeBackend):
        @property
        def info(self) -> dict:
            return {"preset": "embedded", "device": "cpu", "precision": "float32",
                    "load_s": 9.0, "decode": "onnx", "detector_tower": "onnx-int8",
                    "state": "ready"}

    line = h.status_markdown(AppContext(backend=Detecting(), region=ctx.region,
                                        export_dir=ctx.export_dir))
    # (markdown-escaped: it renders as "onnx-int8")
    assert "decode onnx · detector tower onnx\\-int8 · loaded in 9.0 s" in line
