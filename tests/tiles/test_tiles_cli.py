"""`python -m tiles info|chip`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tiles.cli import main


def test_info_prints_json(demo_raster, capsys):
    assert main(["info", str(demo_raster)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["driver"] == "GTiff" and info["crs"] == "EPSG:3857"
    assert (info["width"], info["height"], info["count"], info["dtype"]) == (1536, 1024, 3, "uint8")
    assert len(info["bounds"]) == 4 and len(info["bounds_lonlat"]) == 4
    assert info["resolution"][0] == pytest.approx(0.1493, abs=1e-4)
    assert info["overviews"] == []


def test_chip_geotiff_is_georeferenced(demo_raster, tmp_path, capsys):
    import rasterio
    from rasterio.warp import transform_bounds

    out = tmp_path / "chip.tif"
    bbox = (32.594, 0.3505, 32.595, 0.351)
    assert (
        main(
            [
                "chip",
                str(demo_raster),
                "--bbox",
                ",".join(map(str, bbox)),
                "--size",
                "256",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["width"] == 256
    with rasterio.open(out) as ds:
        assert ds.crs.to_epsg() == 3857 and ds.count == 3 and ds.width == 256
        got = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds)
        res_deg = (bbox[2] - bbox[0]) / 256
        assert got == pytest.approx(bbox, abs=res_deg)


def test_chip_png_and_reprojection(demo_raster, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "chip.png"
    assert (
        main(
            [
                "chip",
                str(demo_raster),
                "--out-crs",
                "EPSG:32636",
                "--size",
                "128x100",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["crs"] == "EPSG:32636"
    assert Image.open(out).size == (128, 100)
    assert np.asarray(Image.open(out)).mean() > 20


def test_errors_exit_cleanly(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing.tif")]) == 2
    assert "error:" in capsys.readouterr().err
    bad = tmp_path / "bad.tif"
    bad.write_text("nope")
    assert main(["chip", str(bad), "--out", str(tmp_path / "x.png")]) == 2
    assert "not an image" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["chip", str(bad), "--bbox", "a,b", "--out", "x.png"])


def test_python_dash_m(demo_raster):
    proc = subprocess.run(
        [sys.executable, "-m", "tiles", "info", str(demo_raster)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["count"] == 3


def test_bbox_with_negative_coordinates_as_users_write_them(raster_factory, tmp_path, capsys):
    """`--bbox -122.5,37.7,...` (west of Greenwich) is a value, not an unknown option."""
    raster = raster_factory(name="sf.tif", crs="EPSG:4326", res=1e-4, origin=(-122.45, 37.78))
    out = tmp_path / "chip.png"
    bbox = "-122.445,37.772,-122.43,37.779"
    assert main(["chip", str(raster), "--bbox", bbox, "--size", "64", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    w, s, e, n = printed["bounds_lonlat"]
    assert (w, s, e, n) == pytest.approx((-122.445, 37.772, -122.43, 37.779), abs=2e-4)
    # Southern latitudes first too, and a single negative value stays what argparse made it.
    from tiles.cli_args import attach_values

    assert attach_values(["--bbox", "-0.9,-51.9,-0.8,-51.8", "--size", "-3"], ["--bbox"]) == [
        "--bbox=-0.9,-51.9,-0.8,-51.8", "--size", "-3"]
    assert attach_values(["--bbox", "--out", "x"], ["--bbox"]) == ["--bbox", "--out", "x"]
