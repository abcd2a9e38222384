"""Generated regions (a GeoTIFF + OSM-like GeoJSON) for tests, benchmarks and smoke runs.

Objects are drawn into the raster, so the pixels agree with the vectors: buildings are bright
roofs, roads grey lines, parking lots dark asphalt, water blue, trees green dots. The raster is
written block by block, so a 10k x 10k region needs little memory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

_COLORS = {"building": (205, 120, 90), "road": (128, 128, 128), "parking": (60, 60, 66),
           "water": (40, 80, 160), "tree": (30, 110, 40)}


def make_region(out_dir: str | Path, width: int = 1024, height: int = 1024, *,
                res: float = 0.3, n_buildings: int = 120, n_roads: int = 3, n_parking: int = 2,
                n_water: int = 1, n_trees: int = 40, seed: int = 0,
                crs: str = "EPSG:32636", origin: tuple[float, float] = (500000.0, 40000.0),
                block: int = 1024) -> tuple[Path, Path]:
    """Write `image.tif` and `osm.geojson` into out_dir; returns their paths."""
    from rasterio.transform import from_origin
    from shapely.geometry import mapping

    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x0, y0 = origin
    transform = from_origin(x0, y0, res, res)
    area = (x0, y0, width * res, height * res)
    feats = _features(rng, area, n_water=n_water, n_parking=n_parking, n_roads=n_roads,
                      n_buildings=n_buildings, n_trees=n_trees)
    tif = out / "image.tif"
    _write_raster(tif, feats, width, height, crs, transform, seed, block)
    gj = out / "osm.geojson"
    features = [{"type": "Feature", "properties": tags, "geometry": mapping(g)}
                for g, tags, _ in feats]
    gj.write_text(json.dumps({"type": "FeatureCollection",
                              "crs": {"type": "name", "properties": {"name": crs}},
                              "features": features}))
    return tif, gj


def _rect(cx: float, cy: float, w: float, h: float, angle: float) -> Any:
    from shapely.geometry import Polygon

    c, s = math.cos(angle), math.sin(angle)
    pts = [(dx * c - dy * s + cx, dx * s + dy * c + cy)
           for dx, dy in ((-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2))]
    return Polygon(pts)


def _features(rng: np.random.Generator, area: tuple[float, float, float, float], *,
              n_water: int, n_parking: int, n_roads: int, n_buildings: int,
              n_trees: int) -> list[tuple[Any, dict, str]]:
    """(geometry, OSM tags, kind) of the region's objects; ``area`` is (x0, y0, W, H) in CRS
    units, with y0 the top edge."""
    from shapely.geometry import LineString, Point

    x0, y0, W, H = area
    feats: list[tuple[Any, dict, str]] = []
    for i in range(n_water):
        cx, cy = x0 + rng.uniform(0.1, 0.9) * W, y0 - rng.uniform(0.1, 0.9) * H
        r = rng.uniform(0.03, 0.08) * min(W, H)
        feats.append((Point(cx, cy).buffer(r, 16), {"natural": "water", "osm_id": 9000 + i},
                      "water"))
    for i in range(n_parking):
        cx, cy = x0 + rng.uniform(0.1, 0.9) * W, y0 - rng.uniform(0.1, 0.9) * H
        feats.append((_rect(cx, cy, rng.uniform(25, 60), rng.uniform(20, 40), 0.0),
                      {"amenity": "parking", "surface": "asphalt", "osm_id": 8000 + i},
                      "parking"))
    for i in range(n_roads):
        if i % 2 == 0:
            y = y0 - rng.uniform(0.05, 0.95) * H
            line = LineString([(x0, y), (x0 + W, y)])
        else:
            x = x0 + rng.uniform(0.05, 0.95) * W
            line = LineString([(x, y0), (x, y0 - H)])
        kind = ["residential", "tertiary", "service"][i % 3]
        feats.append((line, {"highway": kind, "surface": "asphalt", "name": f"Road {i}",
                             "osm_id": 7000 + i}, "road"))
    for i in range(n_buildings):
        cx, cy = x0 + rng.uniform(0.02, 0.98) * W, y0 - rng.uniform(0.02, 0.98) * H
        w, h = rng.uniform(6, 25), rng.uniform(6, 18)
        tags = {"building": ["yes", "house", "residential"][i % 3], "osm_id": 1000 + i,
                "source": "survey", "addr:street": "Main St"}
        if i % 7 == 0:
            tags["building:levels"] = str(1 + i % 4)
        feats.append((_rect(cx, cy, w, h, rng.uniform(0, math.pi)), tags, "building"))
    for i in range(n_trees):
        cx, cy = x0 + rng.uniform(0, 1) * W, y0 - rng.uniform(0, 1) * H
        feats.append((Point(cx, cy), {"natural": "tree", "osm_id": 6000 + i}, "tree"))
    return feats


def _write_raster(tif: Path, feats: list[tuple[Any, dict, str]], width: int, height: int,
                  crs: str, transform: Any, seed: int, block: int) -> None:
    """Draw the objects over a noisy grass background, block by block."""
    import rasterio
    from rasterio.features import rasterize
    from rasterio.windows import Window
    from shapely import STRtree, box

    profile = {"driver": "GTiff", "width": width, "height": height, "count": 3, "dtype": "uint8",
               "crs": crs, "transform": transform, "tiled": True, "blockxsize": 256,
               "blockysize": 256}
    # Drawn shapes per kind, with a spatial index so each block rasterizes only its own shapes.
    drawn: dict[str, list] = {}
    for g, _, kind in feats:
        g = g.buffer(3.0) if kind == "road" else g.buffer(2.0) if kind == "tree" else g
        drawn.setdefault(kind, []).append(g)
    trees = {k: STRtree(v) for k, v in drawn.items()}
    with rasterio.open(tif, "w", **profile) as ds:
        for r0 in range(0, height, block):
            for c0 in range(0, width, block):
                win = Window(c0, r0, min(block, width - c0), min(block, height - r0))
                wt = rasterio.windows.transform(win, transform)
                shape = (int(win.height), int(win.width))
                brng = np.random.default_rng([seed, r0, c0])
                base = np.array([150, 160, 110], np.float32)[:, None, None]  # dry grass
                img = np.clip(base + brng.normal(0, 12, (3, *shape)).astype(np.float32), 0,
                              255).astype(np.uint8)
                bounds = rasterio.windows.bounds(win, transform)
                for name in ("water", "parking", "road", "building", "tree"):
                    if name not in trees:
                        continue
                    idx = trees[name].query(box(*bounds))
                    if len(idx) == 0:
                        continue
                    geoms = [drawn[name][i] for i in sorted(idx)]
                    m = rasterize(geoms, out_shape=shape, transform=wt, fill=0,
                                  default_value=1, dtype="uint8").astype(bool)
                    for b in range(3):
                        img[b][m] = _COLORS[name][b]
                ds.write(img, window=win)
