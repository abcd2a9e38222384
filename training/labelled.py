"""Labelled object sets -> images with pixel boxes, for the dense detector and its
leave-one-region-out evaluation.

A *set* is one region: a place seen by one sensor (an OpenAerialMap demo area, SpaceNet Rio,
SpaceNet Atlanta, ...). Each loader returns `LabelledImage`s: an RGB array, the boxes of every
labelled object in pixels and their classes. Vector footprints are read in the raster's CRS;
masks become one box per connected component (adjacent buildings can merge: such a set's
instance counts are a floor). Nothing here is copied into the repo: the sets are read from
``../shared/data`` at run time (their licences say so).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DEMO_AREAS = ("kampala_ug", "zanzibar_tz", "banepa_np", "catanduanes_ph")


@dataclass
class LabelledImage:
    region: str
    name: str
    image: np.ndarray  # (H, W, 3) uint8
    boxes: np.ndarray  # (n, 4) float32 pixel x1, y1, x2, y2
    labels: list[str] = field(default_factory=list)
    gsd: float = 0.15  # metres per pixel, roughly
    tile: int | None = None  # scoring tile side in px (None: the evaluation's default)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.shape[1]), int(self.image.shape[0])


def _to_uint8(bands: np.ndarray) -> np.ndarray:
    """(bands, H, W) of any integer depth -> (H, W, 3) uint8 (2-98 % stretch beyond 8 bits)."""
    if bands.dtype != np.uint8:
        valid = bands[bands > 0]
        lo, hi = np.percentile(valid, (2, 98)) if valid.size else (0, 1)
        bands = np.clip((bands.astype(np.float32) - lo) / max(hi - lo, 1e-6) * 255, 0, 255)
        bands = bands.astype(np.uint8)
    if bands.shape[0] == 1:
        bands = np.repeat(bands, 3, axis=0)
    return np.ascontiguousarray(bands[:3].transpose(1, 2, 0))


def read_vector_set(raster: Path, vectors: Path, region: str, cls: str = "building",
                    gsd: float | None = None) -> LabelledImage:
    """A raster and its object footprints (any CRS) -> one image with pixel boxes."""
    import geopandas as gpd
    import rasterio

    with rasterio.open(raster) as src:
        image = _to_uint8(src.read())
        transform, crs = src.transform, src.crs
        res = abs(transform.a)
    shapes = gpd.read_file(vectors).to_crs(crs)
    inv = ~transform
    boxes = []
    for geom in shapes.geometry:
        if geom is None or geom.is_empty:
            continue
        x1, y1, x2, y2 = geom.bounds
        c1, r1 = inv * (x1, y2)
        c2, r2 = inv * (x2, y1)
        boxes.append((min(c1, c2), min(r1, r2), max(c1, c2), max(r1, r2)))
    h, w = image.shape[:2]
    arr = clip_boxes(np.asarray(boxes, np.float32).reshape(-1, 4), w, h)
    return LabelledImage(region, raster.parent.name, image, arr, [cls] * len(arr),
                         gsd if gsd is not None else res)


def mask_boxes(mask: np.ndarray, min_pixels: int = 12) -> np.ndarray:
    """One box per 8-connected component of a binary mask (specks under `min_pixels` dropped)."""
    from scipy import ndimage

    labels, n = ndimage.label(mask > 0, structure=np.ones((3, 3)))
    out = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None or (labels[sl] == i).sum() < min_pixels:
            continue
        out.append((sl[1].start, sl[0].start, sl[1].stop, sl[0].stop))
    return np.asarray(out, np.float32).reshape(-1, 4)


def clip_boxes(boxes: np.ndarray, width: int, height: int, min_side: float = 2.0) -> np.ndarray:
    """Boxes clipped to the image; those left thinner than `min_side` pixels dropped."""
    b = boxes.copy()
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, width)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, height)
    keep = ((b[:, 2] - b[:, 0]) >= min_side) & ((b[:, 3] - b[:, 1]) >= min_side)
    return b[keep]


def demo_area(root: Path, area: str) -> list[LabelledImage]:
    folder = root / "demo_region" / area
    return [read_vector_set(folder / "oam_rgb_epsg3857.tif",
                            folder / "osm_buildings_epsg4326.geojson", area, gsd=0.15)]


def spacenet_rio(root: Path) -> list[LabelledImage]:
    import rasterio

    folder = root / "labelled_more" / "spacenet1_rio"
    out = []
    for img in sorted((folder / "images").glob("*.tif")):
        with rasterio.open(img) as src:
            image = _to_uint8(src.read())
        with rasterio.open(folder / "building_masks" / img.name) as src:
            mask = src.read(1)
        boxes = mask_boxes(mask)
        out.append(LabelledImage("rio", img.stem, image, boxes, ["building"] * len(boxes), 0.5))
    return out


def spacenet_atlanta(root: Path) -> list[LabelledImage]:
    folder = root / "buildings" / "spacenet4_atlanta_pan_solaris"
    return [read_vector_set(folder / "pan_0p5m_epsg32616.tif",
                            folder / "buildings_epsg32616.geojson", "atlanta", gsd=0.5)]


# LoveDA's label ids (Wang et al. 2021): 0 no data, 1 background, 2 building, 3 road, ...
LOVEDA_BUILDING = 2


def loveda(root: Path) -> list[LabelledImage]:
    """LoveDA's three rural crops (Nanjing / Changzhou / Wuhan, 0.3 m aerial) of MMSegmentation's
    test data: a few farmsteads among fields, ponds and woods, each building mask a box. Most
    of what they teach is what is not a roof. (The ISPRS crops beside them are left out:
    Potsdam's 512 px at 5 cm hold two roofs cut by the edge, and Vaihingen's are false colour,
    near-infrared as red, which no analyst's RGB upload looks like.)"""
    from PIL import Image

    folder = root / "labelled_more" / "mmseg_test_samples" / "pseudo_loveda_dataset"
    out = []
    for img in sorted((folder / "img_dir").glob("*.png")):
        with Image.open(folder / "ann_dir" / img.name) as im:
            mask = np.asarray(im)
        boxes = mask_boxes(mask == LOVEDA_BUILDING)
        out.append(LabelledImage("loveda", img.stem, _read_rgb(img), boxes,
                                 ["building"] * len(boxes), 0.3))
    if not out:
        raise FileNotFoundError(f"no LoveDA crops in {folder}")
    return out


def _voc_boxes(xml: Path) -> np.ndarray:
    """Pascal VOC boxes (every object, whatever its name) in pixels."""
    import xml.etree.ElementTree as ET

    boxes = [[float(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
             for o in ET.parse(xml).getroot().iter("object")]
    return np.asarray(boxes, np.float32).reshape(-1, 4)


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# NEON AOP 10 cm tree-crown fixtures of the deepforest package, by site (Yellowstone, Ordway-Swisher
# in Florida, Soaproot Saddle in California): three forests, held out site by site.
NEON_SITES = {
    "trees_yell": ("deepforest_neon_extra", ("2019_YELL_2_541000_4977000_image_crop",
                                             "2019_YELL_2_528000_4978000_image_crop2")),
    "trees_osbs": ("deepforest_neon", ("OSBS_029",)),
    "trees_soap": ("deepforest_neon_extra", ("SOAP_061",)),
}


def neon_trees(root: Path, site: str) -> list[LabelledImage]:
    folder, stems = NEON_SITES[site]
    out = []
    for stem in stems:
        base = root / "detection" / folder / stem
        image_path = base.with_suffix(".png") if base.with_suffix(".png").is_file() else \
            base.with_suffix(".tif")
        if image_path.suffix == ".tif":
            import rasterio

            with rasterio.open(image_path) as src:
                image = _to_uint8(src.read())
        else:
            image = _read_rgb(image_path)
        h, w = image.shape[:2]
        boxes = clip_boxes(_voc_boxes(base.with_suffix(".xml")), w, h)
        out.append(LabelledImage(site, stem, image, boxes, ["tree"] * len(boxes), 0.1))
    return out


# Airbus's Pleiades airport sample (40 images of 2560 px at 0.5 m, unnamed airports): two
# halves by sorted file name, each held out from a head trained on the other.
AIRCRAFT_HALVES = {"aircraft_a": 0, "aircraft_b": 1}


def airbus_aircraft(root: Path, half: str) -> list[LabelledImage]:
    import ast
    import csv

    folder = root / "labelled_more" / "airbus_aircraft_pleiades"
    boxes: dict[str, list[list[float]]] = {}
    with open(folder / "annotations.csv", newline="") as f:
        for row in csv.DictReader(f):
            pts = np.asarray(ast.literal_eval(row["geometry"]), np.float32)
            boxes.setdefault(row["image_id"], []).append(
                [*pts.min(0).tolist(), *pts.max(0).tolist()])
    images = sorted(boxes)
    mine = images[: len(images) // 2] if AIRCRAFT_HALVES[half] == 0 else images[len(images) // 2:]
    out = []
    for name in mine:
        image = _read_rgb(folder / "images" / name)
        h, w = image.shape[:2]
        b = clip_boxes(np.asarray(boxes[name], np.float32).reshape(-1, 4), w, h)
        # 640 px (320 m) chips: an apron with a few aircraft, as an analyst would crop one.
        out.append(LabelledImage(half, Path(name).stem, image, b, ["aircraft"] * len(b), 0.5,
                                 tile=640))
    return out


SETS: dict[str, Callable[[Path], list[LabelledImage]]] = {
    **{a: (lambda root, a=a: demo_area(root, a)) for a in DEMO_AREAS},
    "rio": spacenet_rio,
    "atlanta": spacenet_atlanta,
}

# Building sets that are read when named (`scripts/loro.py --regions`) but are not among the
# regions every run trains on: LoveDA's crops cost the held-out OAM areas 0.01 of find-all F1
# (docs/benchmarks.md, round 17).
NAMED_SETS: dict[str, Callable[[Path], list[LabelledImage]]] = {"loveda": loveda}

# Sets of other classes than buildings, trained on alongside the building regions (every set
# labels one class), held out by site or by half (`scripts/loro_classes.py`).
CLASS_SETS: dict[str, Callable[[Path], list[LabelledImage]]] = {
    **{s: (lambda root, s=s: neon_trees(root, s)) for s in NEON_SITES},
    **{h: (lambda root, h=h: airbus_aircraft(root, h)) for h in AIRCRAFT_HALVES},
}

DETECTOR_CLASSES = ("building", "tree", "aircraft")


def set_class(name: str) -> str:
    """The one class a set labels (every box of its images)."""
    if name in NEON_SITES:
        return "tree"
    if name in AIRCRAFT_HALVES:
        return "aircraft"
    return "building"


def known_classes(name: str) -> set[str]:
    """The classes a set's images tell the detector about: the one it labels, and those known
    to be absent from its images, which are negatives for that class. Anything else in them
    (the trees of a town, the terminals of an airport) is unlabelled, and trains nothing.
    Towns have no aircraft, NEON's forest plots no buildings nor aircraft, and airport aprons
    are taken to have no trees: without such negatives outside forests, a tree channel would
    never learn that roofs and tarmac are not trees."""
    own = set_class(name)
    if own == "building":
        return {"building", "aircraft"}
    if own == "tree":
        return {"tree", "building", "aircraft"}
    return {"aircraft", "tree"}


def load_sets(root: str | Path, names: list[str] | None = None) -> dict[str, list[LabelledImage]]:
    """The labelled sets found under a shared data folder (missing ones are skipped, logged)."""
    root = Path(root)
    out = {}
    for name in names or list(SETS):
        try:
            out[name] = {**SETS, **NAMED_SETS, **CLASS_SETS}[name](root)
        except (FileNotFoundError, OSError) as exc:
            log.warning("labelled set %s not loaded: %s", name, exc)
    return out


def tiles(item: LabelledImage, size: int, min_visible: float = 0.5
          ) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Non-overlapping `size` tiles (the last row/column flush with the edge) with the boxes
    that keep at least `min_visible` of their area inside, clipped to the tile."""
    for name, crop, boxes, _ in cut_tiles(item, size, min_visible):
        yield name, crop, boxes


def cut_tiles(item: LabelledImage, size: int, min_visible: float = 0.5
              ) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """`tiles`, each with the boxes the tile's edge cuts below `min_visible` (`cut_boxes`)."""
    w, h = item.size
    if w <= size * 1.25 and h <= size * 1.25:  # a chip already: score it whole
        yield item.name, item.image, item.boxes, np.zeros((0, 4), np.float32)
        return
    xs = sorted({min(x, max(w - size, 0)) for x in range(0, w, size)})
    ys = sorted({min(y, max(h - size, 0)) for y in range(0, h, size)})
    for y in ys:
        for x in xs:
            crop = item.image[y:y + size, x:x + size]
            boxes, cut = cut_boxes(item.boxes, x, y, crop.shape[1], crop.shape[0], min_visible)
            yield f"{item.name}_{x}_{y}", crop, boxes, cut


def crop_boxes(boxes: np.ndarray, x: float, y: float, w: int, h: int,
               min_visible: float = 0.5) -> np.ndarray:
    """Boxes moved into a crop at (x, y) of size (w, h): those with at least `min_visible` of
    their area inside, clipped to it."""
    return cut_boxes(boxes, x, y, w, h, min_visible)[0]


def cut_boxes(boxes: np.ndarray, x: float, y: float, w: int, h: int,
              min_visible: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(`crop_boxes`, the boxes inside the crop by less than `min_visible` of their area,
    clipped): an object the crop's edge cuts that far is neither to be found nor background
    to a detector (`training.detection.train_detector`'s ``ignore``)."""
    if not len(boxes):
        empty = np.asarray(boxes, np.float32).reshape(0, 4)
        return empty, empty
    moved = boxes - np.array([x, y, x, y], np.float32)
    full = (moved[:, 2] - moved[:, 0]) * (moved[:, 3] - moved[:, 1])
    inside = moved.copy()
    inside[:, [0, 2]] = inside[:, [0, 2]].clip(0, w)
    inside[:, [1, 3]] = inside[:, [1, 3]].clip(0, h)
    visible = (inside[:, 2] - inside[:, 0]) * (inside[:, 3] - inside[:, 1])
    enough = visible >= min_visible * np.maximum(full, 1e-6)
    keep = (visible > 0) & enough
    cut = (visible > 0) & ~enough
    return clip_boxes(inside[keep], w, h), clip_boxes(inside[cut], w, h, min_side=1.0)
