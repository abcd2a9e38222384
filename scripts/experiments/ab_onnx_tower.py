"""The detector's read of the benchmark chip (the Kampala demo raster at 512 px, read zoomed as
four crops) with the tower in ONNX Runtime and in PyTorch, interleaved in one process so that a
shared machine's drift falls on both alike.

    python scripts/experiments/ab_onnx_tower.py --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

REPO = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    from rsvlm.answer import ground_sample_distance
    from rsvlm.engine import ChatEngine
    from rsvlm.loading import load
    from tiles import open_source

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    engine = ChatEngine(load(str(REPO / "assets" / "models" / "embedded")), decode_backend="onnx",
                        max_cached_sessions=1)
    perception = engine.perception
    tower = perception.onnx
    if tower is None:
        raise SystemExit("the engine did not put the tower on ONNX Runtime here")
    with open_source(str(REPO / "assets" / "demo" / "kampala" / "oam_rgb_epsg3857.tif")) as src:
        chip = src.chip(None, size=512)
    image = chip.to_image()
    gsd = ground_sample_distance(chip, image.size)
    times: dict[str, list[float]] = {"onnx": [], "torch": []}
    for _ in range(args.rounds + 1):  # the first round warms both up and is not counted
        for name in times:
            perception.onnx = tower if name == "onnx" else None
            start = time.perf_counter()
            perception.detect(image, gsd)
            times[name].append(time.perf_counter() - start)
    perception.onnx = tower
    median = {k: statistics.median(v[1:]) for k, v in times.items()}
    print(f"detector read, median of {args.rounds}: ONNX Runtime {median['onnx']:.3f} s, "
          f"PyTorch {median['torch']:.3f} s, PyTorch / ONNX Runtime "
          f"{median['torch'] / median['onnx']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
