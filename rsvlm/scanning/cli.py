"""The options of `rsvlm scan` and what it does with them."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

logger = logging.getLogger("rsvlm")


def add_scan_arguments(scan: argparse.ArgumentParser) -> None:
    scan.add_argument(
        "raster",
        help="what to scan: a georeferenced raster (GeoTIFF/COG), a folder of rasters, a text "
        "file listing rasters (.txt), a quoted glob ('tiles/*.tif') or a STAC catalogue / "
        "ItemCollection (.json)",
    )
    scan.add_argument("question", help='what to look for, e.g. "find all buildings"')
    scan.add_argument("--out", help="merged detections: .geojson, .gpkg or .parquet (GeoParquet)")
    scan.add_argument("--gpkg", action="store_true", help="write --out as a GeoPackage")
    scan.add_argument("--model", default=None, help="preset name (embedded, large) or a model dir")
    scan.add_argument(
        "--fake-model", type=float, nargs="?", const=0.0, default=None, metavar="DELAY_S",
        help="no model: one canned box per chip (after DELAY_S seconds per batch)",
    )  # fmt: skip
    scan.add_argument("--chip-size", type=int, default=512, help="chip side in raster pixels")
    scan.add_argument("--overlap", type=float, default=0.125, help="overlap between chips (0-0.9)")
    scan.add_argument("--batch-size", type=int, default=4, help="chips per generate call (per actor)")
    scan.add_argument("--iou", type=float, default=0.5, help="IoU for merging/NMS")
    scan.add_argument("--max-new-tokens", type=int, default=256)
    scan.add_argument("--asset", default=None, help="STAC asset key (default: visual, image, ...)")
    scan.add_argument(
        "--run-dir", default=None,
        help="folder of the partitioned GeoParquet and the resume manifest (default OUT.scan)",
    )  # fmt: skip
    scan.add_argument("--restart", action="store_true", help="discard a previous run in --run-dir")
    scan.add_argument(
        "--flush-every", type=int, default=64, metavar="N",
        help="windows per GeoParquet part; a killed run loses at most this many (default 64)",
    )  # fmt: skip
    scan.add_argument("--engine", choices=["local", "ray"], default="local")
    ray = scan.add_argument_group("ray engine")
    ray.add_argument("--address", default=None, help="join this Ray cluster (e.g. auto, ray://h:10001)")
    ray.add_argument("--actors", type=int, default=None, help="model actors (default: one per GPU)")
    ray.add_argument("--cpus-per-actor", type=float, default=None)
    ray.add_argument("--gpus-per-actor", type=float, default=None, help="default 1 with GPUs, else 0")
    scan.add_argument("--summary", default=None, help="also write the run summary (JSON) here")
    scan.add_argument("--json", action="store_true", help="print the run summary as JSON")


def run_scan(args: argparse.Namespace) -> int:
    from rsvlm.scanning.models import FakeAnswerer, ModelAnswerer
    from rsvlm.scanning.ray_engine import RayOptions
    from rsvlm.scanning.run import scan_rasters

    if args.fake_model is not None:
        answerer: Any = FakeAnswerer(delay_s=args.fake_model)
    else:
        answerer = ModelAnswerer(
            args.model,
            args.decode,
            args.max_new_tokens,
            quantize=None if args.quantize is None else args.quantize == "4bit",
            adapter=args.adapter,
            allow_untrained=args.allow_untrained,
            retriever=None if args.retriever == "none" else args.retriever,
            context=not args.no_context,
            osm=args.osm,
        )
    summary = scan_rasters(
        args.raster,
        args.question,
        answerer=answerer,
        engine=args.engine,
        out=args.out,
        out_format="gpkg" if args.gpkg else None,
        run_dir=args.run_dir,
        asset=args.asset,
        chip_size=args.chip_size,
        overlap=args.overlap,
        batch_size=args.batch_size,
        iou_threshold=args.iou,
        restart=args.restart,
        flush_windows=args.flush_every,
        ray_options=RayOptions(
            address=args.address,
            actors=args.actors,
            cpus_per_actor=args.cpus_per_actor,
            gpus_per_actor=args.gpus_per_actor,
        ),
        show_progress=True,
    )
    text = json.dumps(summary, indent=1)
    if args.summary:
        with open(args.summary, "w", encoding="utf-8") as fh:
            fh.write(text)
    if args.json:
        print(text)
    else:
        _report(summary)
    ok = summary["complete"] and not summary["rasters"]["failed"]
    return 0 if ok else 1


def _report(s: dict[str, Any]) -> None:
    w, r = s["windows"], s["rasters"]
    print(
        f"{s['detections']['written']} detections from {s['detections']['raw_boxes']} boxes in "
        f"{w['read']} windows of {r['scanned']} raster(s) ({s['windows_per_s']:.2f} windows/s) "
        f"-> {s['out'] or s['run_dir']}"
    )
    for f in r["failed"]:
        print(f"skipped raster {f['name']}: {f['error']}", file=sys.stderr)
    if w["failed"] or w["remaining"]:
        print(
            f"{w['failed']} window(s) failed, {w['remaining']} not finished: run the same "
            f"command again to retry them (run folder {s['run_dir']}).",
            file=sys.stderr,
        )
