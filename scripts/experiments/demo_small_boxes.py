"""Counts on small boxes drawn over the demo area, read as the app reads them, at the training
views' scale and blown up to the detector's input size (`DetectorConfig.trained_gsd` None).

Random square boxes of ``--side`` degrees over the Kampala demo raster, each read at 512 px as
the app's chip; the truth is the OSM footprints at least half inside. The shipped detector
trained on this area: an in-sample check of what an analyst sees, not a held-out measure.

    python scripts/experiments/demo_small_boxes.py --boxes 12
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "assets" / "demo" / "kampala"


def main(argv: list[str] | None = None) -> int:
    import geopandas as gpd
    import shapely

    from rsvlm.engine import ChatEngine
    from rsvlm.loading import load
    from tiles import open_source

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--boxes", type=int, default=12)
    ap.add_argument("--side", type=float, default=0.00036, help="degrees (about 40 m)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    footprints = gpd.read_file(DEMO / "osm_buildings_epsg4326.geojson")
    footprints["geometry"] = footprints.geometry.make_valid()
    engine = ChatEngine(load(str(REPO / "assets" / "models" / "embedded")),
                        max_cached_sessions=1)
    perception = engine.perception
    scale = perception.config.trained_gsd
    west, south, east, north = footprints.total_bounds
    rng = random.Random(args.seed)
    rows = []
    with open_source(str(DEMO / "oam_rgb_epsg3857.tif")) as src:
        for _ in range(args.boxes):
            x, y = rng.uniform(west, east - args.side), rng.uniform(south, north - args.side)
            box = shapely.box(x, y, x + args.side, y + args.side)
            near = footprints[footprints.intersects(box)].geometry
            truth = sum(g.intersection(box).area >= 0.5 * g.area for g in near)
            counts = []
            for trained_gsd in (scale, None):
                perception.config.trained_gsd = trained_gsd
                session = engine.session(src.chip((x, y, x + args.side, y + args.side),
                                                  size=512))
                for _ in session.ask("How many buildings are there?"):
                    pass
                counts.append(int(session.last.text.split()[0]))
            rows.append((truth, *counts))
    perception.config.trained_gsd = scale
    print("truth | training scale | input size")
    for row in rows:
        print(" | ".join(str(v) for v in row))
    for i, name in ((1, "training scale"), (2, "input size")):
        within = sum(abs(r[i] - r[0]) <= 0.2 * r[0] for r in rows)
        error = sum(abs(r[i] - r[0]) for r in rows)
        print(f"{name}: within 20 % {within} of {len(rows)}, absolute error {error}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
