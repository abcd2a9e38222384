"""``python -m tiles`` / ``rsvlm-tiles``: inspect imagery and cut chips.

python -m tiles info SRC
python -m tiles chip SRC --bbox W,S,E,N [--crs EPSG:4326] [--out-crs EPSG:32636]
                         [--size 512] [--bands 4,3,2] --out chip.tif|chip.png
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from tiles.chip import Chip
from tiles.cli_args import attach_values
from tiles.errors import ImageryError
from tiles.sources import open_source


def _numbers(text: str, kind: type = float) -> list:
    try:
        return [kind(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def _size(text: str) -> int | tuple[int, int]:
    values = _numbers(text.lower().replace("x", ","), int)
    if len(values) == 1:
        return values[0]
    if len(values) == 2:
        return (values[0], values[1])
    raise argparse.ArgumentTypeError(f"size is N or WxH, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tiles", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="print a JSON description of a source")
    info.add_argument("src", help="raster, image, MBTiles, tile folder, URL template or provider")
    info.add_argument("--allow-network", action="store_true")

    chip = sub.add_parser("chip", help="write a georeferenced chip (GeoTIFF) or a PNG")
    chip.add_argument("src")
    chip.add_argument(
        "--bbox",
        type=_numbers,
        default=None,
        help="W,S,E,N in --crs (pixels x1,y1,x2,y2 for images without a CRS); "
        "default: the whole source",
    )
    chip.add_argument("--crs", default="EPSG:4326", help="CRS of --bbox (default EPSG:4326)")
    chip.add_argument("--out-crs", default=None, help="reproject the chip (default: source CRS)")
    chip.add_argument(
        "--size",
        type=_size,
        default=512,
        help="longest side in px (the whole bbox is kept), or WxH",
    )
    chip.add_argument(
        "--bands",
        type=lambda t: _numbers(t, int),
        default=None,
        help="band numbers for R,G,B, e.g. 4,3,2",
    )
    chip.add_argument("--out", required=True, help="output .tif/.tiff (GeoTIFF) or .png/.jpg")
    chip.add_argument("--allow-network", action="store_true", help="download missing tiles")
    return parser


def write_chip(chip: Chip, out: str | Path) -> Path:
    """GeoTIFF (with CRS, transform and mask) for .tif/.tiff, else a picture via Pillow."""
    out = Path(out)
    if out.suffix.lower() in (".tif", ".tiff"):
        import numpy as np
        import rasterio
        from rasterio.crs import CRS as RioCRS

        profile = dict(
            driver="GTiff",
            width=chip.width,
            height=chip.height,
            count=3,
            dtype="uint8",
            transform=chip.transform,
            photometric="RGB",
            compress="deflate",
            crs=RioCRS.from_wkt(chip.crs.to_wkt()) if chip.crs is not None else None,
        )
        with rasterio.open(out, "w", **profile) as dst:
            dst.write(np.moveaxis(chip.pixels, -1, 0))
            if chip.mask is not None:
                dst.write_mask(chip.mask.astype("uint8") * 255)
    else:
        chip.to_image().save(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(attach_values(argv, ("--bbox",)))
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "info":
            with open_source(args.src, allow_network=args.allow_network) as src:
                print(json.dumps(src.info(), indent=2, default=str))
            return 0
        with open_source(args.src, allow_network=args.allow_network, bands=args.bands) as src:
            chip = src.chip(args.bbox, crs=args.crs, size=args.size, out_crs=args.out_crs)
        path = write_chip(chip, args.out)
        if not chip.georeferenced:
            print(
                "note: the source has no coordinate reference system; the chip is in pixel "
                "space only.",
                file=sys.stderr,
            )
        print(
            json.dumps(
                {
                    "out": str(path),
                    "width": chip.width,
                    "height": chip.height,
                    "crs": chip.crs.to_string() if chip.crs else None,
                    "bounds": list(chip.bounds),
                    "bounds_lonlat": chip.bounds_lonlat,
                    **chip.meta,
                },
                default=str,
            )
        )
        return 0
    except ImageryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
