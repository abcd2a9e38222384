"""SpaceNet-1 Rio (``labelled_more/spacenet1_rio``: 15 chips of 0.5 m WorldView-2 with rasterised
building masks, no polygons) as a region folder that `rsvlm-train eval --data` reads like the
demo areas: the chips (linked, not copied: research data stays in ../shared/data) and one
GeoJSON of building footprints, each an 8-connected component of a mask (specks under 12 pixels
dropped, as `training.labelled.mask_boxes` does for the detector's folds; adjacent roofs that
touch in the mask stay one footprint).

    python scripts/rio_region.py --data ../shared/data --out runs/rio_region
    rsvlm-train eval --task grounding --data runs/rio_region --chip-size 400 ...

Rio is the labelled place nearest the issue's "dense city in 0.5 m satellite imagery", so this
is where referring grounding on another kind of region is measured (scripts/loro_refer.sh).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def footprints(mask_path: Path, min_pixels: int = 12) -> list[dict]:
    """GeoJSON features (EPSG:4326) of the mask's 8-connected components."""
    import rasterio
    from rasterio.features import shapes
    from rasterio.warp import transform_geom
    from scipy import ndimage
    from shapely.geometry import mapping, shape
    from shapely.ops import unary_union

    with rasterio.open(mask_path) as src:
        mask = src.read(1) > 0
        transform, crs = src.transform, src.crs
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3)))
    sizes = np.bincount(labels.ravel())
    parts: dict[int, list] = {}
    # 8-connectivity as in the label image; shapes() traces each component's pixels.
    for geom, value in shapes(labels.astype(np.int32), mask=labels > 0, connectivity=8,
                              transform=transform):
        parts.setdefault(int(value), []).append(shape(geom))
    out = []
    for value, polys in sorted(parts.items()):
        if sizes[value] < min_pixels:
            continue
        geom = transform_geom(crs, "EPSG:4326", mapping(unary_union(polys)))
        out.append({"type": "Feature", "geometry": geom,
                    "properties": {"building": "yes", "source": mask_path.stem}})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data", help="shared data folder")
    ap.add_argument("--out", default="runs/rio_region")
    args = ap.parse_args(argv)
    src = Path(args.data) / "labelled_more" / "spacenet1_rio"
    if not (src / "images").is_dir():
        print(f"SpaceNet Rio not found under {src}: nothing written", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    features = []
    for img in sorted((src / "images").glob("*.tif")):
        link = out / img.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(img.resolve())
        features += footprints(src / "building_masks" / img.name)
    (out / "buildings_epsg4326.geojson").write_text(json.dumps(
        {"type": "FeatureCollection", "features": features}))
    print(f"{out}: {len(list(out.glob('*.tif')))} chips, {len(features)} footprints")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
