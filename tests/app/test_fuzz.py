"""The hostile corpus of scripts/fuzz_app.py against the real app (Gradio, HTTP, fake model), and
the memory bound of scripts/hostile_files.py measured in a fresh process."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
#: Peak RSS growth allowed while two of the worst inputs are taken at once.
MEMORY_BOUND_MB = 500


def _load(name: str):
    sys.path.insert(0, str(SCRIPTS))  # fuzz_app imports hostile_files by name
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def running_app(tmp_path_factory: pytest.TempPathFactory, demo_region):
    from app.backend import FakeBackend
    from app.handlers import AppContext
    from app.main import launch

    files_root = tmp_path_factory.mktemp("app-files")
    ctx = AppContext(backend=FakeBackend(), region=demo_region, export_dir=files_root)
    port = _free_port()
    demo = launch(ctx, host="127.0.0.1", port=port, auth=None, concurrency=2,
                  max_upload_mb=50, prevent_thread_lock=True)
    yield f"http://127.0.0.1:{port}/", files_root
    demo.close()


def test_hostile_corpus_is_refused_or_answered_and_the_server_stays_up(
        running_app, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fuzz = _load("fuzz_app")
    url, files_root = running_app
    cases = fuzz.corpus(fuzz.small_files(tmp_path / "inputs"), None, str(files_root))
    assert len(cases) >= 60
    endpoints = {c.endpoint.split(" ")[0] for c in cases}
    assert {"/ask", "/find", "/describe", "/classify", "/info", "GET"} <= endpoints
    with caplog.at_level("INFO", logger="app.rejected"):
        rows = fuzz.run_corpus(fuzz.AppClient(url), cases, echo=False)
    wrong = [(r["input"], r["outcome"], r["detail"]) for r in rows if not r["ok"]]
    assert not wrong, wrong
    assert all(r["up"] for r in rows)
    refused = [r for r in rows if r["outcome"] == "refused"]
    # No message hands a server path back (the ones Gradio echoes are the client's own input).
    own = ("/etc/", str(files_root), "../")
    for r in refused:
        if not any(o in r["detail"] for o in own):
            assert "/tmp/" not in r["detail"] and str(Path.home()) not in r["detail"], r
    # One log line per rejection, not a traceback echoing the input.
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "app.rejected"]
    assert len(lines) >= len(refused) - 2
    assert all(len(line) < 260 and "\n" not in line for line in lines)


def test_clipped_bbox_reports_coverage_in_the_api(running_app) -> None:
    fuzz = _load("fuzz_app")
    url, _ = running_app
    outcome, _ = fuzz.AppClient(url).call("/ask", [None, "30,-2,35,3", "Find all buildings"])
    assert outcome == "answered"
    from app import handlers as h
    from app.backend import FakeBackend
    from app.region import DEMO_REGION, Region

    ctx = h.AppContext(backend=FakeBackend(), region=Region.load(DEMO_REGION),
                       export_dir=Path(running_app[1]))
    _, geojson = h.api_ask(ctx, None, "30,-2,35,3", "Find all buildings")
    fc = json.loads(geojson)
    assert fc["chip"]["coverage"] > 0.99
    w, s, e, n = fc["chip"]["bounds_lonlat"]
    rw, rs, re_, rn = ctx.region.bounds_lonlat
    assert abs(w - rw) < 1e-5 and abs(n - rn) < 1e-5  # clipped to the imagery, not 5 degrees
    for f in fc["features"]:
        fw, fs, fe, fn = _bounds(f["geometry"]["coordinates"][0])
        assert rw - 1e-5 <= fw and fe <= re_ + 1e-5 and rs - 1e-5 <= fs and fn <= rn + 1e-5


def _bounds(ring):
    xs, ys = [p[0] for p in ring], [p[1] for p in ring]
    return min(xs), min(ys), max(xs), max(ys)


def test_peak_memory_of_the_worst_inputs_two_at_once(tmp_path: Path) -> None:
    """Bomb-like PNG/JPEG (13000 x 13000 px in 1-2 MB), the largest WebP that is decoded whole,
    a 13000 x 13000 WebP canvas, a 12000 x 12000 GeoTIFF without overviews, a one-strip and a
    one-tile GeoTIFF, a 200-band pixel-interleaved raster: two uploads of each at once."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-W", "ignore", str(SCRIPTS / "hostile_files.py"),
                          str(tmp_path), "--rss", "--upload-only"], env=env, cwd=root,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["peak_growth_mb"] < MEMORY_BOUND_MB, report
    outcomes = report["outcomes"]
    assert outcomes["png_bomb_13000"] == ["upload: ok; no API call"]  # read reduced, not refused
    assert outcomes["jpeg_bomb_13000"] == ["upload: ok; no API call"]
    assert outcomes["geotiff_12000_no_overviews"] == ["upload: ok; no API call"]
    assert outcomes["webp_bomb_13000"] == ["upload: refused; no API call"]
    assert outcomes["geotiff_one_8192_tile"] == ["upload: refused; no API call"]
