"""Fixtures for the tiles tests: small rasters generated on the fly, plus the Kampala demo."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "assets" / "demo" / "kampala" / "oam_rgb_epsg3857.tif"

# Where generated rasters sit on Earth: Kampala, so UTM zone 36N is the natural projected CRS.
LON, LAT = 32.5947, 0.3509
CRS_PARAMS = {
    # crs: (pixel size, x origin, y origin) of a north-up grid around (LON, LAT)
    "EPSG:4326": (1e-5, LON - 0.01, LAT + 0.01),
    "EPSG:3857": (1.0, 3628400.0 - 1000.0, 39060.0 + 1000.0),
    "EPSG:32636": (1.0, 454000.0 - 1000.0, 38800.0 + 1000.0),
}


def write_raster(
    path: Path,
    data: np.ndarray,
    *,
    crs: str | None = "EPSG:3857",
    res: float | None = None,
    origin: tuple[float, float] | None = None,
    nodata: float | None = None,
    tiled: bool = False,
    block: int = 256,
    overviews: Sequence[int] = (),
    descriptions: Sequence[str] | None = None,
    colorinterp: Sequence[Any] | None = None,
    driver: str = "GTiff",
    **extra: Any,
) -> Path:
    """Write ``data`` (bands, H, W) as a raster; georeferenced around Kampala unless crs=None."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.transform import from_origin

    count, height, width = data.shape
    profile: dict[str, Any] = dict(
        driver=driver, width=width, height=height, count=count, dtype=data.dtype.name, **extra
    )
    if crs is not None:
        default_res, x0, y0 = CRS_PARAMS.get(crs, (1.0, 0.0, 0.0))
        res = res or default_res
        x, y = origin or (x0, y0)
        profile.update(crs=crs, transform=from_origin(x, y, res, res))
    if nodata is not None:
        profile["nodata"] = nodata
    if tiled:
        profile.update(tiled=True, blockxsize=block, blockysize=block)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if descriptions:
            for i, d in enumerate(descriptions, start=1):
                dst.set_band_description(i, d)
        if colorinterp:
            dst.colorinterp = colorinterp
        if overviews:
            dst.build_overviews(list(overviews), Resampling.average)
    return path


def gradient(
    count: int, height: int, width: int, dtype: str = "uint8", scale: float = 1.0
) -> np.ndarray:
    """Bands that differ and vary smoothly, so resampling and band order are visible."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    bands = [(xx * (i + 1) + yy * (count - i)) % 251 for i in range(count)]
    return (np.stack(bands) * scale).astype(dtype)


@pytest.fixture
def raster_factory(tmp_path: Path) -> Callable[..., Path]:
    counter = iter(range(10_000))

    def make(data: np.ndarray | None = None, name: str | None = None, **kwargs: Any) -> Path:
        if data is None:
            data = gradient(3, 200, 300)
        path = tmp_path / (name or f"r{next(counter)}.tif")
        return write_raster(path, data, **kwargs)

    return make


@pytest.fixture(scope="session")
def demo_raster() -> Path:
    assert DEMO.is_file(), "the Kampala demo raster ships with the repository"
    return DEMO


@pytest.fixture(scope="session")
def demo_tiles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A z/x/y folder and an MBTiles file rendered from the demo raster (zooms 17-19)."""
    import sqlite3

    import mercantile

    import tiles

    root = tmp_path_factory.mktemp("xyz")
    folder = root / "tiles"
    mbtiles = root / "demo.mbtiles"
    db = sqlite3.connect(mbtiles)
    db.executescript(
        "CREATE TABLE metadata (name TEXT, value TEXT);"
        "CREATE TABLE tiles (zoom_level INTEGER, tile_column INTEGER, "
        "tile_row INTEGER, tile_data BLOB);"
    )
    with tiles.open_source(DEMO) as src:
        w, s, e, n = src.bounds_lonlat
        db.executemany(
            "INSERT INTO metadata VALUES (?, ?)",
            [("name", "demo"), ("format", "png"), ("bounds", f"{w},{s},{e},{n}")],
        )
        zooms = (17, 18, 19)
        for t in mercantile.tiles(w, s, e, n, zooms):
            tb = mercantile.xy_bounds(t)
            chip = src.chip(
                (tb.left, tb.bottom, tb.right, tb.top), crs="EPSG:3857", size=(256, 256)
            )
            rgba = np.dstack(
                [
                    chip.pixels,
                    (chip.mask if chip.mask is not None else np.ones(chip.pixels.shape[:2], bool))
                    * 255,
                ]
            )
            from PIL import Image

            out = folder / str(t.z) / str(t.x) / f"{t.y}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgba.astype(np.uint8), "RGBA").save(out)
            # MBTiles rows are TMS: counted from the south.
            db.execute(
                "INSERT INTO tiles VALUES (?, ?, ?, ?)",
                (t.z, t.x, (1 << t.z) - 1 - t.y, out.read_bytes()),
            )
    db.commit()
    db.close()
    return {"folder": folder, "mbtiles": mbtiles, "bounds_lonlat": (w, s, e, n)}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiles tests never touch the network: any HTTP attempt fails the test."""
    import requests

    def _refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access attempted: {args[1:] or kwargs}")

    monkeypatch.setattr(requests.Session, "request", _refuse)
    monkeypatch.setenv("RSVLM_TILE_CACHE", "/nonexistent/rsvlm-tile-cache")


@pytest.fixture
def make_data() -> Callable[..., np.ndarray]:
    """The `gradient` helper, for tests that build their own band data."""
    return gradient
