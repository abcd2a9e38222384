"""The gradio_client API against a running app (fake model): readable answers with numbered,
scored features, a whole-area scan that reports progress in ``job.status()`` and stops on
``job.cancel()``, and bad input that is refused with the reason while the server stays up."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    from gradio_client import Client

    from app.backend import FakeBackend
    from app.handlers import AppContext
    from app.main import launch
    from app.region import DEMO_REGION, Region

    ctx = AppContext(backend=FakeBackend(delay_s=0.05), region=Region.load(DEMO_REGION),
                     export_dir=tmp_path_factory.mktemp("exports"))
    port = _free_port()
    demo = launch(ctx, host="127.0.0.1", port=port, auth=None, concurrency=2, max_upload_mb=5,
                  prevent_thread_lock=True)
    yield Client(f"http://127.0.0.1:{port}/", verbose=False)
    demo.close()


def test_find_scan_progress_cancel_and_errors(client, tmp_path: Path, caplog) -> None:
    import logging

    from gradio_client.exceptions import AppError

    caplog.set_level(logging.INFO, logger="rsvlm.scan")
    assert client.predict(api_name="/info")["state"] == "ready"
    answer, geojson = client.predict(None, "32.5942,0.3505,32.5952,0.3512", "buildings",
                                     api_name="/find")
    fc = json.loads(geojson)
    assert answer == "Found 3 buildings (numbered 1–3 on the map)." == fc["answer"]
    assert "<box>" in fc["raw_answer"]
    assert [(f["properties"]["n"], f["properties"]["score"]) for f in fc["features"]] == [
        (1, 0.92), (2, 0.81), (3, 0.47)]
    # The whole region is 12 tiles: progress shows in the job's status, cancel stops the scan.
    job = client.submit(None, "", "buildings", api_name="/find")
    seen = []
    deadline = time.time() + 60
    while time.time() < deadline:
        time.sleep(0.3)
        progress = job.status().progress_data
        if progress and progress[0].index:
            seen.append((progress[0].index, progress[0].length, progress[0].desc))
            if progress[0].index >= 2:
                break
    assert seen and seen[-1][1] == 12 and "tiles read" in seen[-1][2], seen
    assert job.cancel()
    for _ in range(50):  # the server's scan stops after its current tile
        if "scan cancelled after" in caplog.text:
            break
        time.sleep(0.2)
    assert "scan cancelled after" in caplog.text
    # The server is still up and answers the next call; bad input gets the reason.
    with pytest.raises(AppError, match="does not overlap"):
        client.predict(None, "10,10,10.1,10.1", "buildings", api_name="/find")
    answer, geojson = client.predict(None, "", "How many buildings are there?",
                                     api_name="/ask")
    fc = json.loads(geojson)
    assert fc["tiles_read"] == fc["tiles_total"] == 12 and not fc["cancelled"]
    assert answer.endswith("reading the whole area in 12 tiles.")
