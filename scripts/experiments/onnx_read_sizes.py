"""The detector on chips of every ground sample distance a drawn box takes (512 px at 0.075 -
0.15 m, read at 224 - 448 px), as the engine loads it: time of each read, the graphs open and
the process's resident memory after each. Shows what a server pays for a new read size.

    python scripts/experiments/onnx_read_sizes.py [--gsds 0.075,0.08,...]
"""

from __future__ import annotations

import argparse
import time

import psutil
from PIL import Image


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--raster", default="assets/demo/kampala/oam_rgb_epsg3857.tif")
    ap.add_argument("--gsds", default=",".join(f"{0.075 + 0.005 * i:.3f}" for i in range(16)))
    args = ap.parse_args()
    from rsvlm.engine import ChatEngine
    from rsvlm.loading import load
    from rsvlm.perception import read_size

    engine = ChatEngine(load(None), max_cached_sessions=1)
    perception = engine.perception
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(args.raster) as src:
        image = Image.fromarray(src.read([1, 2, 3], window=Window(0, 0, 512, 512))
                                .transpose(1, 2, 0))
    print(f"loaded: tower {engine.info.get('detector_tower')}, "
          f"graphs open {sorted(perception.onnx.sessions) if perception.onnx else []}, "
          f"RSS {rss_mb():.0f} MB")
    for gsd in [float(g) for g in args.gsds.split(",")]:
        size = read_size(512, gsd, perception.config.input_size, perception.config.trained_gsd)
        t0 = time.perf_counter()
        n = len(perception.detect(image, gsd))
        dt = time.perf_counter() - t0
        open_ = sorted(perception.onnx.sessions) if perception.onnx else []
        print(f"gsd {gsd:.3f} m: read at {size} px in {dt:.2f} s ({n} detections); "
              f"graphs open {open_}; RSS {rss_mb():.0f} MB", flush=True)


if __name__ == "__main__":
    main()
