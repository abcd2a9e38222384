"""XYZ sources, offline: a z/x/y folder and an MBTiles file rendered from the demo raster,
and a URL template served only from a pre-filled disk cache. The network is never touched
(conftest makes any HTTP attempt fail)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import tiles
from tiles import ImageryError, XYZSource


def _inner_bbox(bounds):
    w, s, e, n = bounds
    return (w + (e - w) * 0.3, s + (n - s) * 0.3, w + (e - w) * 0.7, s + (n - s) * 0.7)


@pytest.mark.parametrize("kind", ["folder", "mbtiles"])
def test_xyz_chip_matches_raster_chip(demo_tiles, demo_raster, kind):
    bbox = _inner_bbox(demo_tiles["bounds_lonlat"])
    with tiles.open_source(demo_tiles[kind]) as src:
        assert isinstance(src, XYZSource)
        info = src.info()
        assert (info["min_zoom"], info["max_zoom"]) == (17, 19)
        chip = src.chip(bbox, size=256)
    with tiles.open_source(demo_raster) as raster:
        reference = raster.chip(bbox, size=256)
    assert chip.crs.to_epsg() == 3857 and chip.meta["zoom"] == 19
    assert chip.bounds_lonlat == pytest.approx(bbox, abs=1e-7)
    assert (chip.width, chip.height) == (reference.width, reference.height)
    # Same place (the y-flip of MBTiles and the tile maths are right): pixels nearly agree.
    diff = np.abs(chip.pixels.astype(int) - reference.pixels.astype(int)).mean()
    assert diff < 12, diff
    # A shifted chip would not agree nearly as well.
    shifted = np.abs(chip.pixels[:, 20:].astype(int) - reference.pixels[:, :-20].astype(int))
    assert shifted.mean() > diff + 3


def test_zoom_follows_requested_size(demo_tiles):
    bbox = demo_tiles["bounds_lonlat"]
    with tiles.open_source(demo_tiles["folder"]) as src:
        small = src.chip(bbox, size=64)
        large = src.chip(bbox, size=1024)
    assert small.meta["zoom"] == 17 and large.meta["zoom"] == 19


def test_local_template_and_preview(demo_tiles):
    template = str(demo_tiles["folder"] / "{z}" / "{x}" / "{y}.png")
    with tiles.open_source(template) as src:
        overlay = src.preview(max_size=200)
    assert overlay.rgba.shape[1] == 200 and overlay.bounds_lonlat is not None
    assert overlay.rgba[..., 3].mean() > 0


def test_url_template_offline_uses_only_the_cache(demo_tiles, tmp_path):
    url = "https://tiles.example.invalid/{z}/{x}/{y}.png"
    bbox = _inner_bbox(demo_tiles["bounds_lonlat"])
    with tiles.open_source(url, cache_dir=tmp_path) as src:
        assert src.info()["network"] is False
        with pytest.raises(ImageryError, match="allow_network"):
            src.chip(bbox, size=256)
        # Fill the cache with zoom 18 only: offline, a zoom-19 request falls back to it.
        cache = src.store.cache
        for png in (demo_tiles["folder"] / "18").rglob("*.png"):
            dest = cache / "18" / png.parent.name / f"{png.stem}.tile"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(png, dest)
        chip = src.chip(bbox, size=256)
        assert chip.meta["zoom"] == 18 and chip.mask is None
        # Half of zoom 19 cached too: the chip uses it and fills the holes from zoom 18.
        z19 = sorted((demo_tiles["folder"] / "19").rglob("*.png"))
        for png in z19[::2]:
            dest = cache / "19" / png.parent.name / f"{png.stem}.tile"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(png, dest)
        patchy = src.chip(bbox, size=256)
    assert patchy.meta["zooms"] == [19, 18] and patchy.mask is None


def test_provider_name_is_recognised_but_offline(tmp_path, demo_tiles):
    with tiles.open_source("OpenStreetMap.Mapnik", cache_dir=tmp_path) as src:
        assert isinstance(src, XYZSource) and src.info()["max_zoom"] == 19
        with pytest.raises(ImageryError, match="Downloading is off"):
            src.chip(demo_tiles["bounds_lonlat"], size=128)


def test_bad_tile_inputs(tmp_path):
    with pytest.raises(ImageryError, match="placeholders"):
        tiles.open_source("https://example.invalid/tiles.png")
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(ImageryError, match="zoom-level"):
        tiles.open_source(tmp_path / "empty_folder")
    bad = tmp_path / "bad.mbtiles"
    bad.write_text("not sqlite")
    with pytest.raises(ImageryError, match="MBTiles"):
        tiles.open_source(bad)


def test_bbox_outside_tiles(demo_tiles):
    with (
        tiles.open_source(demo_tiles["mbtiles"]) as src,
        pytest.raises(ImageryError, match="overlap"),
    ):
        src.chip((10.0, 10.0, 10.01, 10.01))


def test_downloads_fill_the_cache_when_allowed(demo_tiles, tmp_path, monkeypatch):
    """With allow_network=True missing tiles are fetched (here from a fake session) and cached;
    the same request then works offline."""
    import requests

    calls = []

    class FakeResponse:
        def __init__(self, content: bytes | None) -> None:
            self.status_code = 200 if content else 404
            self.content = content or b""

    def fake_get(self, url, timeout=None):
        calls.append(url)
        z, x, y = url.rsplit("/", 3)[1:]
        tile = demo_tiles["folder"] / z / x / y
        return FakeResponse(tile.read_bytes() if tile.is_file() else None)

    monkeypatch.setattr(requests.Session, "get", fake_get)
    url = "https://tiles.example.invalid/{z}/{x}/{y}.png"
    bbox = _inner_bbox(demo_tiles["bounds_lonlat"])
    with tiles.open_source(url, allow_network=True, cache_dir=tmp_path) as src:
        online = src.chip(bbox, size=256)
    assert calls and online.meta["zoom"] == 19
    assert len(list(tmp_path.rglob("*.tile"))) == len(calls)
    assert not list(tmp_path.rglob("*.part"))
    calls.clear()
    with tiles.open_source(url, cache_dir=tmp_path) as src:
        offline = src.chip(bbox, size=256)
    assert not calls
    np.testing.assert_array_equal(offline.pixels, online.pixels)
