"""The scan grid (`tiles.grid`): windows over a raster, the metric CRS, merging across borders."""

from __future__ import annotations

import numpy as np
import pytest
from shapely.geometry import box as shapely_box

from tiles import ChipBox, ImageryError, grid_windows, merge_boxes, metric_crs

UTM = "EPSG:32636"


def test_grid_covers_the_raster_with_full_size_chips() -> None:
    windows = grid_windows((0, 0, 1000, 600), (1.0, 1.0), 256, 0.125)
    xs = sorted({w.bounds[0] for w in windows})
    assert xs[0] == 0 and max(w.bounds[2] for w in windows) == 1000
    assert all(
        w.bounds[2] - w.bounds[0] == 256 and w.bounds[3] - w.bounds[1] == 256 for w in windows
    )
    steps = np.diff(xs)
    assert steps.max() <= 224 and steps.min() > 0  # overlap of at least 32 px everywhere
    assert windows[0].outer == (True, False, False, True)  # top-left chip: left and top edges
    with pytest.raises(ImageryError, match="overlap"):
        grid_windows((0, 0, 10, 10), (1, 1), 256, 0.95)


def test_metric_crs_is_the_source_crs_or_a_utm_zone() -> None:
    assert metric_crs(UTM, (32.5, 0.3, 32.6, 0.4)).to_epsg() == 32636
    assert metric_crs("EPSG:4326", (32.5, 0.3, 32.6, 0.4)).to_epsg() == 32636
    assert metric_crs("EPSG:4326", (-70.1, -33.5, -70.0, -33.4)).to_epsg() == 32719


def test_a_box_cut_by_a_border_merges_with_its_neighbours_whole_box() -> None:
    # Two chips sharing the strip x 224-256; one sees the whole box, the other its cut remainder.
    footprints = {0: shapely_box(0, 0, 256, 256), 1: shapely_box(224, 0, 480, 256)}
    whole = ChipBox("building", 1, shapely_box(230, 10, 300, 60), cut=False)
    remainder = ChipBox("building", 0, shapely_box(230, 10, 256, 60), cut=True)
    lone_cut = ChipBox("building", 0, shapely_box(0, 200, 20, 220), cut=True)
    other = ChipBox("road", 0, shapely_box(230, 10, 256, 60), cut=True)
    merged = merge_boxes([whole, remainder, lone_cut, other], footprints, 0.5)
    by_label = {(label, poly.bounds): score for label, poly, score in merged}
    assert by_label[("building", (230.0, 10.0, 300.0, 60.0))] == 1.0  # one object, confirmed
    assert by_label[("building", (0.0, 200.0, 20.0, 220.0))] == 0.5  # cut, unconfirmed
    assert ("road", (230.0, 10.0, 256.0, 60.0)) in by_label  # labels never merge
    assert len(merged) == 3
