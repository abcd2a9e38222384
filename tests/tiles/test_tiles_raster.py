"""Chips from rasters: bounds, reprojection, windowed reads, dtypes and band mapping."""

from __future__ import annotations

import numpy as np
import pytest

import tiles
from tiles import geometry
from tiles.sources.raster import RasterSource


@pytest.mark.parametrize("crs", ["EPSG:3857", "EPSG:4326", "EPSG:32636"])
@pytest.mark.parametrize("size", [512, 97, (300, 120)])
def test_chip_bounds_equal_request_within_one_pixel(raster_factory, make_data, crs, size):
    path = raster_factory(make_data(3, 600, 800), crs=crs)
    with tiles.open_source(path) as src:
        w, s, e, n = src.bounds_lonlat
        req = (w + (e - w) * 0.2, s + (n - s) * 0.3, w + (e - w) * 0.7, s + (n - s) * 0.9)
        chip = src.chip(req, size=size)
    assert chip.crs == geometry.as_crs(crs)  # no reprojection: the chip stays in the source CRS
    if isinstance(size, int):
        assert max(chip.width, chip.height) == size
    else:
        assert (chip.width, chip.height) == size
    # The request, expressed in the chip's CRS, against the chip's bounds: within a chip pixel.
    want = geometry.transform_bounds(req, "EPSG:4326", crs)
    px_w, px_h = abs(chip.transform.a), abs(chip.transform.e)
    got = chip.bounds
    assert abs(got[0] - want[0]) <= px_w and abs(got[2] - want[2]) <= px_w
    assert abs(got[1] - want[1]) <= px_h and abs(got[3] - want[3]) <= px_h
    # ... and in lon/lat, which is what the app compares against.
    gw, gs, ge, gn = chip.bounds_lonlat
    deg_px = (e - w) / 800
    assert gw == pytest.approx(req[0], abs=2 * deg_px) and ge == pytest.approx(
        req[2], abs=2 * deg_px
    )


def test_square_size_keeps_the_whole_bbox(raster_factory, make_data):
    path = raster_factory(make_data(3, 400, 400), crs="EPSG:3857")
    with tiles.open_source(path) as src:
        x0, y0, x1, y1 = src.bounds
        chip = src.chip((x0, y0, x0 + 300, y0 + 100), crs="EPSG:3857", size=512)
    assert (chip.width, chip.height) == (512, 171)  # 3:1 box: longest side 512, square pixels
    assert chip.transform.a == pytest.approx(-chip.transform.e, rel=0.01)


def test_native_resolution_chip_matches_direct_read(raster_factory, make_data):
    import rasterio

    data = make_data(3, 300, 400)
    path = raster_factory(data, crs="EPSG:32636")
    with rasterio.open(path) as ds:
        t = ds.transform
    x0, y0 = t @ (50, 150)
    x1, y1 = t @ (250, 50)
    with tiles.open_source(path) as src:
        chip = src.chip((x0, y0, x1, y1), crs="EPSG:32636", size=200)
    assert (chip.width, chip.height) == (200, 100)
    expected = np.moveaxis(data[:, 50:150, 50:250], 0, -1)
    np.testing.assert_array_equal(chip.pixels, expected)
    assert chip.mask is None


def test_reprojected_chip(demo_raster):
    with tiles.open_source(demo_raster) as src:
        w, s, e, n = src.bounds_lonlat
        req = (w + (e - w) * 0.25, s + (n - s) * 0.25, w + (e - w) * 0.75, s + (n - s) * 0.75)
        chip = src.chip(req, size=256, out_crs="EPSG:32636")
        same = src.chip(req, size=256)
    assert chip.crs == geometry.as_crs("EPSG:32636")
    assert chip.bounds_lonlat == pytest.approx(req, abs=1e-5)
    assert chip.mask is None  # inside the source: all valid
    # Same place, same look: UTM and Web Mercator chips are nearly identical at this latitude.
    assert abs(float(chip.pixels.mean()) - float(same.pixels.mean())) < 3
    centre = chip.pixel_to_lonlat(chip.width / 2, chip.height / 2)
    assert centre == pytest.approx(((req[0] + req[2]) / 2, (req[1] + req[3]) / 2), abs=1e-6)


def test_partial_overlap_is_masked(raster_factory, make_data):
    path = raster_factory(make_data(3, 100, 100), crs="EPSG:3857")
    with tiles.open_source(path) as src:
        x0, y0, x1, y1 = src.bounds
        chip = src.chip((x0 - 50, y0, x0 + 50, y1), crs="EPSG:3857", size=100)
    assert chip.mask is not None
    assert not chip.mask[:, :45].any() and chip.mask[:, 55:].all()
    assert (chip.pixels[~chip.mask] == 0).all()


def test_windowed_reads_on_large_tiled_raster(tmp_path, monkeypatch):
    """A 20000 x 20000 sparse tiled raster: chips read a window, the whole is refused."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    path = tmp_path / "large.tif"
    profile = dict(
        driver="GTiff",
        width=20000,
        height=20000,
        count=3,
        dtype="uint8",
        crs="EPSG:3857",
        transform=from_origin(3620000, 45000, 0.5, 0.5),
        tiled=True,
        blockxsize=512,
        blockysize=512,
        compress="deflate",
        SPARSE_OK=True,
    )
    patch = np.full((3, 512, 512), 200, np.uint8)
    patch[0] = np.arange(512, dtype=np.uint8)[None, :]
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(patch, window=Window(10240, 10240, 512, 512))
    assert path.stat().st_size < 5_000_000

    src = tiles.open_source(path)
    reads = []
    real_read = src._reader.read

    def spy(*args, **kwargs):
        reads.append((kwargs["window"], kwargs["out"].shape))
        return real_read(*args, **kwargs)

    monkeypatch.setattr(src._reader, "read", spy)
    x0, y1 = src._reader.transform @ (10240, 10240)
    x1, y0 = src._reader.transform @ (10752, 10752)
    chip = src.chip((x0, y0, x1, y1), crs="EPSG:3857", size=512)
    ((window, out_shape),) = reads
    assert (round(window.width), round(window.height)) == (512, 512)
    assert out_shape == (3, 512, 512)
    np.testing.assert_array_equal(chip.pixels, np.moveaxis(patch, 0, -1))
    # The whole raster at 512 px would read 400 megapixels: no overviews, so it is refused.
    with pytest.raises(tiles.ImageryError, match="overviews"):
        src.chip(None, size=512)
    src.close()


def test_overviews_are_used(raster_factory, make_data, monkeypatch):
    path = raster_factory(
        make_data(3, 2048, 2048), crs="EPSG:3857", tiled=True, overviews=(2, 4, 8)
    )
    with tiles.open_source(path) as src:
        assert src.info()["overviews"] == [2, 4, 8]
        whole = src.chip(None, size=256)
        assert whole.meta["overview_factor"] == 8
        x0, y0, _, _ = src.bounds
        detail = src.chip((x0, y0, x0 + 256, y0 + 256), crs="EPSG:3857", size=256)
        assert detail.meta["overview_factor"] == 1


@pytest.mark.parametrize("dtype,scale", [("uint16", 200.0), ("float32", 0.01), ("int16", -3.0)])
def test_high_bit_depth_gets_a_stretch(raster_factory, make_data, dtype, scale):
    path = raster_factory(make_data(3, 120, 160, dtype="float64", scale=scale).astype(dtype))
    with tiles.open_source(path) as src:
        chip = src.chip(None, size=160)
    assert chip.pixels.dtype == np.uint8
    # A 2-98 % stretch uses the display range instead of crushing everything to black or white.
    assert chip.pixels.min() == 0 and chip.pixels.max() == 255
    assert 60 < chip.pixels.mean() < 200


def test_float_nan_and_nodata_are_masked(raster_factory, make_data):
    data = make_data(3, 100, 100, dtype="float32")
    data[:, :20, :] = np.nan
    data[:, 80:, :] = -9999
    path = raster_factory(data, nodata=-9999)
    with tiles.open_source(path) as src:
        chip = src.chip(None, size=100)
    assert chip.mask is not None
    assert not chip.mask[:20].any() and not chip.mask[80:].any() and chip.mask[30:70].all()


def test_multispectral_true_colour_from_band_names(raster_factory, make_data):
    data = make_data(4, 50, 60, dtype="uint16")
    names = ["B02", "B03", "B04", "B08"]  # Sentinel-2 blue, green, red, NIR
    path = raster_factory(data, descriptions=names)
    with tiles.open_source(path) as src:
        assert src.info()["rgb_bands"] == [3, 2, 1]
        assert src.info()["band_mapping"] == "band names"
        default = src.chip(None, size=60)
    with tiles.open_source(path, bands=(4, 3, 2)) as src:
        false_colour = src.chip(None, size=60)
    # Same stretch per band index; the red channel shows band 3 in one and band 4 in the other.
    assert not np.array_equal(default.pixels[..., 0], false_colour.pixels[..., 0])
    assert np.array_equal(default.pixels[..., 1], false_colour.pixels[..., 2])


def test_single_band_is_grey_and_rgba_alpha_is_a_mask(raster_factory, make_data):
    from rasterio.enums import ColorInterp

    grey = raster_factory(make_data(1, 40, 40))
    with tiles.open_source(grey) as src:
        chip = src.chip(None, size=40)
    assert np.array_equal(chip.pixels[..., 0], chip.pixels[..., 2])

    data = make_data(4, 40, 40)
    data[3] = 255
    data[3, :, :10] = 0
    ci = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]
    rgba = raster_factory(data, colorinterp=ci)
    with tiles.open_source(rgba) as src:
        chip = src.chip(None, size=40)
    assert chip.mask is not None and not chip.mask[:, :10].any() and chip.mask[:, 10:].all()


def test_info_fields(demo_raster):
    with RasterSource(demo_raster) as src:
        info = src.info()
    for key in (
        "driver",
        "width",
        "height",
        "count",
        "dtype",
        "crs",
        "bounds",
        "bounds_lonlat",
        "resolution",
        "overviews",
    ):
        assert key in info
    assert info["crs"] == "EPSG:3857" and (info["width"], info["height"]) == (1536, 1024)
    w, s, e, n = info["bounds_lonlat"]
    assert 32.59 < w < e < 32.6 and 0.35 < s < n < 0.352


def test_preview_overlay(demo_raster):
    with tiles.open_source(demo_raster) as src:
        overlay = src.preview(max_size=300)
        bounds = src.bounds_lonlat
    assert overlay.rgba.shape == (200, 300, 4) and overlay.rgba.dtype == np.uint8
    assert (overlay.rgba[..., 3] == 255).all()
    assert overlay.bounds_lonlat == pytest.approx(bounds, abs=1e-7)
    assert overlay.to_data_url().startswith("data:image/png;base64,")


def test_chip_geometry_methods(demo_raster):
    with tiles.open_source(demo_raster) as src:
        chip = src.chip(None, size=512)
    w, s, e, n = chip.bounds_lonlat
    assert chip.pixel_to_lonlat(0, 0) == pytest.approx((w, n))
    assert chip.lonlat_to_pixel(e, s) == pytest.approx((chip.width, chip.height))
    poly = chip.box_to_polygon((0, 0, chip.width, chip.height))
    assert poly.bounds == pytest.approx((w, s, e, n))
    mid = ((w + e) / 2, (s + n) / 2)
    box = chip.bbox_lonlat_to_box_px(w, s, *mid)
    assert box == pytest.approx((0, chip.height / 2, chip.width / 2, chip.height), abs=0.01)
    obb = chip.obb_to_polygon(256, 170, 100, 20, 90)
    assert obb.area == pytest.approx(poly.area * (100 * 20) / (chip.width * chip.height), rel=1e-3)
    image = chip.to_image()
    assert image.size == (chip.width, chip.height)


def test_palette_raster_uses_its_colour_table(raster_factory):
    import rasterio

    data = np.zeros((1, 40, 40), np.uint8)
    data[0, :, 20:] = 1
    path = raster_factory(data)
    with rasterio.open(path, "r+") as ds:
        ds.write_colormap(1, {0: (255, 0, 0, 255), 1: (0, 0, 255, 255)})
    with tiles.open_source(path) as src:
        chip = src.chip(None, size=20)
    assert (chip.pixels[:, :9] == (255, 0, 0)).all() and (chip.pixels[:, 11:] == (0, 0, 255)).all()


def test_rotated_grid_is_read_north_up(tmp_path, make_data):
    import rasterio
    from affine import Affine

    path = tmp_path / "rotated.tif"
    transform = Affine.translation(3628300, 39100) * Affine.rotation(20) * Affine.scale(1, -1)
    data = make_data(3, 100, 100)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=100,
        height=100,
        count=3,
        dtype="uint8",
        crs="EPSG:3857",
        transform=transform,
    ) as dst:
        dst.write(data)
    with tiles.open_source(path) as src:
        chip = src.chip(None, size=128)
        w, s, e, n = src.bounds
    assert chip.transform.b == 0 and chip.transform.e < 0
    assert (e - w) == pytest.approx(
        100 * (np.cos(np.radians(20)) + np.sin(np.radians(20))), rel=0.02
    )
    assert chip.mask is not None and chip.mask.mean() > 0.5  # rotated square inside its bounds


def test_internal_mask_band(tmp_path, make_data):
    import rasterio

    path = tmp_path / "masked.tif"
    data = make_data(3, 64, 64)
    with (
        rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True),
        rasterio.open(
            path,
            "w",
            driver="GTiff",
            width=64,
            height=64,
            count=3,
            dtype="uint8",
            crs="EPSG:3857",
            transform=rasterio.transform.from_origin(3628300, 39100, 1, 1),
        ) as dst,
    ):
        dst.write(data)
        mask = np.full((64, 64), 255, np.uint8)
        mask[:32] = 0
        dst.write_mask(mask)
    with tiles.open_source(path) as src:
        chip = src.chip(None, size=32)
    assert chip.mask is not None and not chip.mask[:15].any() and chip.mask[17:].all()


def test_chips_from_several_threads(demo_raster):
    """The UI serves sessions from threads; one source must give the same chips concurrently."""
    from concurrent.futures import ThreadPoolExecutor

    with tiles.open_source(demo_raster) as src:
        w, s, e, n = src.bounds_lonlat
        boxes = [(w + i * (e - w) / 10, s, w + (i + 3) * (e - w) / 10, n) for i in range(6)]
        serial = [src.chip(b, size=128).pixels for b in boxes]
        with ThreadPoolExecutor(4) as pool:
            parallel = list(pool.map(lambda b: src.chip(b, size=128).pixels, boxes * 3))
    for i, pixels in enumerate(parallel):
        np.testing.assert_array_equal(pixels, serial[i % len(boxes)])
