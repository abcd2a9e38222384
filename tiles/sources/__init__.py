"""Imagery sources and `open_source`, which picks the right one for what it is given."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tiles.errors import ImageryError
from tiles.sources.base import MAX_CHIP_SIDE, Source, output_shape
from tiles.sources.plain import PlainImageSource
from tiles.sources.raster import NotARasterError, RasterSource
from tiles.sources.xyz import XYZSource, open_xyz

__all__ = [
    "MAX_CHIP_SIDE",
    "PlainImageSource",
    "RasterSource",
    "Source",
    "XYZSource",
    "open_source",
    "output_shape",
]

log = logging.getLogger(__name__)

#: Formats that are pictures unless they carry a CRS (world file + .aux.xml, GeoPackage...).
PICTURE_DRIVERS = {"PNG", "JPEG", "GIF", "BMP", "WEBP"}


def open_source(
    src: str | Path | Any,
    *,
    allow_network: bool = False,
    bands: Sequence[int] | None = None,
    stretch: Sequence[tuple[float, float]] | None = None,
    cache_dir: str | Path | None = None,
) -> Source:
    """Open imagery: a raster file, a plain picture, or XYZ tiles.

    ``src`` may be a path (GeoTIFF/COG or anything GDAL reads, PNG/JPEG), an MBTiles file, a
    ``z/x/y`` folder or local ``{z}/{x}/{y}`` template, a tile URL template, an xyzservices
    provider name (``"Esri.WorldImagery"``), or an image array / PIL image. The network is used
    only with ``allow_network=True``. ``bands``/``stretch``: see `RasterSource`.
    """
    if not isinstance(src, str | Path):
        return PlainImageSource(src)
    text = str(src)
    if not text.strip():
        raise ImageryError("No imagery given: the source path is empty.")
    xyz = open_xyz(text, allow_network=allow_network, cache_dir=cache_dir)
    if xyz is not None:
        return xyz
    path = Path(text)
    if not path.exists():
        raise ImageryError(
            f"{text!r} was not found: give an image or raster file, an MBTiles "
            "file, a z/x/y tile folder, a tile URL template or a tile provider "
            "name such as 'Esri.WorldImagery'."
        )
    if path.is_file() and path.stat().st_size == 0:
        raise ImageryError(f"{path.name!r} is an empty file.")
    try:
        with warnings.catch_warnings():
            # rasterio warns about pictures without a CRS; we handle that case ourselves.
            warnings.simplefilter("ignore")
            source = RasterSource(path, bands=bands, stretch=stretch)
    except NotARasterError as raster_error:
        try:  # formats Pillow reads and GDAL does not
            return PlainImageSource(path)
        except ImageryError:
            raise raster_error from None
    if source.crs is None and source.info()["driver"] in PICTURE_DRIVERS:
        source.close()
        return PlainImageSource(path)
    return source
