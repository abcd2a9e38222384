"""Round trips of every coordinate transform in EPSG:3857, EPSG:4326 and UTM 36N."""

from __future__ import annotations

import numpy as np
import pytest
from affine import Affine
from shapely import Polygon

from tiles import geometry

# (crs, chip transform): 512 px chips around Kampala in each CRS.
GRIDS = {
    "EPSG:3857": Affine(0.3, 0, 3628300.0, 0, -0.3, 39140.0),
    "EPSG:4326": Affine(2.7e-6, 0, 32.5937, 0, -2.7e-6, 0.3515),
    "EPSG:32636": Affine(0.3, 0, 453900.0, 0, -0.3, 38900.0),
}
RNG = np.random.default_rng(0)
PTS = RNG.uniform(0, 512, size=(50, 2))


@pytest.fixture(params=sorted(GRIDS))
def grid(request: pytest.FixtureRequest) -> tuple[str, Affine]:
    return request.param, GRIDS[request.param]


def test_points_px_crs_lonlat_round_trip(grid):
    crs, t = grid
    x, y = geometry.px_to_crs(t, PTS[:, 0], PTS[:, 1])
    back = np.column_stack(geometry.crs_to_px(t, x, y))
    np.testing.assert_allclose(back, PTS, atol=1e-6)
    lon, lat = geometry.px_to_lonlat(t, crs, PTS[:, 0], PTS[:, 1])
    # Lon/lat order, in the right place on Earth whatever the CRS's own axis order.
    assert np.all(np.abs(lon - 32.59) < 0.01) and np.all(np.abs(lat - 0.35) < 0.01)
    back = np.column_stack(geometry.lonlat_to_px(t, crs, lon, lat))
    np.testing.assert_allclose(back, PTS, atol=1e-4)


def test_points_between_crs_round_trip(grid):
    crs, t = grid
    x, y = geometry.px_to_crs(t, PTS[:, 0], PTS[:, 1])
    for other in GRIDS:
        ox, oy = geometry.transform_points(x, y, crs, other)
        bx, by = geometry.transform_points(ox, oy, other, crs)
        tol = 1e-9 if crs == "EPSG:4326" else 1e-4
        np.testing.assert_allclose(bx, x, atol=tol)
        np.testing.assert_allclose(by, y, atol=tol)


def test_axis_aligned_box_round_trip(grid):
    crs, t = grid
    box = (100.0, 50.0, 300.0, 420.0)
    poly = geometry.box_px_to_polygon(box, t, crs, "EPSG:4326")
    lon_w, lat_s, lon_e, lat_n = poly.bounds
    assert lon_w < lon_e and lat_s < lat_n and 32 < lon_w < 33
    back = geometry.polygon_crs_to_px(poly, t, crs)
    np.testing.assert_allclose(
        np.asarray(back.exterior.coords)[:4], geometry.box_corners(box), atol=1e-4
    )
    assert geometry.bounds_to_box_px(poly.bounds, t, crs) == pytest.approx(box, abs=0.5)


def test_oriented_box_round_trip(grid):
    crs, t = grid
    obb = (256.0, 200.0, 120.0, 40.0, 30.0)
    corners = geometry.obb_corners(*obb)
    assert geometry.obb_from_corners(corners) == pytest.approx(obb)
    # Clockwise on screen: with y down, +30 degrees moves the right edge's midpoint down.
    assert corners[1][1] > corners[0][1]
    poly = geometry.obb_px_to_polygon(obb, t, crs, "EPSG:3857")
    back = geometry.polygon_crs_to_px(poly, t, crs, "EPSG:3857")
    recovered = geometry.obb_from_corners(np.asarray(back.exterior.coords)[:4])
    assert recovered == pytest.approx(obb, abs=1e-3)
    assert Polygon(corners).area == pytest.approx(120 * 40)


def test_polygon_round_trip_through_every_crs(grid):
    crs, t = grid
    ring = [(10, 10), (200, 30), (260, 300), (40, 250)]
    poly_px = Polygon(ring)
    for other in GRIDS:
        geo = geometry.polygon_px_to_crs(poly_px, t, crs, other)
        back = geometry.polygon_crs_to_px(geo, t, crs, other)
        np.testing.assert_allclose(
            np.asarray(back.exterior.coords), poly_px.exterior.coords, atol=1e-3
        )


def test_bounds_round_trip(grid):
    crs, t = grid
    x0, y0 = t @ (0, 512)
    x1, y1 = t @ (512, 0)
    ll = geometry.transform_bounds((x0, y0, x1, y1), crs, "EPSG:4326")
    back = geometry.transform_bounds(ll, "EPSG:4326", crs)
    # Reprojected boxes only grow (they enclose the curved edges), by well under a pixel here.
    assert back[0] <= x0 + 1e-9 and back[2] >= x1 - 1e-9
    assert back == pytest.approx((x0, y0, x1, y1), abs=abs(t.a))


@pytest.mark.parametrize("scale", [1000, 1])
def test_normalized_boxes_round_trip(scale):
    box = (12.5, 40.0, 480.0, 300.25)
    norm = geometry.px_to_norm(box, 512, 384, scale=scale)
    assert all(0 <= v <= scale for v in norm)
    assert geometry.norm_to_px(norm, 512, 384, scale=scale) == pytest.approx(box)
    assert geometry.norm_to_px((0, 0, scale, scale), 512, 384, scale) == (0, 0, 512, 384)


def test_unknown_crs_is_an_imagery_error():
    from tiles import ImageryError

    with pytest.raises(ImageryError, match="Unknown coordinate reference system"):
        geometry.as_crs("EPSG:999999")
