"""Imagery in and out: sources, chips with their georeference, overlays and exports.

`tiles` is the only package that knows about CRSs and affine transforms. It depends on none of
the project's other packages.
"""

from tiles.chip import Chip
from tiles.errors import ImageryError
from tiles.export import Detection, to_feature_collection, write_geojson, write_gpkg
from tiles.overlay import Overlay
from tiles.sources import (
    PlainImageSource,
    RasterSource,
    Source,
    XYZSource,
    open_source,
    output_shape,
)

__all__ = [
    "Chip",
    "Detection",
    "ImageryError",
    "Overlay",
    "PlainImageSource",
    "RasterSource",
    "Source",
    "XYZSource",
    "open_source",
    "output_shape",
    "to_feature_collection",
    "write_geojson",
    "write_gpkg",
]
