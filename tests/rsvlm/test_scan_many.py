"""Multi-raster scans on the local engine: sources, plan, seams, outputs, manifest and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from rsvlm.scan import ScanError
from rsvlm.scanning import FakeAnswerer, RasterRef, SourceListError, list_rasters, scan_rasters
from rsvlm.scanning.plan import Grid, list_windows, outer_flags, plan_rasters
from rsvlm.testing import ObjectsAnswerer

UTM = "EPSG:32636"
X0, Y0 = 455_000.0, 40_000.0  # top-left corner of tile t_0_0; tiles are 400 x 300 m
OBJECTS = {
    "building#seam_x": (X0 + 380, Y0 - 100, X0 + 430, Y0 - 80),  # across t_0_0 | t_0_1
    "building#seam_y": (X0 + 100, Y0 - 320, X0 + 130, Y0 - 280),  # across t_0_0 / t_1_0
    "building#inside": (X0 + 600, Y0 - 150, X0 + 620, Y0 - 130),  # inside t_0_1, two chips
    "field#corner": (X0 + 390, Y0 - 310, X0 + 410, Y0 - 290),  # on the corner of all four
}
ROOT = Path(__file__).resolve().parents[2]


def _utm_bounds(geom) -> np.ndarray:
    from tiles.geometry import transform_geometry

    return np.array(transform_geometry(geom, "EPSG:4326", UTM).bounds)


def _read(path: Path):
    import geopandas as gpd

    frame = gpd.read_file(path) if path.suffix != ".parquet" else gpd.read_parquet(path)
    return frame.sort_values(["label", "source"], ignore_index=True)


def _scan(inputs, out: Path, **kw):
    kw.setdefault("answerer", ObjectsAnswerer(OBJECTS, UTM))
    kw.setdefault("chip_size", 128)
    return scan_rasters(inputs, "find all buildings", out=out, **kw)


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------


def test_folder_list_file_glob_and_one_raster(tmp_path: Path, write_tile_grid) -> None:
    tiles = write_tile_grid(tmp_path / "set" / "sub", 1, 2, 64, 64)
    (tmp_path / "set" / "notes.md").write_text("not a raster")
    folder = list_rasters(tmp_path / "set")
    assert [r.name for r in folder] == ["sub/t_0_0.tif", "sub/t_0_1.tif"]
    listing = tmp_path / "scenes.txt"
    listing.write_text("# two tiles, one twice\nset/sub/t_0_1.tif\n\n  set/sub/t_0_0.tif # b\n"
                       f"{tiles[1]}\n")  # fmt: skip
    assert [r.uri for r in list_rasters(listing)] == [str(tiles[1]), str(tiles[0])]
    assert len(list_rasters(f"{tmp_path}/set/**/*.tif")) == 2
    assert list_rasters(tiles[0]) == [RasterRef(str(tiles[0]), "t_0_0.tif")]
    (tmp_path / "empty").mkdir()
    for bad, match in [
        (tmp_path / "none.tif", "not found"),
        (f"{tmp_path}/*.jp2", "matches no file"),
        (tmp_path / "empty", "holds no raster"),
    ]:
        with pytest.raises(SourceListError, match=match):
            list_rasters(bad)
    listing.write_text("set/sub/missing.tif\n")
    with pytest.raises(SourceListError, match="line 1"):
        list_rasters(listing)


def test_stac_itemcollection_and_catalog_with_an_asset_key(tmp_path: Path, write_tile_grid) -> None:
    import pystac

    tiles = write_tile_grid(tmp_path / "cogs", 1, 2, 64, 64)
    items = []
    for n, path in enumerate(tiles):
        when = datetime(2024, 1, 1, tzinfo=timezone.utc)
        item = pystac.Item(f"scene-{n}", None, None, when, {})
        item.add_asset("analytic", pystac.Asset(str(path), media_type=pystac.MediaType.COG))
        if n == 0:
            item.add_asset("visual", pystac.Asset(str(path), media_type=pystac.MediaType.COG))
        items.append(item)
    collection = tmp_path / "items.json"
    pystac.ItemCollection(items).save_object(dest_href=str(collection))
    refs = list_rasters(collection, asset="analytic")
    assert [(r.name, r.uri, r.error) for r in refs] == [
        ("scene-0/analytic", str(tiles[0]), ""),
        ("scene-1/analytic", str(tiles[1]), ""),
    ]
    default = list_rasters(collection)  # "visual" by default; the item without it is reported
    assert default[0].name == "scene-0/visual" and "no asset" in default[1].error
    catalog = pystac.Catalog("city", "tiles of a city")
    catalog.add_items([i.clone() for i in items])
    catalog.normalize_hrefs(str(tmp_path / "catalog"))
    catalog.save(pystac.CatalogType.SELF_CONTAINED)
    refs = list_rasters(tmp_path / "catalog" / "catalog.json", asset="analytic")
    assert sorted(r.uri for r in refs) == sorted(str(p) for p in tiles)
    (tmp_path / "other.json").write_text('{"type": "Topology"}')
    with pytest.raises(SourceListError, match="not STAC"):
        list_rasters(tmp_path / "other.json")


# ----------------------------------------------------------------------------------------------
# Plan
# ----------------------------------------------------------------------------------------------


def test_areas_metric_crs_and_seams(tmp_path: Path, write_tile_grid) -> None:
    write_tile_grid(tmp_path / "city", 2, 2)
    write_tile_grid(tmp_path / "far", 1, 1, 200, 200, crs="EPSG:4326", origin=(-70.1, -33.4),
                    pixel=1e-5)  # fmt: skip
    plans = plan_rasters(list_rasters(tmp_path), Grid(128, 0.125))
    by_name = {p.name: p for p in plans}
    city = [by_name[f"city/t_{r}_{c}.tif"] for r in (0, 1) for c in (0, 1)]
    far = by_name["far/t_0_0.tif"]
    assert {p.area for p in city} == {city[0].area} != {far.area}
    assert city[0].metric_crs == UTM and far.metric_crs == "EPSG:32719"  # UTM of Santiago
    assert len(city[0].neighbours) == 3 and far.neighbours == []
    assert city[0].windows == 4 * 3
    rows = list(list_windows(city[0], Grid(128, 0.125)))
    top_left = outer_flags(rows[0]["outer"])  # left, bottom, right, top
    assert top_left == (True, False, False, True)
    right_col = [outer_flags(r["outer"]) for r in rows if r["x1"] == X0 + 400]
    assert right_col and all(not f[2] for f in right_col)  # the seam to t_0_1 is not outer
    bottom_row = [outer_flags(r["outer"]) for r in rows if r["y0"] == Y0 - 300]
    assert bottom_row and all(not f[1] for f in bottom_row)
    far_rows = [outer_flags(r["outer"]) for r in list_windows(far, Grid(128, 0.125))]
    assert far_rows[0] == (True, False, False, True)  # no neighbours: raster edges are outer


# ----------------------------------------------------------------------------------------------
# Scans on the local engine
# ----------------------------------------------------------------------------------------------


def test_objects_across_raster_edges_are_merged_once(tmp_path: Path, write_tile_grid) -> None:
    write_tile_grid(tmp_path / "city", 2, 2)
    summary = _scan(tmp_path / "city", tmp_path / "out.geojson", batch_size=5)
    assert summary["complete"] and summary["windows"]["read"] == 4 * 12
    assert summary["detections"]["raw_boxes"] > len(OBJECTS) == summary["detections"]["written"]
    found = _read(tmp_path / "out.geojson")
    for label, bounds in OBJECTS.items():
        near = [
            row for _, row in found.iterrows()
            if np.allclose(_utm_bounds(row.geometry), bounds, atol=1.5)
        ]  # fmt: skip
        assert len(near) == 1, label
        assert near[0].label == label.split("#")[0] and near[0].score == 1.0
    corner = found[found.label == "field"].iloc[0]
    assert corner.source.count(";") == 3  # seen by all four rasters
    assert set(found.question) == {"find all buildings"}


def test_one_raster_gives_what_rsvlm_scan_gives(tmp_path: Path, write_tile_grid) -> None:
    import tiles
    from rsvlm.scan import scan

    (raster,) = write_tile_grid(tmp_path / "one", 1, 1, 700, 500)
    objects = {**OBJECTS, "building#cut": (X0 + 100, Y0 - 499, X0 + 125, Y0 - 480)}
    answerer = ObjectsAnswerer(objects, UTM)
    summary = _scan(raster, tmp_path / "one.geojson", answerer=answerer, chip_size=160)
    with tiles.open_source(raster) as source:
        expected = scan(source, "find all buildings", answer_fn=answerer(), chip_size=160)
    got = _read(tmp_path / "one.geojson")
    assert summary["detections"]["written"] == len(expected) == len(got) >= 4
    want = sorted((d.label, d.score, tuple(_utm_bounds(d.geometry).round(3))) for d in expected)
    have = sorted(
        (r.label, r.score, tuple(_utm_bounds(r.geometry).round(3))) for _, r in got.iterrows()
    )
    assert [w[:2] for w in want] == [h[:2] for h in have]
    assert np.allclose([w[2] for w in want], [h[2] for h in have], atol=1e-3)


def test_unreadable_rasters_are_reported_and_skipped(tmp_path: Path, write_tile_grid) -> None:
    from PIL import Image

    from rsvlm import cli

    write_tile_grid(tmp_path / "set", 1, 2)
    (tmp_path / "set" / "broken.tif").write_bytes(b"II*\x00" + b"\x00" * 50)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "set" / "photo.tif")
    summary = _scan(tmp_path / "set", tmp_path / "out.gpkg")
    failed = {f["name"]: f["error"] for f in summary["rasters"]["failed"]}
    assert set(failed) == {"broken.tif", "photo.tif"} and "georeference" in failed["photo.tif"]
    assert summary["rasters"]["scanned"] == 2 and summary["windows"]["read"] == 24
    found = _read(tmp_path / "out.gpkg")
    assert len(found) == 4  # the two objects below the top row are cut at its (outer) edge
    assert all(_utm_bounds(g)[1] >= Y0 - 300 - 1e-6 for g in found.geometry)
    args = ["scan", str(tmp_path / "set"), "find all buildings", "--fake-model",
            "--out", str(tmp_path / "cli.geojson"), "--chip-size", "128", "--json"]  # fmt: skip
    assert cli.main(args) == 1  # everything that could be scanned was, but not all rasters
    only_bad = tmp_path / "bad.txt"
    only_bad.write_text("set/broken.tif\n")
    with pytest.raises(ScanError, match="None of the 1 raster"):
        _scan(only_bad, tmp_path / "x.geojson")


def test_windows_that_cannot_be_read_fail_alone_and_the_next_run_retries_them(
    tmp_path: Path, write_tile_grid) -> None:
    write_tile_grid(tmp_path / "set", 1, 2)
    damaged = tmp_path / "set" / "t_0_1.tif"
    with open(damaged, "r+b") as fh:  # the header survives, the lower half of the pixels not
        fh.truncate(damaged.stat().st_size // 2)
    first = _scan(tmp_path / "set", tmp_path / "f.geojson")
    failed = first["windows"]["failed"]
    assert 0 < failed < 12 and first["windows"]["read"] == 24 - failed
    assert not first["complete"] and first["windows"]["remaining"] == failed
    assert all(f["raster"] == "t_0_1.tif" and "truncated" in f["error"] for f in first["failures"])
    second = _scan(tmp_path / "set", tmp_path / "f.geojson")  # the same command again
    assert second["windows"]["done_before"] == 24 - failed
    assert second["windows"]["read"] == 0 and second["windows"]["failed"] == failed


def test_outputs_and_partitioned_geoparquet(tmp_path: Path, write_tile_grid) -> None:
    import geopandas as gpd
    import pyarrow.parquet as pq

    write_tile_grid(tmp_path / "city", 2, 2)
    run_dir = tmp_path / "run"
    summary = _scan(tmp_path / "city", tmp_path / "a.parquet", run_dir=run_dir, flush_windows=10)
    parts = sorted((run_dir / "parts").glob("part-*.parquet"))
    assert summary["parts"] == len(parts) >= 2
    meta = json.loads(pq.read_schema(parts[0]).metadata[b"geo"])
    assert meta["primary_column"] == "geometry"
    raw = gpd.read_parquet(parts[0])
    assert raw.crs.to_epsg() == 4326
    assert {"label", "score", "source", "window", "question", "cut"} <= set(raw.columns)
    lines = (run_dir / "manifest.jsonl").read_text().splitlines()
    assert sum(len(json.loads(line)["windows"]) for line in lines) == 48
    merged = _read(tmp_path / "a.parquet")
    for other in ("b.gpkg", "c.geojson"):
        _scan(tmp_path / "city", tmp_path / other, run_dir=run_dir)  # resumes: nothing to read
        frame = _read(tmp_path / other)
        assert list(frame.label) == list(merged.label) and list(frame.window) == list(merged.window)
        assert all(a.equals_exact(b, 1e-9) for a, b in zip(frame.geometry, merged.geometry,
                                                            strict=True))  # fmt: skip
    data = json.loads((tmp_path / "c.geojson").read_text())
    assert data["type"] == "FeatureCollection" and "crs" not in data
    with pytest.raises(ScanError, match="output format"):
        _scan(tmp_path / "city", tmp_path / "d.csv")


def test_cancelled_run_resumes_without_reading_a_finished_window_again(tmp_path: Path, write_tile_grid) -> None:
    write_tile_grid(tmp_path / "city", 2, 2)
    calls = tmp_path / "calls.txt"
    cancel = threading.Event()

    def progress(done: int, total: int) -> None:
        if done >= 20:
            cancel.set()

    first = _scan(tmp_path / "city", tmp_path / "r.geojson", cancel=cancel, progress=progress,
                  answerer=ObjectsAnswerer(OBJECTS, UTM, str(calls)), flush_windows=3)  # fmt: skip
    assert first["cancelled"] and not first["complete"] and 20 <= first["windows"]["read"] < 48
    assert not (tmp_path / "r.geojson").exists()  # nothing merged from half a run
    run_dir = tmp_path / "r.geojson.scan"
    # A kill between a part's rename and its manifest line leaves an orphan part and maybe a
    # torn line: neither may count.
    parts = sorted((run_dir / "parts").glob("part-*.parquet"))
    orphan = run_dir / "parts" / "part-999999.parquet"
    orphan.write_bytes(parts[0].read_bytes())
    with open(run_dir / "manifest.jsonl", "a") as fh:
        fh.write('{"part": "part-999999.parquet", "windows": [[0, ')
    calls.unlink()
    second = _scan(tmp_path / "city", tmp_path / "r.geojson",
                   answerer=ObjectsAnswerer(OBJECTS, UTM, str(calls)))  # fmt: skip
    assert not orphan.exists()
    done_before = second["windows"]["done_before"]
    assert done_before == first["windows"]["read"] and second["windows"]["read"] == 48 - done_before
    answered = calls.read_text().splitlines()
    assert len(answered) == len(set(answered)) == 48 - done_before
    whole = _scan(tmp_path / "city", tmp_path / "whole.geojson")
    assert whole["detections"]["written"] == second["detections"]["written"] == len(OBJECTS)
    assert json.loads((tmp_path / "r.geojson").read_text()) == json.loads(
        (tmp_path / "whole.geojson").read_text()
    )
    with pytest.raises(ScanError, match="--restart"):
        scan_rasters(tmp_path / "city", "find all cars", answerer=FakeAnswerer(),
                     out=tmp_path / "r.geojson", chip_size=128)  # fmt: skip
    with _locked(run_dir), pytest.raises(ScanError, match="Another scan"):  # a second driver
        _scan(tmp_path / "city", tmp_path / "r.geojson")
    assert _scan(tmp_path / "city", tmp_path / "r.geojson")["windows"]["read"] == 0


def _locked(folder: Path):
    """Hold the run folder's lock as a running scan would."""
    import contextlib
    import fcntl

    @contextlib.contextmanager
    def hold():
        fd = os.open(folder / ".lock", os.O_CREAT | os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            os.close(fd)

    return hold()


def test_killed_cli_scan_resumes_to_the_uninterrupted_result(tmp_path: Path, write_tile_grid) -> None:
    """SIGKILL (no clean-up at all) in the middle of a CLI scan, then the same command again."""
    write_tile_grid(tmp_path / "city", 2, 2)
    out, run_dir = tmp_path / "k.geojson", tmp_path / "k.geojson.scan"
    scan = ["scan", str(tmp_path / "city"), "find all", "--chip-size", "128", "--fake-model"]
    killed = [*scan, "0.15", "--out", str(out), "--batch-size", "2", "--flush-every", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rsvlm.cli", *killed],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    manifest = run_dir / "manifest.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.exists() and len(manifest.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    from rsvlm import cli

    resumed = tmp_path / "resumed.json"
    assert cli.main([*scan, "--out", str(out), "--summary", str(resumed)]) == 0
    summary = json.loads(resumed.read_text())
    assert summary["windows"]["done_before"] >= 6 and summary["complete"]
    assert summary["windows"]["done_before"] + summary["windows"]["read"] == 48
    assert cli.main([*scan, "--out", str(tmp_path / "u.geojson")]) == 0
    assert json.loads(out.read_text()) == json.loads((tmp_path / "u.geojson").read_text())
