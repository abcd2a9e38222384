#!/usr/bin/env python
"""Benchmark: 512 px chips from a 40000 x 40000 tiled COG with overviews.

Reports median chip latency and peak RSS growth of `tiles`, against a naive read-then-crop of a
smaller raster and against rio-tiler's ``Reader.part()`` on the same requests, as ratios.
Goal: median <= 50 ms and RSS growth <= 100 MB.

The big raster is generated once into ``~/.cache/rsvlm-bench`` (``$RSVLM_BENCH_DIR``): JPEG
tiles written strip by strip, then internal overviews built by GDAL. Not a timed test; the
default test suite runs `run_benchmark` on a tiny raster so this script cannot rot.

    python scripts/bench_tiles.py [--size 40000] [--chips 60] [--naive-size 4000]
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from tiles.atomic import atomic_path

log = logging.getLogger("bench_tiles")

BLOCK = 512
# Kampala-ish location, so lon/lat requests look like the app's.
ORIGIN = (3628312.0, 39135.0)
RES = 0.15


def bench_dir() -> Path:
    return Path(os.environ.get("RSVLM_BENCH_DIR", Path.home() / ".cache" / "rsvlm-bench"))


def _texture(seed: int = 0) -> np.ndarray:
    """A (3, BLOCK, BLOCK) uint8 texture with edges and noise (compresses like real imagery)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:BLOCK, 0:BLOCK].astype(np.float32)
    base = 96 + 48 * np.sin(xx / 23.0) * np.cos(yy / 31.0)
    blocks = ((xx // 64 + yy // 64) % 2) * 40
    out = np.stack([base + blocks, base * 0.9 + 20, base * 0.7 + blocks / 2])
    out += rng.normal(0, 12, out.shape).astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


def make_tiled_raster(path: Path, size: int, *, overviews: bool = True) -> Path:
    """Write a ``size`` x ``size`` RGB JPEG-tiled GeoTIFF with internal overviews, atomically."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.transform import from_origin

    path = Path(path)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tex = _texture()
    strip_w = -(-size // BLOCK) * BLOCK
    reps = strip_w // BLOCK
    profile = dict(
        driver="GTiff",
        width=size,
        height=size,
        count=3,
        dtype="uint8",
        crs="EPSG:3857",
        transform=from_origin(*ORIGIN, RES, RES),
        tiled=True,
        blockxsize=BLOCK,
        blockysize=BLOCK,
        compress="JPEG",
        photometric="YCBCR",
        jpeg_quality=85,
        BIGTIFF="IF_SAFER",
    )
    with atomic_path(path) as tmp:
        t0 = time.perf_counter()
        with (
            rasterio.Env(GDAL_NUM_THREADS="ALL_CPUS", GDAL_CACHEMAX=512 * 2**20),
            rasterio.open(tmp, "w", **profile) as dst,
        ):
            strip_base = np.tile(tex, (1, 1, reps))
            for r in range(0, size, BLOCK):
                h = min(BLOCK, size - r)
                # Shift the colours per strip and per column block so tiles are not all identical.
                shift = np.uint8((r // BLOCK) * 7 % 50)
                strip = strip_base[:, :h, :size] + shift
                dst.write(strip, window=((r, r + h), (0, size)))
        log.info("wrote %s in %.0f s", tmp, time.perf_counter() - t0)
        if overviews:
            t0 = time.perf_counter()
            factors = [f for f in (2, 4, 8, 16, 32, 64, 128) if size // f >= 256] or [2]
            with (
                rasterio.Env(
                    GDAL_NUM_THREADS="ALL_CPUS",
                    COMPRESS_OVERVIEW="JPEG",
                    PHOTOMETRIC_OVERVIEW="YCBCR",
                    INTERLEAVE_OVERVIEW="PIXEL",
                    GDAL_TIFF_OVR_BLOCKSIZE=str(BLOCK),
                ),
                rasterio.open(tmp, "r+") as dst,
            ):
                dst.build_overviews(factors, Resampling.average)
            log.info("overviews %s in %.0f s", factors, time.perf_counter() - t0)
    return path


def requests_for(path: Path, n: int, seed: int = 1, min_px: int = 256) -> list[tuple]:
    """Random lon/lat bboxes inside the raster, spans log-uniform from ``min_px`` to the whole."""
    import rasterio
    from rasterio.warp import transform_bounds

    rng = np.random.default_rng(seed)
    with rasterio.open(path) as ds:
        w, h, t, crs = ds.width, ds.height, ds.transform, ds.crs
    out = []
    for _ in range(n):
        span = float(np.exp(rng.uniform(np.log(min(min_px, w)), np.log(min(w, h)))))
        col = rng.uniform(0, w - span)
        row = rng.uniform(0, h - span)
        x0, y0 = t @ (col, row + span)
        x1, y1 = t @ (col + span, row)
        out.append(transform_bounds(crs, "EPSG:4326", x0, y0, x1, y1))
    return out


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_tiles(
    path: Path, bboxes: list[tuple], size: int = 512, resampling: str = "bilinear"
) -> dict[str, float]:
    import tiles

    with tiles.open_source(path) as src:
        src.resampling = resampling
        src.chip(bboxes[0], size=size)  # warm-up: opening, first blocks, transformer cache
        rss0 = _peak_rss_mb()
        times, cpu = [], []
        for bbox in bboxes:
            t0, c0 = time.perf_counter(), time.process_time()
            chip = src.chip(bbox, size=size)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            assert max(chip.width, chip.height) == size
    return {
        "median_ms": 1000 * statistics.median(times),
        "p95_ms": 1000 * _p95(times),
        "cpu_median_ms": 1000 * statistics.median(cpu),
        "rss_growth_mb": _peak_rss_mb() - rss0,
    }


def time_rio_tiler(path: Path, bboxes: list[tuple], size: int = 512) -> dict[str, float]:
    from rio_tiler.io import Reader

    times, cpu = [], []
    with Reader(str(path)) as reader:
        crs = reader.dataset.crs
        reader.part(bboxes[0], dst_crs=crs, bounds_crs="EPSG:4326", max_size=size)
        for bbox in bboxes:
            t0, c0 = time.perf_counter(), time.process_time()
            reader.part(bbox, dst_crs=crs, bounds_crs="EPSG:4326", max_size=size)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return {
        "median_ms": 1000 * statistics.median(times),
        "p95_ms": 1000 * _p95(times),
        "cpu_median_ms": 1000 * statistics.median(cpu),
    }


def time_naive(path: Path, n: int, size: int = 512, seed: int = 2) -> dict[str, float]:
    """Read the whole (smaller) raster, crop, resize: what a script without windows does."""
    import rasterio
    from PIL import Image

    rng = np.random.default_rng(seed)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        with rasterio.open(path) as ds:
            full = ds.read()
        span = int(rng.integers(256, full.shape[1]))
        r, c = (int(rng.integers(0, full.shape[1] - span + 1)) for _ in range(2))
        crop = np.moveaxis(full[:, r : r + span, c : c + span], 0, -1)
        Image.fromarray(crop).resize((size, size), Image.Resampling.BILINEAR)
        times.append(time.perf_counter() - t0)
        del full
    return {"median_ms": 1000 * statistics.median(times), "p95_ms": 1000 * _p95(times)}


def _p95(values: list[float]) -> float:
    return float(np.percentile(values, 95))


def run_benchmark(
    big: Path, small: Path, n: int, size: int = 512, compare: bool = True
) -> dict[str, Any]:
    """Time the three approaches; the core the smoke test runs on tiny rasters."""
    bboxes = requests_for(big, n, min_px=min(size, 256))
    result: dict[str, Any] = {"tiles": time_tiles(big, bboxes, size)}
    if compare:
        result["rio_tiler"] = time_rio_tiler(big, bboxes, size)
        result["tiles_nearest"] = time_tiles(big, bboxes, size, resampling="nearest")
        result["naive"] = time_naive(small, max(3, n // 6), size)
        med = result["tiles"]["median_ms"]
        result["ratio_vs_rio_tiler"] = med / result["rio_tiler"]["median_ms"]
        # CPU time is what a loaded, shared machine distorts least.
        result["cpu_ratio_vs_rio_tiler"] = (
            result["tiles"]["cpu_median_ms"] / result["rio_tiler"]["cpu_median_ms"]
        )
        result["ratio_vs_naive"] = med / result["naive"]["median_ms"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=40000, help="side of the big raster")
    parser.add_argument("--naive-size", type=int, default=4000, help="side of the naive raster")
    parser.add_argument("--chips", type=int, default=60)
    parser.add_argument("--chip-size", type=int, default=512)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    root = bench_dir()
    big = make_tiled_raster(root / f"bench_{args.size}.tif", args.size)
    small = make_tiled_raster(
        root / f"bench_{args.naive_size}.tif", args.naive_size, overviews=False
    )
    r = run_benchmark(big, small, args.chips, args.chip_size)
    t, tn, rt = r["tiles"], r["tiles_nearest"], r["rio_tiler"]
    print(
        f"raster: {big} ({args.size}x{args.size}, {big.stat().st_size / 2**20:.0f} MiB), "
        f"{args.chips} chips of {args.chip_size} px, load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} CPUs"
    )
    print(
        f"tiles.chip (bilinear) median {t['median_ms']:7.1f} ms  p95 {t['p95_ms']:7.1f} ms  "
        f"cpu {t['cpu_median_ms']:6.1f} ms  peak RSS growth {t['rss_growth_mb']:.1f} MB"
    )
    print(
        f"tiles.chip (nearest)  median {tn['median_ms']:7.1f} ms  p95 {tn['p95_ms']:7.1f} ms  "
        f"cpu {tn['cpu_median_ms']:6.1f} ms"
    )
    print(
        f"rio-tiler part        median {rt['median_ms']:7.1f} ms  p95 {rt['p95_ms']:7.1f} ms  "
        f"cpu {rt['cpu_median_ms']:6.1f} ms"
    )
    print(
        f"naive read+crop of a {args.naive_size} px raster median {r['naive']['median_ms']:7.1f} ms"
    )
    print(
        f"ratio tiles/rio-tiler {r['ratio_vs_rio_tiler']:.2f} (cpu "
        f"{r['cpu_ratio_vs_rio_tiler']:.2f})  tiles/naive {r['ratio_vs_naive']:.3f}"
    )
    ok = t["median_ms"] <= 50 and t["rss_growth_mb"] <= 100
    print(f"goal (median <= 50 ms, RSS growth <= 100 MB): {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
