"""`rsvlm` command line: ask a question about an image or a georeferenced area.

    rsvlm ask IMAGE "question" [--bbox W,S,E,N] [--region-box x1,y1,x2,y2] [--model PRESET|DIR] [--json]
    rsvlm scan RASTERS "find all X" --out detections.geojson [--engine local|ray] [--chip-size 512]
    rsvlm weights            # convert the embedded preset's offline weights into the cache
    rsvlm which [--gpu-memory-gb N] [--offline]   # which model would run (here), and why
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from rsvlm.decoding import MODES

logger = logging.getLogger("rsvlm")


def _floats(text: str, n: int, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != n:
        raise argparse.ArgumentTypeError(f"{what} needs {n} comma-separated numbers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rsvlm", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    ask = sub.add_parser("ask", help="ask a question about an image (GeoTIFF, PNG, JPEG, ...)")
    ask.add_argument("image", help="raster or plain image file")
    ask.add_argument("question")
    ask.add_argument(
        "--bbox",
        type=lambda t: _floats(t, 4, "--bbox"),
        help="W,S,E,N area of a georeferenced image (default: the whole image)",
    )
    ask.add_argument("--crs", default="EPSG:4326", help="CRS of --bbox (default EPSG:4326)")
    ask.add_argument("--size", type=int, default=512, help="chip size in pixels (longest side)")
    ask.add_argument(
        "--region-box",
        type=lambda t: _floats(t, 4, "--region-box"),
        help="x1,y1,x2,y2 chip pixels of a region to ask about",
    )
    ask.add_argument("--model", default=None, help="preset name (embedded, large) or a model dir")
    ask.add_argument("--max-new-tokens", type=int, default=256)
    ask.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    scan = sub.add_parser("scan", help="find objects over whole rasters by sliding chips")
    from rsvlm.scanning.cli import add_scan_arguments

    add_scan_arguments(scan)

    for command in (ask, scan):
        command.add_argument("--adapter", default=None,
                             help="LoRA adapter folder for a pretrained --model (rsvlm-train fit --base)")
        command.add_argument("--allow-untrained", action="store_true",
                             help="load a preset whose connector is untrained (large): answers are noise")
        command.add_argument("--no-context", action="store_true",
                             help="ablation: leave retrieved descriptions and OSM features out of the prompt")
        command.add_argument("--retriever", choices=["embedded", "none"], default="embedded",
                             help="for a pretrained --model: whose retrieved descriptions go into "
                             "the prompt (default: the embedded model's retriever)")
        command.add_argument("--osm", default=None,
                             help="OSM features (GeoJSON/GPKG) whose tags of each chip go into a "
                             "pretrained model's prompt")
        command.add_argument("--quantize", choices=["4bit", "none"], default=None,
                             help="4-bit NF4 (default on CUDA for pretrained models) or none")
        command.add_argument(
            "--decode",
            choices=["auto", *MODES],
            default="auto",
            help="who runs decode steps on the CPU (default: ONNX Runtime where it can, see "
            "rsvlm.decoding; onnx-int8 is faster and slightly less faithful)",
        )

    sub.add_parser("weights", help="convert the embedded preset's offline weights into the cache")
    which = sub.add_parser("which", help="say which model runs by default here, and why")
    which.add_argument("--gpu-memory-gb", type=float, default=None,
                       help="explain the choice for a machine with a CUDA GPU of this much memory")
    which.add_argument("--offline", action="store_true",
                       help="as if the Hugging Face hub were unreachable")
    return parser


def _load(args: argparse.Namespace):
    from rsvlm.loading import load

    quantize = None if args.quantize is None else args.quantize == "4bit"
    return load(args.model, quantize=quantize, adapter=args.adapter,
                allow_untrained=args.allow_untrained,
                retriever=None if args.retriever == "none" else args.retriever)


def _osm(args: argparse.Namespace):
    if not args.osm:
        return None
    from rsvlm.backends.semantics import osm_context

    return osm_context(args.osm)


def _which(args: argparse.Namespace) -> int:
    from rsvlm.backends.choice import explain
    from rsvlm.presets import _cuda_memory_gb

    memory = args.gpu_memory_gb if args.gpu_memory_gb is not None else _cuda_memory_gb()
    print(explain(cuda_memory_gb=memory, offline=True if args.offline else None))
    return 0


def _ask(args: argparse.Namespace) -> int:
    import tiles
    from rsvlm.engine import ChatEngine

    with tiles.open_source(args.image) as source:
        if not source.georeferenced:
            logger.warning("%s has no georeference: answering in pixel space only.", args.image)
        if args.bbox is not None and not source.georeferenced:
            raise tiles.ImageryError(f"--bbox needs a georeferenced image; {args.image} has none.")
        chip = source.chip(args.bbox, crs=args.crs, size=args.size)
    loaded = _load(args)
    logger.info("model: %s", loaded.info.get("summary", loaded.info))
    session = ChatEngine(
        loaded, max_new_tokens=args.max_new_tokens, decode_backend=args.decode,
        semantic_context=not args.no_context, osm=_osm(args),
    ).session(chip)
    stream = session.ask(args.question, region_box_px=args.region_box)
    if args.json:
        for _ in stream:
            pass
        print(json.dumps(session.last.to_dict(), indent=2))
    else:
        pieces = []
        for piece in stream:
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        streamed = "".join(pieces)
        if session.last.text != streamed.strip():  # the box head moved the LM's boxes
            print(f"with the box head's boxes: {session.last.text}")
        for box in session.last.boxes:
            where = box.to_dict()["geometry"]["coordinates"][0][:4] if box.geometry else \
                "pixel space"
            score = "" if box.score is None else f" score={box.score:.2f}"
            print(f"  [{box.name}]{score} px={tuple(round(v) for v in box.box_px)} {where}")
    return 0


def _scan(args: argparse.Namespace) -> int:
    from rsvlm.scanning.cli import run_scan

    return run_scan(args)


def main(argv: Sequence[str] | None = None) -> int:
    from tiles.cli_args import attach_values

    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(attach_values(argv, ("--bbox", "--region-box")))
    logging.basicConfig(
        level=logging.INFO if args.verbose or args.command == "weights" else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "ask":
            return _ask(args)
        if args.command == "scan":
            return _scan(args)
        if args.command == "weights":
            from rsvlm.weights import ensure_embedded_weights

            for name, path in ensure_embedded_weights().items():
                print(f"{name}: {path}")
            return 0
        if args.command == "which":
            return _which(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line for the user; the traceback with -v
        if args.verbose:
            logger.exception("failed")
        print(f"rsvlm: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
