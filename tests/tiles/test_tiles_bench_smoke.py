"""The benchmark's core on tiny rasters, so scripts/bench_tiles.py cannot rot."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import rasterio

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_tiles.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_tiles", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_core_runs_on_a_tiny_raster(tmp_path):
    bench = _load()
    big = bench.make_tiled_raster(tmp_path / "big.tif", 1500)
    small = bench.make_tiled_raster(tmp_path / "small.tif", 600, overviews=False)
    with rasterio.open(big) as ds:
        assert ds.overviews(1) == [2, 4] and ds.block_shapes[0] == (512, 512)
    result = bench.run_benchmark(big, small, n=4, size=128)
    assert result["tiles"]["median_ms"] > 0 and result["tiles"]["rss_growth_mb"] >= 0
    assert result["rio_tiler"]["median_ms"] > 0 and result["naive"]["median_ms"] > 0
    assert result["ratio_vs_rio_tiler"] > 0
    assert not list(tmp_path.glob("*.part.tif"))
