"""`rsvlm-train`: build-data, eval, probe, fit and finetune.

Each subcommand parses its arguments, calls one function of the package and prints a short
summary. User errors (bad paths, unreadable rasters, bad specs) print one line and exit with 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("training")


def _add_region_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chip-size", type=int, default=None, help="chip side in pixels (512)")
    p.add_argument("--overlap", type=int, default=None, help="overlap of neighbouring chips (0)")
    p.add_argument("--resolution", type=float, default=None,
                   help="output pixel size in raster CRS units (native)")
    p.add_argument("--seed", type=int, default=0)


def _lonlat_bbox(text: str) -> tuple[float, float, float, float]:
    from tiles.sources.base import check_bbox

    parts = [p for p in text.replace(" ", ",").split(",") if p]
    try:
        if len(parts) != 4:
            raise ValueError(f"expected 4 numbers, got {len(parts)}")
        return tuple(check_bbox([float(p) for p in parts]))  # type: ignore[return-value]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--bbox is W,S,E,N in lon/lat: {exc}") from exc


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rsvlm-train", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build-data", help="region(s) / image folders -> instruction dataset")
    b.add_argument("--region", action="append", default=[], metavar="PATH",
                   help="region folder (rasters + OSM vectors), spec .yaml/.json, or a raster")
    b.add_argument("--image-folder", action="append", default=[], metavar="DIR",
                   help="scene classification folder in ImageFolder layout")
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--bbox", type=_lonlat_bbox, default=None, metavar="W,S,E,N",
                   help="only chips that overlap this lon/lat area (default: whole regions)")
    _add_region_args(b)
    b.add_argument("--val-fraction", type=float, default=None, help="held-out share (0.1)")
    b.add_argument("--block-chips", type=int, default=None,
                   help="split block side in chips; val blocks are spatially separate (4)")
    b.add_argument("--tasks", default="caption,vqa,grounding,region",
                   help="comma-separated region tasks")
    b.add_argument("--no-balance", action="store_true", help="keep unbalanced VQA answers")
    b.add_argument("--augment", type=int, default=0, metavar="N",
                   help="also write N rotated/mirrored views of every training chip and "
                        "classification image (0-7), boxes and positions moved along (0)")
    b.add_argument("--rewrite-model", default=None, metavar="DIR",
                   help="local causal LM folder to paraphrase captions (slow; optional)")
    b.add_argument("--osm", default=None, metavar="auto|FILE",
                   help="OSM features for the regions' area, in place of their vector files: "
                        "'auto' asks Overpass when online (answers cached on disk), FILE is a "
                        "local .osm.pbf extract or a vector file (default: the regions' files)")
    b.add_argument("--overpass-url", default=None, metavar="URL",
                   help="Overpass interpreter URL for --osm auto (default $RSVLM_OVERPASS_URL "
                        "or overpass-api.de)")
    b.add_argument("--quiet", action="store_true", help="no progress bars")

    e = sub.add_parser("eval", help="evaluate a model on classification / vqa / grounding / "
                                    "captioning")
    e.add_argument("--model", default=None, help="preset name or model folder (default model)")
    e.add_argument("--task", required=True,
                   choices=["classification", "vqa", "grounding", "findall", "captioning"],
                   help="findall: 'find all buildings' on every chip, precision / recall / F1 "
                        "at IoU 0.5 against the footprints and the box count per chip")
    e.add_argument("--data", required=True,
                   help="a build-data folder (scores its --split), an ImageFolder "
                        "(classification) or a region")
    e.add_argument("--ablate", default="", metavar="PARTS",
                   help="switch trained parts off at inference: experts, retrieval, box_head, "
                        "detector, scene, answer_form (comma list)")
    e.add_argument("--as-typed", action="store_true",
                   help="ask without the answer-format instruction the questions carry "
                        "('Answer with a single word or number.'), as an analyst types them")
    e.add_argument("--split", default="val", choices=("val", "train"),
                   help="split of a build-data folder to score (val)")
    e.add_argument("--out", default=None, help="report JSON path")
    e.add_argument("--limit", type=int, default=None, help="evaluate at most N items")
    e.add_argument("--device", default=None)
    e.add_argument("--max-new-tokens", type=int, default=64)
    _add_region_args(e)

    pr = sub.add_parser("probe", help="linear probe on the frozen vision tower (ImageFolder)")
    pr.add_argument("--data", required=True, help="ImageFolder root")
    pr.add_argument("--model", default=None, help="preset name or model folder")
    pr.add_argument("--layers", default=None, help="comma-separated layer indices (config's)")
    pr.add_argument("--train-per-class", type=int, default=25)
    pr.add_argument("--out", default=None)
    pr.add_argument("--seed", type=int, default=0)

    f = sub.add_parser("fit", help="curriculum training from a YAML/JSON config, or (--base) a "
                       "LoRA/QLoRA adapter on a pretrained backend")
    f.add_argument("--config", default=None, help="curriculum config (the rsvlm family)")
    f.add_argument("--base", default=None,
                   help="pretrained backend to adapt: hub id, folder or preset (qwen2.5-vl-7b ...)")
    f.add_argument("--data", default=None, help="with --base: a build-data folder")
    f.add_argument("--out", default=None, help="with --base: the adapter folder to write")
    f.add_argument("--qlora", action="store_true", help="with --base: train over the NF4 model")
    f.add_argument("--lr", type=float, default=1e-4)
    f.add_argument("--grad-accum", type=int, default=4)
    f.add_argument("--lora-r", type=int, default=16)
    f.add_argument("--limit", type=int, default=None, help="with --base: at most N examples")
    f.add_argument("--device", default=None, help="with --base: cpu to force the CPU")
    f.add_argument("--resume", default=None, help="checkpoint folder, 'latest', or 'auto' (latest if any, else start)")
    f.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps")
    ft = sub.add_parser("finetune", help="fine-tune the shipped model on a region in one "
                                         "command (data, perception head, the rest, scores)")
    ft.add_argument("--region", required=True,
                    help="region folder (raster + OSM vectors), spec .yaml/.json, or a raster")
    ft.add_argument("--out", required=True, help="run folder (run again to resume)")
    ft.add_argument("--model", default="embedded", help="preset with shipped parts")
    ft.add_argument("--chip-size", type=int, default=None)
    ft.add_argument("--box-epochs", type=float, default=6.0)
    ft.add_argument("--instruct-epochs", type=float, default=1.0)
    ft.add_argument("--detector-epochs", type=int, default=6,
                    help="the shipped detector on the region's training chips (0: keep it)")
    ft.add_argument("--eval-limit", type=int, default=None,
                    help="questions per task in the shipped-vs-tuned comparison (all)")
    ft.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps")
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from tiles.cli_args import attach_values

    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(attach_values(argv, ("--bbox",)))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # accelerate logs every file of every checkpoint at INFO.
        logging.getLogger("accelerate").setLevel(logging.WARNING)
    from tiles import ImageryError
    from training.classification import DatasetError
    from training.osm_source import OSMError
    from training.region import RegionError

    try:
        return _COMMANDS[args.command](args)
    except (RegionError, DatasetError, ImageryError, OSMError, FileNotFoundError,
            ValueError) as exc:
        if args.verbose:
            raise
        print(f"rsvlm-train {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _build_data(args: argparse.Namespace) -> int:
    from training.build import BuildConfig, build_dataset
    from training.osm_source import open_osm
    from training.region import load_region

    if not args.region and not args.image_folder:
        raise ValueError("give at least one --region or --image-folder")
    regions = [load_region(r, chip_size=args.chip_size, overlap=args.overlap,
                           resolution=args.resolution, val_fraction=args.val_fraction,
                           block_chips=args.block_chips) for r in args.region]
    rewrite = None
    if args.rewrite_model:
        from training.rewrite import LLMRewriter

        rewrite = LLMRewriter(args.rewrite_model)
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    osm = open_osm(args.osm, endpoint=args.overpass_url)
    config = BuildConfig(seed=args.seed, tasks=tasks, balance=not args.no_balance,
                         augment=args.augment, bbox_lonlat=args.bbox,
                         rewrite=rewrite, osm=osm)
    result = build_dataset(args.out, regions, args.image_folder, config,
                           folder_val_fraction=args.val_fraction or 0.1,
                           progress=not args.quiet)
    splits = result.counts["splits"]
    print(json.dumps({"out": str(result.out_dir),
                      **{k: {"samples": v["samples"], "tasks": v["tasks"]}
                         for k, v in splits.items()}}, indent=2))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate_cli

    report = evaluate_cli(args)
    print(json.dumps(report, indent=2))
    return 0


def _probe(args: argparse.Namespace) -> int:
    from training.probe import run_probe

    layers = [int(v) for v in args.layers.split(",")] if args.layers else None
    report = run_probe(args.data, model=args.model, layers=layers,
                       train_per_class=args.train_per_class, seed=args.seed)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


def _fit(args: argparse.Namespace) -> int:
    if args.base:
        from training.fit_pretrained import PretrainedFitConfig, fit_pretrained

        if not args.data or not args.out:
            raise ValueError("fit --base needs --data (a build-data folder) and --out")
        cfg = PretrainedFitConfig(base=args.base, data=args.data, output_dir=args.out,
                                  qlora=args.qlora, max_steps=args.max_steps or 200, lr=args.lr,
                                  grad_accum=args.grad_accum, lora_r=args.lora_r,
                                  lora_alpha=2 * args.lora_r, limit=args.limit, device=args.device)
        out = fit_pretrained(cfg)
        print(json.dumps({"adapter": str(out), "load_with": f"--model {args.base} --adapter {out}"},
                         indent=2))
        return 0
    if not args.config:
        raise ValueError("fit needs --config (curriculum) or --base (adapter on a pretrained model)")
    from training.fit import fit_from_config

    result = fit_from_config(args.config, resume=args.resume, max_steps=args.max_steps)
    print(json.dumps(result, indent=2))
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from training.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(region=args.region, out=args.out, model=args.model,
                         chip_size=args.chip_size, box_epochs=args.box_epochs,
                         instruct_epochs=args.instruct_epochs, eval_limit=args.eval_limit,
                         detector_epochs=args.detector_epochs, seed=args.seed)
    result = finetune(cfg, progress=not args.quiet, max_steps=args.max_steps,
                      say=lambda msg: print(msg, file=sys.stderr, flush=True))
    if "compare" in result:
        print(Path(result["compare"]).read_text())
    print(json.dumps(result, indent=2))
    return 0


_COMMANDS = {"build-data": _build_data, "eval": _eval, "probe": _probe, "fit": _fit,
             "finetune": _finetune}


if __name__ == "__main__":
    raise SystemExit(main())
