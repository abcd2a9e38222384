"""The Ray engine on a local Ray (2 CPUs): same detections as the local engine, faults, resume.

One Ray session serves the whole module (starting Ray costs seconds and memory): a small
object store, no dashboard.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rsvlm.scanning import scan_rasters
from rsvlm.scanning.ray_engine import RayOptions, actor_resources
from rsvlm.testing import KillOnce, ObjectsAnswerer, TinyModelAnswerer

ray = pytest.importorskip("ray")

UTM = "EPSG:32636"
X0, Y0 = 455_000.0, 40_000.0
OBJECTS = {
    "building#seam_x": (X0 + 380, Y0 - 100, X0 + 430, Y0 - 80),
    "building#seam_y": (X0 + 100, Y0 - 320, X0 + 130, Y0 - 280),
    "building#inside": (X0 + 600, Y0 - 150, X0 + 620, Y0 - 130),
    "field#corner": (X0 + 390, Y0 - 310, X0 + 410, Y0 - 290),
}
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_session():
    if ray.is_initialized():  # pragma: no cover - another module left one running
        ray.shutdown()
    ray.init(
        num_cpus=2,
        object_store_memory=96 * 2**20,
        include_dashboard=False,
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def city(tmp_path_factory, write_tile_grid) -> Path:
    folder = tmp_path_factory.mktemp("city")
    write_tile_grid(folder, 2, 2)
    (folder / "broken.tif").write_bytes(b"II*\x00" + b"\x00" * 50)
    # Far away (an area of its own), three windows down; its lower rows are cut off the file.
    (far,) = write_tile_grid(folder / "far", 1, 1, 128, 256, origin=(X0 + 5000, Y0))
    with open(far, "r+b") as fh:
        fh.truncate(far.stat().st_size * 6 // 10)
    return folder


def _scan(inputs, out: Path, engine: str, **kw):
    kw.setdefault("answerer", ObjectsAnswerer(OBJECTS, UTM))
    kw.setdefault("chip_size", 128)
    return scan_rasters(inputs, "find all buildings", out=out, engine=engine, **kw)


def _features(path: Path) -> list:
    return json.loads(path.read_text())["features"]


def test_actor_resources_follow_the_cluster() -> None:
    cpu = actor_resources({"CPU": 16.0}, RayOptions())
    assert cpu["actors"] == 4 and cpu["num_gpus"] == 0 and cpu["threads"] == 4
    assert 4 * cpu["num_cpus"] < 16  # room is left for the reading tasks
    gpu = actor_resources({"CPU": 32.0, "GPU": 4.0}, RayOptions())
    assert gpu["actors"] == 4 and gpu["num_gpus"] == 1 and gpu["num_cpus"] == 1
    two = actor_resources({"CPU": 2.0}, RayOptions(actors=2))
    assert two["actors"] == 2 and 2 * two["num_cpus"] < 2 and two["threads"] == 1


def test_ray_engine_finds_what_the_local_engine_finds(ray_session, city, tmp_path) -> None:
    local = _scan(city, tmp_path / "local.geojson", "local")
    slow = ObjectsAnswerer(OBJECTS, UTM, seconds_per_chip=0.05)  # batches queue up, as with a model
    dist = _scan(city, tmp_path / "ray.geojson", "ray", ray_options=RayOptions(actors=2),
                 batch_size=3, answerer=slow)  # fmt: skip
    assert not dist["complete"] and dist["workers"]["actors"] == 2
    assert len(dist["workers"]["peak_rss_mb"]) == 2  # two processes answered
    assert dist["windows"]["read"] == local["windows"]["read"] == 48 + 1  # one far window is read
    assert dist["windows"]["failed"] == local["windows"]["failed"] == 2  # two are damaged
    assert dist["failures"] == local["failures"] and dist["windows"]["duplicates_dropped"] == 0
    assert [f["name"] for f in dist["rasters"]["failed"]] == ["broken.tif"]
    assert dist["detections"] == local["detections"] and dist["detections"]["written"] == 4
    assert _features(tmp_path / "ray.geojson") == _features(tmp_path / "local.geojson")


def test_killed_actor_is_restarted_and_nothing_is_lost_or_doubled(
    ray_session, city, tmp_path
) -> None:
    marker = tmp_path / "killed"
    answerer = KillOnce(ObjectsAnswerer(OBJECTS, UTM), str(marker), after=3)
    dist = _scan(city, tmp_path / "k.geojson", "ray", answerer=answerer,
                 ray_options=RayOptions(actors=2), batch_size=2)  # fmt: skip
    assert marker.exists()  # an actor did die mid-run
    assert dist["windows"]["read"] == 49 and dist["windows"]["failed"] == 2
    assert dist["windows"]["retried"] >= 1  # its batch ran again on the restarted actor
    assert len(dist["workers"]["peak_rss_mb"]) >= 2
    local = _scan(city, tmp_path / "l.geojson", "local")
    assert dist["detections"] == local["detections"]
    assert _features(tmp_path / "k.geojson") == _features(tmp_path / "l.geojson")


def test_killed_ray_driver_resumes_to_the_uninterrupted_result(ray_session, city, tmp_path):
    """The CLI joins this cluster (--address), is SIGKILLed mid-run, and the run is resumed."""
    out = tmp_path / "d.geojson"
    manifest = tmp_path / "d.geojson.scan" / "manifest.jsonl"
    address = ray_session.get_runtime_context().gcs_address
    scan = ["scan", str(city), "find all", "--chip-size", "128", "--fake-model"]
    args = [*scan, "0.3", "--out", str(out), "--engine", "ray", "--address", address,
            "--actors", "1", "--batch-size", "2", "--flush-every", "2"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "rsvlm.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.exists() and len(manifest.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    from rsvlm import cli

    summary = tmp_path / "s.json"
    resumed = [*scan, "--out", str(out), "--engine", "ray", "--summary", str(summary)]
    assert cli.main(resumed) == 1  # complete, but broken.tif was skipped (and says so)
    s = json.loads(summary.read_text())
    assert s["windows"]["done_before"] >= 4 and s["windows"]["remaining"] == 2  # the damaged ones
    assert s["windows"]["done_before"] + s["windows"]["read"] == 49
    assert cli.main([*scan, "--out", str(tmp_path / "u.geojson")]) == 1
    assert _features(out) == _features(tmp_path / "u.geojson")


def test_tiny_model_answers_the_same_on_both_engines(ray_session, tmp_path, write_tile_grid) -> None:
    folder = tmp_path / "small"
    write_tile_grid(folder, 1, 2, 160, 120)
    said = {name: tmp_path / f"{name}.txt" for name in ("local", "ray")}
    kw = {"chip_size": 64, "batch_size": 4}
    local = _scan(folder, tmp_path / "l.geojson", "local",
                  answerer=TinyModelAnswerer(4, answers_file=str(said["local"])), **kw)  # fmt: skip
    dist = _scan(folder, tmp_path / "r.geojson", "ray", ray_options=RayOptions(actors=1),
                 answerer=TinyModelAnswerer(4, answers_file=str(said["ray"])), **kw)  # fmt: skip
    assert dist["windows"]["read"] == local["windows"]["read"] == 2 * 3 * 2
    answers = {k: sorted(p.read_text().splitlines()) for k, p in said.items()}
    assert len(answers["ray"]) == 12 and answers["ray"] == answers["local"]
    assert dist["detections"] == local["detections"]
    assert _features(tmp_path / "r.geojson") == _features(tmp_path / "l.geojson")
