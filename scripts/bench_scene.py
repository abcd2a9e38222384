"""Whole-scene benchmark: "find all buildings" over a large GeoTIFF with `rsvlm.scan` (native
resolution chips, merged across borders), timed, and scored against the mapped footprints
(precision / recall / F1 at IoU 0.5 in raster pixels).

    python scripts/bench_scene.py --raster ../shared/data/demo_region/zanzibar_tz/oam_rgb_epsg3857.tif \\
        --footprints ../shared/data/demo_region/zanzibar_tz/osm_buildings_epsg4326.geojson \\
        --detector runs/loro/folds/zanzibar_tz     # the fold's head: never trained on Zanzibar

Without ``--detector`` the model's own parts answer (the shipped detector when it has one,
else the language model with its box head).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pixel_boxes(detections: list, raster: Path) -> list[tuple[float, float, float, float]]:
    """Detections' EPSG:4326 geometries -> pixel boxes of the raster."""
    import rasterio
    from shapely.geometry import shape
    from shapely.ops import transform as shp_transform

    from tiles.geometry import transform_geometry

    with rasterio.open(raster) as src:
        crs, inv = src.crs, ~src.transform
    out = []
    for d in detections:
        geom = d.geometry if hasattr(d.geometry, "bounds") else shape(d.geometry)
        local = transform_geometry(geom, "EPSG:4326", crs.to_string())
        px = shp_transform(lambda x, y, z=None: inv * (x, y), local)
        out.append(px.bounds)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raster", required=True)
    ap.add_argument("--footprints", required=True)
    ap.add_argument("--detector", default=None, help="trained parts folder holding detector/")
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--question", default="Find all buildings in the image.")
    ap.add_argument("--chip-size", type=int, default=512)
    ap.add_argument("--overlap", type=float, default=0.125)
    ap.add_argument("--out", default=None, help="report JSON")
    args = ap.parse_args(argv)

    import torch

    from rsvlm.engine import ChatEngine
    from rsvlm.loading import load
    from rsvlm.perception import Perception
    from rsvlm.scan import scan
    from tiles import open_source
    from training.labelled import read_vector_set
    from training.metrics import detection_scores, match_boxes

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    loaded = load(args.model, device="cpu")
    engine = ChatEngine(loaded)
    if args.detector:
        fold = Perception.load(args.detector, loaded.model.vision_tower.model,
                               loaded.processor.image_processor)
        if fold is None:
            raise SystemExit(f"{args.detector} holds no detector/")
        engine.use_detector(fold)  # its tower read as the engine reads the shipped one's
    load_s = time.perf_counter() - t0
    raster = Path(args.raster)
    t1 = time.perf_counter()
    with open_source(str(raster)) as source:
        result = scan(source, args.question, engine=engine, chip_size=args.chip_size,
                      overlap=args.overlap, batch_size=4)
    scan_s = time.perf_counter() - t1
    truth = read_vector_set(raster, Path(args.footprints), "scene")
    pred = pixel_boxes(list(result), raster)
    tp = match_boxes(pred, [tuple(b) for b in truth.boxes.tolist()])
    report = {"raster": str(raster), "size": truth.size, "detector": args.detector,
              "question": args.question, "chips": result.chips_total, "scan_s": round(scan_s, 1),
              "load_s": round(load_s, 1), "threads": torch.get_num_threads(),
              "detector_tower": engine.info.get("detector_tower"),
              **detection_scores(tp, len(pred), len(truth.boxes))}
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
