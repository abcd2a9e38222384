"""End to end in a real headless Chromium, network off: the app starts with the fake model still
loading (questions and API calls wait for it; `/info` says loading, then ready), a rectangle is
drawn on the leafmap map inside the iframe, boxes appear numbered on the map and in the table
with a readable answer, a GeoJSON export, hostile OSM/user text shows as text (no alert), and a
find question about the whole region scans it tile by tile with a progress bar until Stop."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
XSS = "<img src=x onerror=alert(1)>"
#: Released by the test: until then the model "loads".
GATE = threading.Event()
# The README's screenshot is refreshed only on request (RSVLM_SCREENSHOT=1); CI writes to tmp.
_README_SHOT = Path(__file__).resolve().parents[2] / "docs" / "screenshots" / "app.png"

pytestmark = pytest.mark.browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(xss_region_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    if not CHROMIUM.exists() and shutil.which("chromium") is None:
        pytest.skip("no Chromium at /usr/bin/chromium: run `make chromium` "
                    "(scripts/ensure_chromium.sh) to install the Debian package")
    pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    from app.backend import FakeBackend, LoadingBackend
    from app.handlers import AppContext
    from app.main import launch
    from app.region import Region

    def load(progress) -> FakeBackend:
        progress("converting weights")
        GATE.wait(120)
        return FakeBackend(delay_s=0.04)

    GATE.clear()
    ctx = AppContext(backend=LoadingBackend(load, name="fake"),
                     region=Region.load(xss_region_dir),
                     export_dir=tmp_path_factory.mktemp("exports"))
    port = _free_port()
    demo = launch(ctx, host="127.0.0.1", port=port, auth=None, concurrency=2, max_upload_mb=5,
                  prevent_thread_lock=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def _map_frame(page):
    return next(f for f in page.frames if f is not page.main_frame)


def _bot_text(page) -> str:
    return page.locator("#rsvlm-chat .message.bot, #rsvlm-chat [data-testid='bot']").last \
        .inner_text()


def _wait_readiness(page, app_url: str) -> None:
    """While the model loads: the status says so, `/info` says ``loading``, a question and an
    API call wait; once it is there both are answered and `/info` says ``ready``."""
    from gradio_client import Client

    page.locator("#rsvlm-status").get_by_text("Loading model").wait_for(timeout=15_000)
    client = Client(app_url, verbose=False)
    assert client.predict(api_name="/info")["state"] == "loading"
    job = client.submit(None, "", api_name="/describe")
    page.locator("#rsvlm-describe").click()
    page.locator("#rsvlm-chat").get_by_text("Waiting for the model to load").wait_for(
        timeout=15_000)
    assert "converting weights" in _bot_text(page)
    assert not job.done()
    GATE.set()
    page.locator("#rsvlm-chat").get_by_text("closely spaced").wait_for(timeout=20_000)
    answer, geojson = job.result(timeout=30)
    assert "closely spaced" in answer and json.loads(geojson)["type"] == "FeatureCollection"
    assert client.predict(api_name="/info")["state"] == "ready"
    page.locator("#rsvlm-status").get_by_text("fake").wait_for(timeout=10_000)


def _scan_whole_region_and_stop(page, fl) -> None:
    """The whole region (1536 x 1024 px, 12 tiles of 512) as the question area: "Find" scans it
    with a progress bar; Stop ends it after the current tile and keeps what was found."""
    mf = _map_frame(page)
    mf.evaluate("() => window.rsvlmMap.fitBounds(window.rsvlmMap.getBounds().pad(3))")
    page.wait_for_timeout(500)
    page.locator("#rsvlm-use-view").click()
    page.wait_for_timeout(1500)
    page.locator("#rsvlm-find").click()
    page.locator("#rsvlm-progress progress").wait_for(timeout=20_000)
    page.locator("#rsvlm-chat").get_by_text("tile by tile").wait_for(timeout=10_000)
    page.locator("#rsvlm-stop").click()
    page.locator("#rsvlm-chat").get_by_text("Stopped after").wait_for(timeout=20_000)
    said = _bot_text(page)
    m = re.search(r"Stopped after (\d+) tiles? of 12\. Found (\d+) buildings", said)
    assert m and int(m.group(1)) < 12, said
    page.locator("#rsvlm-progress progress").wait_for(state="detached", timeout=10_000)


def test_draw_ask_export_and_escaping(app_url: str, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    t0 = time.perf_counter()
    dialogs: list[str] = []
    outside: list[tuple[str, str]] = []  # requests that would have left this machine

    def offline(route) -> None:
        url = route.request.url
        if url.startswith((app_url, "data:", "about:", "blob:")):
            route.continue_()
        else:
            outside.append((url, route.request.frame.url))
            route.abort()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.route("**/*", offline)  # the network is off
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(app_url)
            _wait_readiness(page, app_url)
            frame_el = page.locator("#rsvlm-map-frame")
            frame_el.wait_for(timeout=30_000)
            fl = page.frame_locator("#rsvlm-map-frame")
            fl.locator(".leaflet-draw-draw-rectangle").wait_for(timeout=30_000)
            # The region is on the map, offline: an inline image overlay and the OSM layer.
            assert fl.locator("img.leaflet-image-layer").count() == 1
            assert fl.locator("path.rsvlm-osm").count() > 50

            # The whole region is the first chip; its OSM table shows the hostile tag as text.
            semantics = page.locator("#rsvlm-semantics")
            semantics.get_by_text(XSS).wait_for(timeout=10_000)
            assert page.locator("#rsvlm-semantics img").count() == 0

            # Draw a rectangle inside the iframe (smaller than 1.5 chips at native resolution,
            # so it is answered in one look): click the tool, drag.
            fl.locator(".leaflet-draw-draw-rectangle").click()
            box = frame_el.bounding_box()
            x0, y0 = box["x"] + box["width"] * 0.35, box["y"] + box["height"] * 0.35
            page.mouse.move(x0, y0)
            page.mouse.down()
            page.mouse.move(x0 + 60, y0 + 40, steps=5)
            page.mouse.move(x0 + 150, y0 + 110, steps=5)
            page.mouse.up()
            # The bridge put the GeoJSON into the hidden textbox; Python made it the chip.
            drawn = page.locator("#rsvlm-drawn textarea")
            page.wait_for_function(
                "() => document.querySelector('#rsvlm-drawn textarea').value.length > 10")
            ring = json.loads(drawn.input_value())["geojson"]["geometry"]["coordinates"][0]
            w, s = min(p[0] for p in ring), min(p[1] for p in ring)
            e, n = max(p[0] for p in ring), max(p[1] for p in ring)
            page.wait_for_timeout(300)
            fl.locator("path.rsvlm-chip").wait_for(timeout=15_000)

            # Ask for objects: boxes appear on the map layer and in the table.
            page.locator("#rsvlm-find").click()
            fl.locator("path.rsvlm-det").first.wait_for(timeout=20_000)
            assert fl.locator("path.rsvlm-det").count() == 3
            page.locator("#rsvlm-detections").get_by_text("3 detections").wait_for(timeout=10_000)
            # A readable answer whose numbers are the map's labels and the table's rows.
            said = _bot_text(page)
            assert "Found 3 buildings (numbered 1–3 on the map)." in said, said
            assert "<box>" not in said and "<ref>" not in said
            assert sorted(fl.locator(".rsvlm-num").all_inner_texts()) == ["1", "2", "3"]
            rows = page.locator("#rsvlm-detections tbody tr")
            assert [rows.nth(i).locator("td").first.inner_text() for i in range(3)] == \
                ["1", "2", "3"]
            assert rows.first.locator("td").nth(2).inner_text() == "0.92"  # its score
            # The raw output is in the prompt panel.
            page.get_by_text("Exact prompt and raw answer").click()
            page.locator("#rsvlm-prompt").get_by_text("raw answer of the model").wait_for(
                timeout=10_000)
            assert "<ref>building</ref><box>[100,120,300,330]</box>" in \
                page.locator("#rsvlm-prompt").inner_text()

            shot = _README_SHOT if os.environ.get("RSVLM_SCREENSHOT") == "1" else tmp_path / "app.png"
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000

            # Export: a GeoJSON file in EPSG:4326 with the boxes inside the drawn rectangle.
            page.locator("#rsvlm-export-geojson").click()
            link = page.locator("#rsvlm-export-file a").first
            link.wait_for(timeout=15_000)
            with page.expect_download(timeout=15_000) as dl:
                link.click()
            path = tmp_path / "export.geojson"
            dl.value.save_as(path)
            # The export is served to this browser only: another client gets a 404 (app.serving).
            import urllib.error
            import urllib.request

            href = link.get_attribute("href") or ""
            url = href if href.startswith("http") else app_url.rstrip("/") + href
            with pytest.raises(urllib.error.HTTPError) as other:
                urllib.request.urlopen(url, timeout=10)
            assert other.value.code == 404
            import geopandas as gpd

            frame = gpd.read_file(path)
            assert frame.crs.to_epsg() == 4326 and len(frame) == 3
            fw, fs, fe, fn = frame.total_bounds
            pad = 0.1 * (e - w)
            assert w - pad <= fw < fe <= e + pad and s - pad <= fs < fn <= n + pad

            # Hostile text in the chat (the fake model echoes it back) shows as text.
            page.locator("#rsvlm-question textarea").fill(f"what is {XSS}?")
            page.locator("#rsvlm-send").click()
            page.locator("#rsvlm-chat").get_by_text(f"You asked: what is {XSS}?").wait_for(
                timeout=15_000)
            assert page.locator("#rsvlm-chat img[src='x']").count() == 0

            # ...and in the map popup of the tagged OSM feature.
            mf = _map_frame(page)
            opened = mf.evaluate("""() => {
                let done = false;
                window.rsvlmMap.eachLayer(l => {
                  if (!done && l.feature && l.feature.properties &&
                      l.feature.properties.name && l.getPopup) {
                    l.openPopup(); done = true; }
                });
                return done; }""")
            assert opened
            popup = fl.locator(".rsvlm-popup").first
            popup.wait_for(timeout=5_000)
            assert XSS in popup.inner_text()
            assert fl.locator(".rsvlm-popup img").count() == 0
            page.wait_for_timeout(500)
            assert dialogs == []
            _scan_whole_region_and_stop(page, fl)
            # Nothing the map needs came from the network (Gradio's own page may try fonts).
            assert [u for u, frame in outside if frame.startswith("about:")] == [], outside
        finally:
            browser.close()
    assert time.perf_counter() - t0 < 120
