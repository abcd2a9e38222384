"""Benchmark `build-data` on a generated 10k x 10k px region (GeoTIFF + OSM-like polygons).

Usage: .venv/bin/python scripts/bench_build_data.py [--size 10000] [--chip 512] [--keep DIR]
Prints the time to generate, to join OSM per chip, and to build the whole dataset.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=10000, help="raster side in pixels")
    ap.add_argument("--chip", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=0)
    ap.add_argument("--buildings-per-mpx", type=float, default=200.0,
                    help="buildings per million pixels (200 -> 20k on 10k x 10k)")
    ap.add_argument("--keep", default=None, help="keep generated data and output here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from training.build import BuildConfig, RegionBuilder, build_dataset
    from training.region import load_region
    from training.synthetic import make_region

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_build_"))
    mpx = args.size * args.size / 1e6
    t0 = time.perf_counter()
    make_region(work / "region", args.size, args.size, n_buildings=int(mpx * args.buildings_per_mpx),
                n_roads=max(2, args.size // 500), n_parking=int(mpx * 2), n_water=int(mpx / 10) + 1,
                n_trees=int(mpx * 50), seed=0)
    t_gen = time.perf_counter() - t0

    spec = load_region(work / "region", chip_size=args.chip, overlap=args.overlap)
    t0 = time.perf_counter()
    n_chips = len(RegionBuilder(spec, BuildConfig()).contexts(progress=True))
    t_join = time.perf_counter() - t0

    t0 = time.perf_counter()
    result = build_dataset(work / "out", [spec], [], BuildConfig(seed=0), progress=True)
    t_build = time.perf_counter() - t0
    splits = result.counts["splits"]
    report = {
        "raster_px": f"{args.size}x{args.size}", "chip": args.chip, "overlap": args.overlap,
        "chips": n_chips, "features": sum(result.counts["objects_per_class"].values()),
        "samples": sum(s["samples"] for s in splits.values()),
        "generate_s": round(t_gen, 1), "join_osm_s": round(t_join, 1),
        "build_total_s": round(t_build, 1), "chips_per_s": round(n_chips / t_build, 1),
        "out": str(work / "out"),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
