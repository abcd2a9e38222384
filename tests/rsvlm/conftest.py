"""Fixtures of the rsvlm tests: rasters for the multi-raster scan tests."""

from __future__ import annotations

from typing import Any

import pytest


def _write_tile_grid(
    folder: Any,
    rows: int = 2,
    cols: int = 2,
    width: int = 400,
    height: int = 300,
    *,
    crs: str = "EPSG:32636",
    origin: tuple[float, float] = (455_000.0, 40_000.0),
    pixel: float = 1.0,
) -> list[Any]:
    """Abutting random GeoTIFF tiles ``t_<row>_<col>.tif`` (an orthophoto tile set), 1 m pixels.

    Tile (r, c) has its top-left corner at ``origin + (c * width, -r * height) * pixel``.
    """
    from pathlib import Path

    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for r in range(rows):
        for c in range(cols):
            path = folder / f"t_{r}_{c}.tif"
            rng = np.random.default_rng(r * cols + c)
            x, y = origin[0] + c * width * pixel, origin[1] - r * height * pixel
            with rasterio.open(
                path, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8",
                crs=crs, transform=from_origin(x, y, pixel, pixel),
            ) as ds:  # fmt: skip
                ds.write(rng.integers(0, 255, (3, height, width), dtype=np.uint8))
            paths.append(path)
    return paths


@pytest.fixture(scope="session")
def write_tile_grid():
    """`_write_tile_grid` (a function, so module-scoped fixtures can build rasters too)."""
    return _write_tile_grid
