"""Scanning many rasters: sources, plan, engines (local / Ray), resumable GeoParquet output.

`rsvlm.scan` asks one question of every chip of *one* raster in this process. This package
scales that to a city's or a country's imagery: a folder, a list, a glob or a STAC catalogue of
rasters, windows listed lazily, chips read in tasks, the model in a pool of Ray actors, raw
boxes streamed into partitioned GeoParquet with a manifest that lets a killed run resume, and
one merged output at the end. docs/scanning.md tells how to run it on a cluster.
"""

from rsvlm.scanning.models import FakeAnswerer, ModelAnswerer
from rsvlm.scanning.run import scan_rasters
from rsvlm.scanning.sources import RasterRef, SourceListError, list_rasters

__all__ = [
    "FakeAnswerer",
    "ModelAnswerer",
    "RasterRef",
    "SourceListError",
    "list_rasters",
    "scan_rasters",
]
