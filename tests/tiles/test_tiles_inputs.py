"""Plain images, pixel-space rasters and every kind of bad input the issue lists."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tiles
from tiles import ImageryError, PlainImageSource, RasterSource


def _png_with_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` but holds one tiny compressed row."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )
    return path


# --- pixel space ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_plain_images_are_pixel_space(tmp_path, make_data, fmt):
    arr = np.moveaxis(make_data(3, 120, 200), 0, -1)
    path = tmp_path / f"photo.{fmt.lower()}"
    Image.fromarray(arr).save(path, format=fmt)
    with tiles.open_source(path) as src:
        assert isinstance(src, PlainImageSource)
        assert src.georeferenced is False and src.crs is None and src.bounds_lonlat is None
        assert "pixel space" in src.info()["note"]
        chip = src.chip((50, 20, 150, 120), size=100)
        whole = src.chip(None, size=100)
    assert chip.crs is None and not chip.georeferenced and chip.bounds_lonlat is None
    assert (chip.width, chip.height) == (100, 100) and (whole.width, whole.height) == (100, 60)
    assert chip.pixel_to_lonlat(1, 1) is None and chip.lonlat_to_pixel(32, 0) is None
    assert chip.box_to_polygon((0, 0, 10, 10)) is None
    assert chip.obb_to_polygon(5, 5, 4, 2, 10) is None
    assert chip.bbox_lonlat_to_box_px(32, 0, 33, 1) is None
    # Pixel-space transform: chip pixels -> source pixels.
    assert chip.pixel_to_crs(0, 0) == (50, 20) and chip.bounds == (50, 20, 150, 120)
    if fmt == "PNG":
        np.testing.assert_array_equal(chip.pixels, arr[20:120, 50:150])


def test_plain_image_from_array_with_alpha():
    rgba = np.zeros((40, 50, 4), np.uint8)
    rgba[..., :3] = 100
    rgba[:, 25:, 3] = 255
    src = PlainImageSource.from_array(rgba, name="upload")
    chip = src.chip(None, size=50)
    assert chip.mask is not None and chip.mask[:, 26:].all() and not chip.mask[:, :24].any()
    assert src.preview(25).bounds_lonlat is None


def test_geotiff_without_crs_is_pixel_space(raster_factory, make_data):
    path = raster_factory(make_data(3, 100, 150), crs=None)
    with tiles.open_source(path) as src:
        assert isinstance(src, RasterSource) and not src.georeferenced
        info = src.info()
        assert info["crs"] is None and "pixel space" in info["note"]
        chip = src.chip((10, 10, 60, 60), size=50)
    assert chip.crs is None and chip.box_to_polygon((0, 0, 5, 5)) is None
    np.testing.assert_array_equal(
        chip.pixels, np.moveaxis(make_data(3, 100, 150), 0, -1)[10:60, 10:60]
    )


# --- bad input ------------------------------------------------------------------------------


def test_not_a_raster(tmp_path):
    path = tmp_path / "notes.tif"
    path.write_text("this is not an image\n" * 20)
    with pytest.raises(ImageryError, match="not an image"):
        tiles.open_source(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.tif"
    path.touch()
    with pytest.raises(ImageryError, match="empty"):
        tiles.open_source(path)


def test_missing_file():
    with pytest.raises(ImageryError, match="not found"):
        tiles.open_source("/nonexistent/dir/image.tif")


def test_truncated_geotiff(raster_factory, make_data):
    path = raster_factory(make_data(3, 512, 512), tiled=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with (
        pytest.raises(ImageryError, match="truncated|not an image"),
        tiles.open_source(path) as src,
    ):
        src.chip(None, size=512)


def test_truncated_jpeg(tmp_path, make_data):
    path = tmp_path / "cut.jpg"
    Image.fromarray(np.moveaxis(make_data(3, 300, 300), 0, -1)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageryError), tiles.open_source(path) as src:
        src.chip(None)


@pytest.mark.parametrize(
    "bbox",
    [(0, 0, 0, 1), (1, 1, 0, 2), (5, 5, 5, 5), (0, 2, 1, 1), (float("nan"), 0, 1, 1), (1, 2, 3)],
)
def test_zero_area_or_malformed_bbox(demo_raster, bbox):
    with tiles.open_source(demo_raster) as src, pytest.raises(ImageryError, match="bbox"):
        src.chip(bbox)


def test_bbox_outside_source(demo_raster):
    with tiles.open_source(demo_raster) as src:
        with pytest.raises(ImageryError, match="does not overlap"):
            src.chip((10.0, 50.0, 10.1, 50.1))
        with pytest.raises(ImageryError, match="latitudes outside"):
            src.chip((0.35, 32.59, 0.36, 32.60 + 90))


def test_pixel_space_bbox_outside(tmp_path):
    path = tmp_path / "p.png"
    Image.new("RGB", (64, 64)).save(path)
    with tiles.open_source(path) as src, pytest.raises(ImageryError, match="outside"):
        src.chip((100, 100, 200, 200))


@pytest.mark.parametrize(
    "size",
    [
        0,
        -5,
        100_000,
        (0, 10),
        (20000, 20000),
        "big",
        2.5,
        True,
        float("nan"),
        float("inf"),
        (float("inf"), 5),
        (1, 2, 3),
    ],
)
def test_absurd_chip_sizes(demo_raster, size):
    with tiles.open_source(demo_raster) as src, pytest.raises(ImageryError, match="size|Size"):
        src.chip(None, size=size)


def test_huge_geotiff_header_does_not_allocate(tmp_path):
    import rasterio
    from rasterio.transform import from_origin

    path = tmp_path / "huge.tif"
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=100_000,
        height=100_000,
        count=3,
        dtype="uint8",
        crs="EPSG:3857",
        transform=from_origin(0, 0, 1, 1),
        tiled=True,
        blockxsize=512,
        blockysize=512,
        SPARSE_OK=True,
        BIGTIFF="YES",
    ):
        pass
    assert path.stat().st_size < 2_000_000
    with tiles.open_source(path) as src:
        assert src.info()["width"] == 100_000
        with pytest.raises(ImageryError, match="megapixels"):
            src.chip(None, size=512)
        with pytest.raises(ImageryError, match="megapixels"):
            src.preview()
        # A small window of the same raster is fine (sparse blocks read as zeros).
        chip = src.chip((0, -512, 512, 0), crs="EPSG:3857", size=128)
        assert chip.pixels.shape == (128, 128, 3)


def test_huge_png_header_does_not_allocate(tmp_path):
    path = _png_with_header(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(ImageryError, match="too large|not an image"):
        tiles.open_source(path)


def test_unsupported_dtype(raster_factory):
    data = (np.ones((1, 10, 10)) * (1 + 2j)).astype("complex64")
    path = raster_factory(data)
    with pytest.raises(ImageryError, match="not supported"):
        tiles.open_source(path)


@pytest.mark.parametrize("bands", [(1, 2), (0, 1, 2), (1, 2, 9)])
def test_unsupported_band_mapping(demo_raster, bands):
    with pytest.raises(ImageryError, match="Band mapping"):
        tiles.open_source(demo_raster, bands=bands)


def test_unsupported_channel_count_in_array():
    with pytest.raises(ImageryError, match="channels"):
        PlainImageSource.from_array(np.zeros((10, 10, 5), np.uint8))


def test_unknown_request_crs(demo_raster):
    with tiles.open_source(demo_raster) as src, pytest.raises(ImageryError, match="Unknown"):
        src.chip((0, 0, 1, 1), crs="EPSG:0")
