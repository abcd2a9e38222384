"""rsvlm.notebook: the analyst's Jupyter API, with a stand-in engine (fast) and, end to end,
docs/notebook.ipynb executed with nbclient on the embedded model (offline)."""

from __future__ import annotations

import html
import sys
from pathlib import Path

import numpy as np
import pytest

from rsvlm import notebook as nb

ROOT = Path(__file__).resolve().parents[2]
KAMPALA = ROOT / "assets" / "demo" / "kampala" / "oam_rgb_epsg3857.tif"
AREA = (32.5937, 0.3502, 32.5947, 0.3512)
XSS = "<img src=x onerror=alert(1)>"


class StubSession:
    """Answers like `rsvlm.engine.ChatSession`: streamed text, then ``last`` with boxes whose
    geometry comes from the chip (as the engine grounds them)."""

    def __init__(self, chip, boxes):
        self.chip, self.boxes, self.last = chip, boxes, None

    def ask(self, question, region_box_px=None):
        from rsvlm.answer import Answer, ground
        from rsvlm.boxes import format_box

        self.region_box_px = region_box_px
        yield "stub "
        w, h = self.chip.width, self.chip.height
        text = "".join(format_box("object", (x1 * 1000 / w, y1 * 1000 / h, x2 * 1000 / w,
                                             y2 * 1000 / h))
                       for _, (x1, y1, x2, y2), _ in self.boxes)
        boxes = ground(text, self.chip)
        for box, (label, _, score) in zip(boxes, self.boxes, strict=True):
            box.label = label  # any text a model may write, markup included
            box.score = score  # a box head's confidence, where the model has one
        self.last = Answer(text=text or "stub answer", boxes=boxes,
                           retrieved=[{"text": "dense residential", "score": 0.7}])


class StubEngine:
    info = {"preset": "stub"}

    def __init__(self, boxes):
        self.boxes = boxes

    def session(self, chip):
        return StubSession(chip, self.boxes)


BOXES = [("building", (10.0, 20.0, 110.0, 140.0), 0.9), ("building", (200, 220, 260, 300), None),
         (XSS, (300, 300, 400, 400), 0.4)]


def test_ask_gives_a_geodataframe_in_lonlat() -> None:
    ai = nb.Assistant(StubEngine(BOXES))
    result = ai.ask(KAMPALA, "Find all buildings.", bbox=AREA)
    det = result.detections
    assert det.crs.to_epsg() == 4326
    assert list(det.columns) == ["label", "score", "question", "source", "geometry"]
    assert list(det["label"]) == ["building", "building", XSS]
    assert det["score"].tolist()[0] == 0.9 and np.isnan(det["score"].tolist()[1])
    assert (det["question"] == "Find all buildings.").all()
    w, s, e, n = det.total_bounds
    assert AREA[0] <= w < e <= AREA[2] and AREA[1] <= s < n <= AREA[3]
    assert result.summary == f"Found 2 buildings, 1 {XSS}."
    assert result.retrieved == [("dense residential", 0.7)]
    assert "3 detection(s) on the map" in result._repr_markdown_()
    assert XSS not in result._repr_markdown_()
    assert "detections=3" in repr(result) and len(repr(result)) < 300


def test_a_region_inside_the_area_reaches_the_model_in_chip_pixels() -> None:
    engine = StubEngine([])
    sessions = []
    engine.session = lambda chip: sessions.append(StubSession(chip, [])) or sessions[-1]
    w, s, e, n = AREA
    half = (w, (s + n) / 2, (w + e) / 2, n)  # the top-left quarter
    nb.Assistant(engine).ask(KAMPALA, "What is here?", bbox=AREA, region=half)
    x1, y1, x2, y2 = sessions[0].region_box_px
    assert x1 == pytest.approx(0, abs=1) and y1 == pytest.approx(0, abs=1)
    assert x2 == pytest.approx(256, abs=2) and y2 == pytest.approx(256, abs=2)


def test_show_is_a_leafmap_map_with_escaped_labels() -> None:
    import leafmap.foliumap

    result = nb.Assistant(StubEngine(BOXES)).ask(KAMPALA, "Find all buildings.", bbox=AREA)
    m = result.show()
    assert isinstance(m, leafmap.foliumap.Map)
    page = m.get_root().render()
    assert "data:image/png;base64," in page  # the imagery of the area
    # folium's tooltips set innerHTML from the properties: the label arrives as text.
    data = page.replace("\\u0026", "&").replace("\\u003c", "<").replace("\\u003e", ">")
    assert html.escape(XSS) in data and XSS not in data
    import re

    assert not re.findall(r'<(?:script|link)[^>]*(?:src|href)="https?://', page)  # offline
    assert len(re.findall(r'<script src="data:text/javascript;base64,', page)) >= 3
    again = nb.show(result.detections, m=m, layer_name="again")
    assert again is m
    online = nb.show(result, offline=False).get_root().render()
    assert 'src="https://cdn.jsdelivr.net/npm/leaflet@' in online


def test_folium_fallback_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    import folium

    monkeypatch.setitem(sys.modules, "leafmap.foliumap", None)  # import fails
    monkeypatch.setattr(nb, "_warned_folium", False)
    with pytest.warns(UserWarning, match="leafmap is not installed"):
        m = nb.new_map((32.59, 0.35, 32.6, 0.36))
    assert type(m) is folium.Map


def test_pixel_space_image_and_bad_input(tmp_path: Path) -> None:
    from PIL import Image

    from tiles import ImageryError

    png = tmp_path / "photo.png"
    Image.fromarray(np.full((300, 400, 3), 120, np.uint8)).save(png)
    result = nb.Assistant(StubEngine(BOXES)).ask(png, "Find all buildings.")
    assert len(result.detections) == 0 and len(result.boxes_px) == 3
    assert "no georeference" in result.note
    with pytest.raises(ValueError, match="empty"):
        nb.Assistant(StubEngine(BOXES)).ask(png, "  ")
    with pytest.raises(ImageryError):
        nb.open_area(tmp_path / "missing.tif")


def test_the_docs_notebook_runs_offline_on_the_embedded_model() -> None:
    """docs/notebook.ipynb, executed as an analyst would (a kernel, cell by cell)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    book = nbformat.read(ROOT / "docs" / "notebook.ipynb", as_version=4)
    client = nbclient.NotebookClient(book, timeout=240, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT / "docs")}})
    client.execute()  # raises CellExecutionError on any failing cell
    outputs = [o for c in book.cells if c.cell_type == "code" for o in c.outputs]
    texts = [o.get("data", {}) for o in outputs if o.output_type == "execute_result"]
    assert any("embedded on cpu" in d.get("text/plain", "") for d in texts)
    answer = next(d["text/markdown"] for d in texts if "text/markdown" in d)
    assert "Find all buildings" in answer and "Found" in answer and "on the map" in answer
    assert any("label" in d.get("text/plain", "") and "geometry" in d.get("text/plain", "")
               for d in texts)
    maps = [d["text/html"] for d in texts if "leaflet" in d.get("text/html", "").lower()]
    assert maps, "result.show() displayed no map"


@pytest.mark.browser
def test_the_notebook_map_draws_with_the_network_off(tmp_path: Path) -> None:
    """In headless Chromium with every http(s) request refused: Leaflet runs, the imagery and
    the three boxes are drawn."""
    import re
    import shutil

    if not Path("/usr/bin/chromium").exists() and shutil.which("chromium") is None:
        pytest.skip("no Chromium at /usr/bin/chromium: run `make chromium`")
    sync_api = pytest.importorskip("playwright.sync_api")
    result = nb.Assistant(StubEngine(BOXES)).ask(KAMPALA, "Find all buildings.", bbox=AREA)
    page_file = tmp_path / "map.html"
    page_file.write_text(result.show().get_root().render())
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium")
                                    or "/usr/bin/chromium", args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.route(re.compile(r"^https?://"), lambda route: route.abort())
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_file.as_uri())
            page.wait_for_function("document.querySelectorAll('path.leaflet-interactive')"
                                   ".length === 3", timeout=10000)
            assert page.evaluate("typeof L") == "object"
            assert page.evaluate("document.querySelectorAll('img.leaflet-image-layer').length") == 1
            assert not errors, errors
        finally:
            browser.close()
