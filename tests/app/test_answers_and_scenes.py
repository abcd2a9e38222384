"""Readable answers, numbered boxes with scores, whole-area scans with progress and Stop, the
offline leafmap page and distinct semantics (handlers called as plain functions)."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest

from app import handlers as h
from app.answers import count_phrase, readable_answer, streaming_text
from app.backend import FAKE_BOXES, FAKE_SCORES, FakeBackend
from app.handlers import AppContext
from app.map_html import MapSpec, inline_assets, render_map

DRAWN = (32.5942, 0.3505, 32.5952, 0.3512)  # inside the Kampala imagery, smaller than 1.5 chips
BOX = "<ref>building</ref><box>[{0},{0},{1},{1}]</box>"


def _drawn(w: float, s: float, e: float, n: float) -> str:
    ring = [[w, s], [w, n], [e, n], [e, s], [w, s]]
    return json.dumps({"geojson": {"type": "Feature", "properties": {},
                                   "geometry": {"type": "Polygon", "coordinates": [ring]}}})


def _plain(markdown: str) -> str:
    return markdown.replace("\\", "")


# --- the answer text ------------------------------------------------------------------------------

def test_readable_answers_replace_the_box_grammar() -> None:
    eight = "".join(BOX.format(10 * i, 10 * i + 5) for i in range(8))
    assert readable_answer(eight, ["building"] * 8, list(range(1, 9))) == \
        "Found 8 buildings (numbered 1–8 on the map)."
    fake = f"I found 3 building(s): {BOX.format(1, 9)} {BOX.format(20, 29)} {BOX.format(40, 49)}"
    assert readable_answer(fake, ["building"] * 3, [4, 5, 6]) == \
        "Found 3 buildings (numbered 4–6 on the map)."
    one = f"The largest building is {BOX.format(100, 300)}."
    assert readable_answer(one, ["building"], [7]) == \
        "The largest building is #7 (numbered on the map)."
    # The LM's own count is not repeated next to a different number of boxes.
    wrong = f"There are 2 buildings: {BOX.format(1, 9)}{BOX.format(20, 29)}{BOX.format(40, 49)}"
    assert readable_answer(wrong, ["building"] * 3, [1, 2, 3]) == \
        "Found 3 buildings (numbered 1–3 on the map)."
    assert readable_answer("A dense residential area.", [], []) == "A dense residential area."
    assert count_phrase(["building", "pool", "building", "bus"]) == \
        "2 buildings, 1 pool and 1 bus"
    # No markup leaks while streaming; the boxes that arrived are counted.
    partial = f"I found: {BOX.format(1, 9)} <ref>buil"
    assert "<" not in streaming_text(partial) and "1 box so far" in streaming_text(partial)


def test_find_answer_reads_as_text_numbers_match_map_chip_table(ctx: AppContext) -> None:
    state, _ = h.start_session(ctx)
    h.on_draw(ctx, state, _drawn(*DRAWN))
    updates = list(h.ask(ctx, state, "Find all buildings"))
    final = updates[-1]
    said = _plain(final.chat[-1]["content"])
    assert said.startswith("Found 3 buildings (numbered 1–3 on the map).")
    assert "<ref>" not in said and "<box>" not in said
    # Streaming still showed progress, never markup.
    streamed = [_plain(u.chat[-1]["content"]) for u in updates[1:-1] if u.chat]
    assert streamed and not any("<box>" in t for t in streamed)
    # The raw output is in the prompt panel.
    assert "<ref>building</ref><box>[100,120,300,330]</box>" in final.prompt
    # Chip labels, table rows and map features carry the same numbers and the scores.
    assert [label for _, label in final.chip_image[1]] == ["#1 building", "#2 building",
                                                           "#3 building"]
    rows = re.findall(r"<tr><td>(\d+)</td><td>building</td><td>([\d.]+)</td>",
                      final.detections_html)
    assert rows == [(str(i), f"{s:.2f}") for i, s in enumerate(FAKE_SCORES, start=1)]
    assert [d.score for d in state.detections] == list(FAKE_SCORES)
    # A second answer continues the numbering.
    again = _plain(list(h.ask(ctx, state, "Find all buildings"))[-1].chat[-1]["content"])
    assert again.startswith("Found 3 buildings (numbered 4–6 on the map).")


def test_scores_reach_exports_and_the_min_score_filter(ctx: AppContext, tmp_path: Path) -> None:
    import geopandas as gpd

    state, _ = h.start_session(ctx)
    h.on_draw(ctx, state, _drawn(*DRAWN))
    list(h.ask(ctx, state, "Find all buildings"))
    path, _ = h.export(ctx, state, "gpkg")
    frame = gpd.read_file(path)
    assert sorted(frame["score"].round(2)) == sorted(FAKE_SCORES)
    update = h.set_min_score(ctx, state, 0.5)
    assert update.detections_html.count("<tr>") == 1 + 2  # header + the two above 0.5
    assert "2 shown with score ≥ 0.50" in update.detections_html
    assert '"minScore":0.5' in update.map_html.replace("&quot;", '"')
    geojson = json.loads(h.api_ask(ctx, None, ",".join(map(str, DRAWN)), "Find all cars")[1])
    assert [f["properties"]["score"] for f in geojson["features"]] == list(FAKE_SCORES)
    assert [f["properties"]["n"] for f in geojson["features"]] == [1, 2, 3]
    assert "<box>" in geojson["raw_answer"] and geojson["answer"].startswith("Found 3 cars")


def test_engine_answer_boxes_carry_the_box_head_scores() -> None:
    from rsvlm.answer import AnswerBox
    from rsvlm.engine import ChatSession

    class Chip:
        width = height = 100
        georeferenced = False

    session = ChatSession.__new__(ChatSession)
    session.chip, session.image = Chip(), None
    text = BOX.format(10, 20) + BOX.format(50, 90)
    boxes = session.ground(text, [0.9, 0.4])
    assert [b.score for b in boxes] == [0.9, 0.4]
    assert [b.score for b in session.ground(text)] == [None, None]
    assert AnswerBox("x", (0, 0, 1, 1), score=0.25).to_dict()["score"] == 0.25


# --- whole scenes ---------------------------------------------------------------------------------

def test_find_on_the_whole_region_scans_tiles_and_merges(ctx: AppContext) -> None:
    state, _ = h.start_session(ctx)  # the whole 1536 x 1024 px region is the first chip
    updates = list(h.ask(ctx, state, "Find all buildings"))
    final = updates[-1]
    said = _plain(final.chat[-1]["content"])
    m = re.match(r"Found (\d+) buildings \(numbered 1–(\d+) on the map\), reading the whole area "
                 r"in (\d+) tiles\.", said)
    assert m, said
    n_found, n_tiles = int(m.group(1)), int(m.group(3))
    assert n_tiles == 12  # 4 x 3 tiles of 512 px with 1/8 overlap over 1536 x 1024
    # The fake model's three boxes sit at the same place of every tile, so no two are one object
    # across a border (the merge itself is tested in tests/rsvlm/test_scan.py).
    assert n_found == len(state.detections) == 3 * n_tiles
    assert {d.score for d in state.detections} == set(FAKE_SCORES)  # the model's, carried
    assert any("<progress" in (u.progress_html or "") for u in updates)
    assert final.progress_html == ""
    assert "raw answer, tile 12" in final.prompt
    assert "exact prompt, tile 1 ---\n<image>" in final.prompt  # the fake model's prompt
    # What the 12 tiles retrieved, each description once, with how often.
    assert final.semantics_html.count("Dense residential area") == 1
    assert "(×12)" in final.semantics_html
    # Every detection lies inside the region.
    w, s, e, n = ctx.region.bounds_lonlat
    for det in state.detections:
        bw, bs, be, bn = det.geometry.bounds
        assert w - 1e-6 <= bw and be <= e + 1e-6 and s - 1e-6 <= bs and bn <= n + 1e-6
    # A question about the scene itself is one look, not a scan.
    described = _plain(list(h.ask(ctx, state, "Describe this image."))[-1].chat[-1]["content"])
    assert "tiles" not in described


def test_a_count_over_the_whole_region_counts_the_merged_detections(ctx: AppContext) -> None:
    # Each tile answering its own count would leave nothing to merge ("Found nothing to mark",
    # or the overlaps counted twice): the tiles are asked to find them, the merged boxes counted.
    state, _ = h.start_session(ctx)
    final = list(h.ask(ctx, state, "How many buildings are there?"))[-1]
    said = _plain(final.chat[-1]["content"])
    m = re.match(r"(\d+) buildings in this area \(numbered 1–(\d+) on the map\), reading the "
                 r"whole area in 12 tiles\.", said)
    assert m, said
    assert int(m.group(1)) == int(m.group(2)) == len(state.detections) == 36
    assert "Find all buildings in the image." in final.prompt  # what each tile was asked
    text, geojson = h.api_ask(ctx, None, "", "How many buildings are in this image?")
    assert text == "36 buildings in this area (numbered 1–36), reading the whole area in 12 tiles."
    assert len(json.loads(geojson)["features"]) == 36
    # A part of the area named: only that part is read, each tile asked about all of itself;
    # 768 x 512 px, 2 tiles of 512 px with 1/8 overlap.
    state, _ = h.start_session(ctx)
    final = list(h.ask(ctx, state, "How many buildings are in the top left?"))[-1]
    m = re.match(r"(\d+) buildings in the top-left quarter of this area \(numbered 1–(\d+) on the "
                 r"map\), reading that part of the area in 2 tiles\.",
                 said := _plain(final.chat[-1]["content"]))
    assert m and int(m.group(1)) == len(state.detections) == 6, said
    assert "Find all buildings in the image." in final.prompt
    # The API says the same of it.
    text, _ = h.api_ask(ctx, None, "", "How many buildings are in the top left?")
    assert text == ("6 buildings in the top-left quarter of this area (numbered 1–6), reading "
                    "that part of the area in 2 tiles.")
    # A size asked about too: each tile finds those, and the answer says which.
    sized = _plain(list(h.ask(ctx, state, "How many buildings larger than 5 m² are in the top "
                                          "left?"))[-1].chat[-1]["content"])
    assert re.match(r"\d+ buildings of more than 5 m² in the top-left quarter of this area ",
                    sized), sized
    w, s, e, n = ctx.region.bounds_lonlat
    for det in state.detections:  # all in the top-left quarter
        bw, bs, be, bn = det.geometry.bounds
        assert bw >= w - 1e-6 and be <= (w + e) / 2 + 1e-6 and bs >= (s + n) / 2 - 1e-6


def test_stop_ends_a_scan_after_the_current_tile(ctx: AppContext) -> None:
    slow = AppContext(backend=FakeBackend(delay_s=0.02), region=ctx.region,
                      export_dir=ctx.export_dir)
    state, _ = h.start_session(slow)
    run = h.ask(slow, state, "Find all buildings")
    updates = []
    for update in run:
        updates.append(update)
        read = re.search(r'value="(\d+)"', update.progress_html or "")
        if read and int(read.group(1)) >= 2:
            h.stop(state)
    said = _plain(updates[-1].chat[-1]["content"])
    assert re.match(r"Stopped after \d+ tiles of 12\. Found \d+ buildings", said), said
    assert int(re.search(r"after (\d+) tiles", said).group(1)) < 12


def test_api_scan_reports_progress_and_cancels(ctx: AppContext) -> None:
    heard: list[tuple[str, int | None, int | None]] = []
    text, geojson = h.api_ask(ctx, None, "", "Count the buildings",
                              say=lambda m, n, t: heard.append((m, n, t)))
    fc = json.loads(geojson)
    assert fc["tiles_read"] == fc["tiles_total"] == 12 and not fc["cancelled"]
    assert text.endswith("reading the whole area in 12 tiles.")
    assert heard[-1] == ("12 of 12 tiles read", 12, 12)
    assert all(f["properties"]["score"] is not None for f in fc["features"])
    cancel = threading.Event()

    def say(message: str, n: int | None, total: int | None) -> None:
        if n == 3:
            cancel.set()

    text, geojson = h.api_ask(ctx, None, "", "find all buildings", say=say, cancel=cancel)
    fc = json.loads(geojson)
    assert fc["cancelled"] and fc["tiles_read"] == 3 and text.startswith("Stopped after 3 tiles")


def test_scan_works_with_any_backend(ctx: AppContext) -> None:
    """The scan talks to the `Backend` seam only: a backend without scores or retrieval."""
    from app.backend import Answer

    class Minimal:
        info = {"preset": "minimal", "state": "ready"}

        def new_session(self, chip):
            class S:
                last = None

                def ask(self, question, region_box_px=None):
                    self.last = Answer(text=BOX.format(400, 600))
                    yield self.last.text

            return S()

    mctx = AppContext(backend=Minimal(), region=ctx.region, export_dir=ctx.export_dir)
    text, geojson = h.api_ask(mctx, None, "", "find all buildings")
    fc = json.loads(geojson)
    assert fc["tiles_read"] == 12 and len(fc["features"]) >= 1
    assert {f["properties"]["score"] for f in fc["features"]} <= {1.0, 0.5}  # the scan's own


# --- map and semantics ----------------------------------------------------------------------------

def test_map_page_references_no_network_script_or_stylesheet() -> None:
    for online in (False, True):
        page = render_map(MapSpec(online=online))
        external = re.findall(r"<script[^>]+src=|<link[^>]+stylesheet[^>]*>", page)
        assert external == [], external
        # Nothing the browser would fetch by itself (an attribution <a href> is not fetched).
        assert not re.search(r"""src\s*=\s*["']?https?://|url\(\s*["']?https?://|@import""",
                             page)
        assert "L.Control.Draw" in page and page.count("L.control.fullscreen(") == 1
        assert '"fullscreenControl": true' not in page  # no second button from the map option
    # Online, leafmap's catalogue supplies the basemaps (tiles are fetched by Leaflet, not
    # linked as scripts); offline there are none.
    assert "World_Imagery" in render_map(MapSpec(online=True))
    assert "World_Imagery" not in render_map(MapSpec(online=False))
    with pytest.raises(Exception, match="No offline copy"):
        inline_assets('<script src="https://example.org/leaflet.js"></script>')
    assert inline_assets('<script src="https://cdn.example/jquery.min.js"></script>') == ""


def test_semantics_never_repeat_a_description(ctx: AppContext) -> None:
    from app.backend import Answer

    state, _ = h.start_session(ctx)
    same = "The scene is a dense residential, seen from above."
    state.last_answer = Answer(text="", retrieved=[
        {"text": same, "score": 0.61}, {"text": same, "score": 0.74},
        {"text": " The scene is a dense residential,  seen from above.", "score": 0.52},
        {"text": "Unpaved roads.", "score": 0.4}])
    html = h._semantics(ctx, state)
    assert html.count("dense residential, seen from above") == 1
    assert "0.740 (×3)" in html and "0.400" in html


def test_info_reports_state_for_scripts(ctx: AppContext) -> None:
    assert FakeBackend().info["state"] == "ready"
    assert len(FAKE_BOXES) == len(FAKE_SCORES)


def test_app_start_does_not_import_leafmap() -> None:
    """leafmap costs about 2 s to import (ipyleaflet, plotly, pandas): only the first map page
    imports it, in a background thread started by `launch`."""
    import subprocess
    import sys

    code = ("import sys, app.main, app.layout, app.handlers; "
            "assert 'leafmap' not in sys.modules, 'leafmap imported at start'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_a_description_of_a_scanned_area_says_what_the_scan_found(ctx: AppContext) -> None:
    """With a detector, "Describe" on an area read in tiles finds its buildings as a count
    does (drawn on the map) and the chip's conversation takes them as its own, so the
    description's count is the scan's, not the one downsampled look's; a later count's scan
    replaces them."""
    from app.backend import FakeSession

    adopted: list[tuple[int, str, int]] = []

    class Session(FakeSession):
        def adopt_detections(self, label, detections) -> None:
            assert all(0 <= v <= 1 for d in detections for v in d.box)
            adopted.append((id(self), label, len(detections)))

    class Backend(FakeBackend):
        @property
        def info(self):
            return {**super().info, "detector_labels": ["building", "aircraft"]}

        def new_session(self, chip):
            return Session(chip, self.delay_s)

    with_detector = AppContext(backend=Backend(), region=ctx.region, export_dir=ctx.export_dir)
    state, _ = h.start_session(with_detector)
    final = list(h.ask(with_detector, state, "Describe this image."))[-1]
    assert _plain(final.chat[-1]["content"]).startswith("The image shows closely spaced")
    assert len(state.detections) == 36  # the scan's buildings, numbered on the map
    assert adopted == [(id(state.session), "building", 36)]
    list(h.ask(with_detector, state, "How many buildings are there?"))
    assert adopted[-1] == (id(state.session), "building", 36) and len(adopted) == 2
    # What kind of area: on this 230 m area the detector answers it, from the same read.
    list(h.ask(with_detector, state, h.QUICK_ACTIONS["classify"]))
    assert adopted[-1] == (id(state.session), "building", 36) and len(adopted) == 3
    # A count of one part reads that part; the chip keeps the whole area's buildings.
    before = len(state.detections)
    list(h.ask(with_detector, state, "How many buildings are in the bottom right?"))
    assert len(adopted) == 3 and len(state.detections) == before + 6
    # Without a detector the description is the chip's one look, as before: no scan.
    plain, _ = h.start_session(ctx)
    list(h.ask(ctx, plain, "Describe this image."))
    assert plain.detections == []
