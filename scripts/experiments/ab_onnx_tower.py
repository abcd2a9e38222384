"""The detector's read of the benchmark chip (the Kampala demo raster at 512 px, read zoomed as
four crops) with the tower in ONNX Runtime (float32 and int8) and in PyTorch, interleaved in one
process so that a shared machine's drift falls on all alike; and how far the int8 read's
detections stray from the float32 read's on the same chip.

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
    import torch

    from rsvlm.answer import ground_sample_distance
    from rsvlm.detector import box_iou
    from rsvlm.engine import ChatEngine
    from rsvlm.loading import load
    from rsvlm.onnx_tower import OnnxTower
    from tiles import open_source

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    engine = ChatEngine(load(str(REPO / "assets" / "models" / "embedded")), decode_backend="onnx",
                        detector_tower="onnx", max_cached_sessions=1)
    perception = engine.perception
    if perception.onnx is None:
        raise SystemExit("the engine did not put the tower on ONNX Runtime here")
    cfg = perception.config
    int8 = OnnxTower(perception.vision, sorted(set(cfg.layers)), quantize="int8")
    int8.prepare(sorted({cfg.input_size, cfg.zoom_input_size or cfg.input_size}))
    if int8.failed:
        raise SystemExit(f"the int8 graphs of sizes {sorted(int8.failed)} failed their check")
    towers = {"onnx": perception.onnx, "onnx-int8": int8, "torch": None}
    with open_source(str(REPO / "assets" / "demo" / "kampala" / "oam_rgb_epsg3857.tif")) as src:
        chip = src.chip(None, size=512)
    image = chip.to_image()
    gsd = ground_sample_distance(chip, image.size)
    times: dict[str, list[float]] = {name: [] for name in towers}
    found = {}
    for _ in range(args.rounds + 1):  # the first round warms all up and is not counted
        for name, tower in towers.items():
            perception.onnx = tower
            start = time.perf_counter()
            found[name] = perception.detect(image, gsd)
            times[name].append(time.perf_counter() - start)
    median = {k: statistics.median(v[1:]) for k, v in times.items()}
    print(f"detector read, median of {args.rounds}: PyTorch {median['torch']:.3f} s, ONNX Runtime "
          f"float32 {median['onnx']:.3f} s, int8 {median['onnx-int8']:.3f} s; PyTorch / float32 "
          f"{median['torch'] / median['onnx']:.2f}, float32 / int8 "
          f"{median['onnx'] / median['onnx-int8']:.2f}")
    for kind in ("find_all", "count"):
        a = perception.select(found["onnx"], kind)
        b = perception.select(found["onnx-int8"], kind)
        same = 0
        if a and b:
            ta, tb = torch.tensor([d.box for d in a]), torch.tensor([d.box for d in b])
            pairs = box_iou(ta[:, None].expand(-1, len(b), 4).reshape(-1, 4),
                            tb[None].expand(len(a), -1, 4).reshape(-1, 4))
            iou = pairs.view(len(a), len(b))
            same = int((iou.max(dim=1).values >= 0.9).sum())
        print(f"{kind}: float32 {len(a)} detections, int8 {len(b)}; {same} of float32's have an "
              f"int8 box at IoU >= 0.9")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
