"""The decode budget (`tiles.limits`): pictures above the working size are read at reduced
resolution (JPEG DCT scaling, PNG row strips) with full-resolution coordinates, or refused when
their format decodes only whole; rasters with huge blocks are refused from the header. The budget
is lowered to 16 MB here so small files exercise every path."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import tiles
from tiles import ImageryError, PlainImageSource, limits


@pytest.fixture(autouse=True)
def small_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RSVLM_DECODE_BUDGET_MB", "16")
    assert limits.working_pixels() == 16 * 2**20 // limits.BYTES_PER_DECODED_PIXEL


def _picture(w: int = 1600, h: int = 1200) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // w, yy * 255 // h, (xx // 100 % 2) * 200], -1).astype(np.uint8)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_big_pictures_are_read_reduced_with_full_resolution_coordinates(tmp_path, fmt):
    arr = _picture()
    path = tmp_path / f"big.{fmt.lower()}"
    Image.fromarray(arr).save(path, format=fmt, quality=95)
    with tiles.open_source(path) as src:
        assert isinstance(src, PlainImageSource)
        info = src.info()
        dw, dh = info["decoded_size"]
        assert (info["width"], info["height"]) == (1600, 1200)
        assert dw * dh <= limits.working_pixels() and dw < 1600
        chip = src.chip((800, 600, 1600, 1200), size=200)
    # Chip pixels map to full-resolution picture pixels, and show that part of the picture.
    x, y = chip.pixel_to_crs(np.array([0, 200]), np.array([0, 150]))
    assert np.allclose(x, [800, 1600]) and np.allclose(y, [600, 1200])
    expected = np.asarray(Image.fromarray(arr[600:, 800:]).resize((200, 150), Image.BOX))
    assert np.abs(chip.pixels.astype(int) - expected).mean() < 12


def test_big_png_palette_and_alpha(tmp_path):
    arr = _picture()
    pal = tmp_path / "palette.png"
    Image.fromarray(arr).convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(pal)
    rgba = tmp_path / "alpha.png"
    a = np.dstack([arr, np.where(np.arange(1600) < 800, 0, 255)[None, :].repeat(1200, 0)])
    Image.fromarray(a.astype(np.uint8), "RGBA").save(rgba)
    with tiles.open_source(pal) as src:
        assert src.info()["decoded_size"][0] < 1600
        assert src.chip(None, size=64).pixels.std() > 10  # colours, not palette indices
    with tiles.open_source(rgba) as src:
        chip = src.chip(None, size=160)
        assert chip.mask is not None and 0.4 < chip.mask.mean() < 0.6  # left half transparent


def test_whole_decode_formats_above_the_budget_are_refused(tmp_path):
    path = tmp_path / "big.webp"
    Image.fromarray(_picture()).save(path, format="WEBP", quality=50)
    with pytest.raises(ImageryError, match=rf"decoded whole.*limit is {limits.working_pixels() / 1e6:.1f} Mpx"):
        tiles.open_source(path)
    small = tmp_path / "small.webp"
    Image.fromarray(_picture(400, 300)).save(small, format="WEBP")
    with tiles.open_source(small) as src:
        assert src.info()["decoded_size"] == [400, 300]


def test_raster_with_a_block_over_the_budget_is_refused(tmp_path):
    import rasterio
    from rasterio.transform import from_origin

    path = tmp_path / "tile.tif"
    with rasterio.open(path, "w", driver="GTiff", width=2048, height=2048, count=3,
                       dtype="uint8", crs="EPSG:3857", transform=from_origin(0, 0, 1, 1),
                       tiled=True, blockxsize=2048, blockysize=2048, SPARSE_OK=True):
        pass
    with pytest.raises(ImageryError, match="blocks of 2048x2048"):
        tiles.open_source(path)
