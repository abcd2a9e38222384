"""Imagery in and out: sources, chips with their georeference, overlays and exports.

`tiles` is the only package that knows about CRSs and affine transforms. It depends on none of
the project's other packages, and the names below are its interface: `app` imports nothing else
from it.
"""

from tiles.atomic import atomic_path
from tiles.chip import Chip
from tiles.errors import ImageryError
from tiles.export import Detection, to_feature_collection, write_geojson, write_gpkg
from tiles.grid import ChipBox, Window, grid_windows, merge_boxes, merge_detections, metric_crs
from tiles.limits import release_memory, tune_allocator
from tiles.overlay import Overlay, overlay_from_chip
from tiles.sources import (
    PlainImageSource,
    RasterSource,
    Source,
    XYZSource,
    open_source,
    output_shape,
)
from tiles.sources.area import AreaSource
from tiles.sources.base import check_bbox, intersects

__all__ = [
    "AreaSource",
    "Chip",
    "ChipBox",
    "Detection",
    "ImageryError",
    "Overlay",
    "PlainImageSource",
    "RasterSource",
    "Source",
    "Window",
    "XYZSource",
    "atomic_path",
    "check_bbox",
    "grid_windows",
    "intersects",
    "merge_boxes",
    "merge_detections",
    "metric_crs",
    "open_source",
    "output_shape",
    "overlay_from_chip",
    "release_memory",
    "to_feature_collection",
    "write_geojson",
    "tune_allocator",
    "write_gpkg",
]
