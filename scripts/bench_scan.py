"""Windows/s of a multi-raster scan: local engine vs Ray with 1 and 2 actors, in one run.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python scripts/bench_scan.py --chip-size 384 \
        --out runs/bench_scan.json

``OMP_NUM_THREADS=1``: on a machine whose cores other work also uses, two OpenMP/ONNX Runtime
threads per model spin-wait for each other and cost 10x the CPU per window (measured: 35 vs
2.5 CPU-s); Ray sets it in its workers by itself, the local engine inherits the shell's.

The raster set is generated from the Kampala demo scene: it is cut into ``--grid`` abutting
GeoTIFF tiles (an orthophoto tile set), so the model sees real imagery and the scan crosses
raster seams. Each configuration scans the whole set from scratch (``restart``) with the same
model, question and grid; Ray runs share one local Ray started here with this machine's cores.

Reported per configuration: windows, wall seconds (model loading included), steady windows/s
(from the first answered batch to the last, i.e. without start-up), detections, and the peak
RSS of each process that held a model (the actors; for the local engine, this process).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEMO = ROOT / "assets" / "demo" / "kampala" / "oam_rgb_epsg3857.tif"


def make_tiles(folder: Path, cols: int, rows: int) -> list[Path]:
    """Cut the demo scene into ``cols`` x ``rows`` abutting GeoTIFF tiles."""
    import rasterio
    from rasterio.windows import Window, transform

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    with rasterio.open(DEMO) as src:
        tw, th = src.width // cols, src.height // rows
        for r in range(rows):
            for c in range(cols):
                win = Window(c * tw, r * th, tw, th)
                profile = {**src.profile, "width": tw, "height": th,
                           "transform": transform(win, src.transform)}  # fmt: skip
                path = folder / f"tile_{r}_{c}.tif"
                with rasterio.open(path, "w", **profile) as dst:
                    dst.write(src.read(window=win))
                paths.append(path)
    return paths


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def run_one(name: str, folder: Path, work: Path, args: argparse.Namespace, **kw) -> dict:
    from rsvlm.scanning import ModelAnswerer, scan_rasters

    marks: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    summary = scan_rasters(
        folder,
        args.question,
        answerer=ModelAnswerer(args.model, args.decode, args.max_new_tokens),
        out=work / f"{name}.parquet",
        chip_size=args.chip_size,
        batch_size=args.batch_size,
        restart=True,
        progress=lambda done, total: marks.append((time.perf_counter(), done)),
        **kw,
    )
    wall = time.perf_counter() - t0
    load = os.getloadavg()[0]
    steady = None
    if len(marks) >= 2 and marks[-1][0] > marks[0][0]:
        steady = (marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0])
    rss = summary["workers"]["peak_rss_mb"]
    row = {
        "config": name,
        "windows": summary["windows"]["read"],
        "failed": summary["windows"]["failed"],
        "wall_s": round(wall, 1),
        "windows_per_s_wall": round(summary["windows"]["read"] / wall, 3),
        "windows_per_s_steady": round(steady, 3) if steady else None,
        "model_s_per_window": summary["model_seconds_per_window"],
        "model_cpu_s_per_window": summary["model_cpu_seconds_per_window"],
        "detections": summary["detections"]["written"],
        "raw_boxes": summary["detections"]["raw_boxes"],
        "actors": summary["workers"]["actors"],
        "cpus_per_actor": summary["workers"].get("num_cpus"),
        "threads_per_actor": summary["workers"].get("threads") or _torch_threads(),
        "peak_rss_mb_per_model_process": sorted(rss.values()),
        "load_avg_1min_after": round(load, 1),  # other processes competing for the cores
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--grid", default="3x2", help="tiles across x down (default 3x2)")
    p.add_argument("--chip-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--model", default="embedded")
    p.add_argument("--decode", default="auto")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--question", default="Find all buildings in this image.")
    p.add_argument("--configs", default="local,ray1,ray2")
    p.add_argument("--out", default=None, help="write the results here as JSON")
    args = p.parse_args()

    from rsvlm.scanning.ray_engine import RayOptions

    cols, rows = (int(v) for v in args.grid.lower().split("x"))
    work = Path(tempfile.mkdtemp(prefix="bench_scan_"))
    folder = work / "tiles"
    make_tiles(folder, cols, rows)
    results = []
    for config in args.configs.split(","):
        if config == "local":
            results.append(run_one("local", folder, work, args, engine="local"))
        else:
            actors = int(config.removeprefix("ray"))
            results.append(run_one(config, folder, work, args, engine="ray",
                                   ray_options=RayOptions(actors=actors)))  # fmt: skip
    from rsvlm.scanning.windows import peak_rss_mb

    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},  # fmt: skip
        "set": {"source": str(DEMO.relative_to(ROOT)), "grid": args.grid,
                "chip_size": args.chip_size, "batch_size": args.batch_size},  # fmt: skip
        "model": args.model,
        "decode": args.decode,
        "driver_peak_rss_mb": round(peak_rss_mb(), 1),
        "results": results,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
