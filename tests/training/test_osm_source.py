"""OSM sources: a local .osm.pbf (pyrosm), Overpass (a local server replaying a recorded answer)
with its disk cache, rate limit, timeouts and failures; build-data --osm."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from training.osm_source import (
    ATTRIBUTION,
    OSMError,
    OverpassSource,
    PbfSource,
    VectorFileSource,
    open_osm,
)
from training.region import classify_features

# Inside the recorded answer's area (tests/conftest.py HELSINKI_AREA).
CHIP = (24.9400, 60.1670, 24.9440, 60.1690)


def _overpass(server, tmp_path: Path, **kw) -> OverpassSource:
    return OverpassSource(server.url, cache_dir=tmp_path / "cache", min_interval_s=0.0, **kw)


def test_pbf_source_gives_every_visible_kind_in_the_box(helsinki_pbf: Path) -> None:
    feats = PbfSource(helsinki_pbf).features(CHIP)
    assert feats.crs.to_epsg() == 4326 and len(feats) > 100
    from shapely.geometry import box

    assert feats.intersects(box(*CHIP)).all()
    assert feats["osm_id"].str.match(r"^(node|way|relation)/\d+$").all()
    classes = set(classify_features([feats], "EPSG:4326")["cls"])
    assert {"building", "road", "path", "tram line"} <= classes, classes
    assert "tags" not in feats.columns and "version" not in feats.columns  # tags unpacked


def test_overpass_answer_is_cached_and_reused_offline(overpass_server, helsinki_pbf: Path,
                                                      tmp_path: Path) -> None:
    src = _overpass(overpass_server, tmp_path)
    feats = src.features(CHIP)
    assert len(overpass_server.queries) == 1
    query = overpass_server.queries[0]
    assert "[out:xml]" in query and "(._;>;);out body;" in query and 'nwr["building"]' in query
    s, w, n, e = (float(v) for v in query.split('nwr["building"](')[1].split(")")[0].split(","))
    assert w <= CHIP[0] and s <= CHIP[1] and e >= CHIP[2] and n >= CHIP[3]  # snapped outwards
    # The same ways as the extract itself gives for the box.
    from_pbf = set(PbfSource(helsinki_pbf).features(CHIP)["osm_id"])
    ways = {i for i in from_pbf if i.startswith("way/")}
    got = set(feats["osm_id"])
    assert len(ways & got) >= 0.95 * len(ways)
    assert {"building", "road"} <= set(classify_features([feats], "EPSG:4326")["cls"])
    assert list((tmp_path / "cache").glob("*.osm"))

    # A smaller area inside the cached one: no request. Then offline: still served.
    inner = (24.9410, 60.1675, 24.9420, 60.1680)
    assert len(src.features(inner)) > 0
    overpass_server.close()
    again = _overpass(overpass_server, tmp_path)  # a new app start, same cache
    assert len(again.features(CHIP)) == len(feats)
    assert len(overpass_server.queries) == 1


def test_unreachable_overpass_fails_fast_with_a_clear_message(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    src = OverpassSource(f"http://127.0.0.1:{port}/api/interpreter", cache_dir=tmp_path,
                         timeout_s=2.0, min_interval_s=0.0)
    t0 = time.monotonic()
    with pytest.raises(OSMError, match="cannot reach Overpass.*--osm FILE.osm.pbf"):
        src.features(CHIP)
    assert time.monotonic() - t0 < 5
    assert not list(tmp_path.glob("*.osm"))


@pytest.mark.parametrize(("mode", "message"), [
    ("busy", "busy \\(HTTP 429\\)"),
    ("garbage", "did not answer with OSM XML"),
    ("runtime-error", "stopped: runtime error: Query timed out"),
    ("slow", "did not answer within 1 s"),
])
def test_overpass_failures_are_said_and_not_cached(overpass_server, tmp_path: Path, mode: str,
                                                   message: str) -> None:
    overpass_server.mode = mode
    src = _overpass(overpass_server, tmp_path, timeout_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(OSMError, match=message):
        src.features(CHIP)
    assert time.monotonic() - t0 < 4  # bounded: no retry loop, no hang
    assert not list((tmp_path / "cache").glob("*.osm"))
    overpass_server.mode = "ok"
    assert len(src.features(CHIP)) > 0  # the next try works


def test_requests_are_spaced(overpass_server, tmp_path: Path) -> None:
    src = OverpassSource(overpass_server.url, cache_dir=tmp_path, min_interval_s=0.6)
    src.features(CHIP)
    src.features((24.9500, 60.1700, 24.9510, 60.1710))  # another area: another request
    assert len(overpass_server.times) == 2
    (_, end1), (start2, _) = overpass_server.times
    assert start2 - end1 >= 0.5


def test_the_cache_stays_bounded(overpass_server, tmp_path: Path) -> None:
    size = len(overpass_server.answer)
    src = _overpass(overpass_server, tmp_path, max_cache_bytes=int(size * 1.5))
    src.features(CHIP)
    src.features((24.9500, 60.1700, 24.9510, 60.1710))
    cached = list((tmp_path / "cache").glob("*.osm"))
    assert len(cached) == 1 and "24.950000" in cached[0].name  # the newest answer stays


def test_large_areas_and_bad_input_are_refused(tmp_path: Path) -> None:
    src = OverpassSource("http://127.0.0.1:9/api/interpreter", cache_dir=tmp_path)
    with pytest.raises(OSMError, match="km².*local extract"):
        src.features((24.0, 60.0, 25.0, 61.0))
    with pytest.raises(OSMError, match="not an area"):
        src.features((25.0, 60.0, 24.0, 61.0))
    with pytest.raises(OSMError, match="http"):
        OverpassSource("file:///etc/passwd")


def test_open_osm(tmp_path: Path, helsinki_pbf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert open_osm(None) is None and open_osm("none") is None
    monkeypatch.setenv("RSVLM_OVERPASS_URL", "http://127.0.0.1:1/api/interpreter")
    auto = open_osm("auto", cache_dir=tmp_path)
    assert isinstance(auto, OverpassSource) and auto.endpoint.startswith("http://127.0.0.1:1/")
    assert auto.attribution == ATTRIBUTION and "OpenStreetMap" in ATTRIBUTION
    assert isinstance(open_osm(helsinki_pbf), PbfSource)
    with pytest.raises(OSMError, match="not found"):
        open_osm(tmp_path / "missing.osm.pbf")
    broken = tmp_path / "broken.osm.pbf"
    broken.write_bytes(b"not a pbf")
    with pytest.raises(OSMError, match="broken.osm.pbf"):
        open_osm(broken).features(CHIP)


def test_vector_file_source_keeps_tags_as_text(tmp_path: Path) -> None:
    path = tmp_path / "osm.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "properties": {"osm_id": 7, "building": "<b>yes</b>"},
        "geometry": {"type": "Point", "coordinates": [24.941, 60.168]}}]}))
    feats = open_osm(path).features(CHIP)
    assert isinstance(open_osm(path), VectorFileSource)
    assert list(feats["building"]) == ["<b>yes</b>"] and list(feats["osm_id"]) == ["7"]


# --- build-data ------------------------------------------------------------------------------------

def _build(tmp_path: Path, raster: Path, osm: str, *extra: str) -> tuple[int, Path]:
    from training.cli import main

    out = tmp_path / "ds"
    rc = main(["build-data", "--region", str(raster), "--osm", osm, "--out", str(out),
               "--chip-size", "256", "--quiet", *extra])
    return rc, out


def _check_dataset(out: Path) -> None:
    card = json.loads((out / "dataset_card.json").read_text())
    assert card["config"]["osm"]["attribution"] == ATTRIBUTION
    classes = set(card["objects_per_class"])
    assert {"building", "road", "path", "tram line"} <= classes, classes
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    tasks = {r["task"] for r in rows}
    assert {"caption", "vqa", "grounding"} <= tasks
    grounded = " ".join(r["conversations"][1]["value"] for r in rows if r["task"] == "grounding")
    assert "<ref>" in grounded and any(f"{c}" in grounded for c in ("road", "path", "tram"))


def test_build_data_from_a_local_extract(tmp_path: Path, helsinki_pbf: Path,
                                         helsinki_raster: Path) -> None:
    rc, out = _build(tmp_path, helsinki_raster, str(helsinki_pbf))
    assert rc == 0
    _check_dataset(out)
    assert "Helsinki.osm.pbf" in json.loads((out / "dataset_card.json").read_text())[
        "config"]["osm"]["source"]


def test_build_data_osm_auto_asks_overpass(tmp_path: Path, overpass_server,
                                           helsinki_raster: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RSVLM_OSM_CACHE", str(tmp_path / "cache"))
    rc, out = _build(tmp_path, helsinki_raster, "auto", "--overpass-url", overpass_server.url)
    assert rc == 0 and len(overpass_server.queries) == 1
    _check_dataset(out)


def test_build_data_osm_auto_offline_says_why(tmp_path: Path, capsys: pytest.CaptureFixture,
                                              helsinki_raster: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RSVLM_OSM_CACHE", str(tmp_path / "cache"))
    rc, _ = _build(tmp_path, helsinki_raster, "auto", "--overpass-url", "http://127.0.0.1:9/api/interpreter")
    assert rc == 2
    assert "cannot reach Overpass" in capsys.readouterr().err
