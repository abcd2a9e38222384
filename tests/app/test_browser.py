"""End to end in a real headless Chromium: the app with the fake backend, a rectangle drawn on the
Leaflet map inside the iframe, boxes on the map and in the table, a GeoJSON export, and hostile
OSM/user text that must show as text (no alert)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
XSS = "<img src=x onerror=alert(1)>"
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
    from app.backend import FakeBackend
    from app.handlers import AppContext
    from app.main import launch
    from app.region import Region

    ctx = AppContext(backend=FakeBackend(delay_s=0.01), region=Region.load(xss_region_dir),
                     export_dir=tmp_path_factory.mktemp("exports"))
    port = _free_port()
    demo = launch(ctx, host="127.0.0.1", port=port, auth=None, concurrency=2, max_upload_mb=5,
                  prevent_thread_lock=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def _map_frame(page):
    return next(f for f in page.frames if f is not page.main_frame)


def test_draw_ask_export_and_escaping(app_url: str, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    t0 = time.perf_counter()
    dialogs: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(app_url)
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

            # Draw a rectangle inside the iframe: click the tool, drag.
            fl.locator(".leaflet-draw-draw-rectangle").click()
            box = frame_el.bounding_box()
            x0, y0 = box["x"] + box["width"] * 0.35, box["y"] + box["height"] * 0.35
            page.mouse.move(x0, y0)
            page.mouse.down()
            page.mouse.move(x0 + 100, y0 + 70, steps=5)
            page.mouse.move(x0 + 220, y0 + 160, steps=5)
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
            assert page.locator("#rsvlm-chat").get_by_text("I found 3 building").count() >= 1

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
        finally:
            browser.close()
    assert time.perf_counter() - t0 < 90
