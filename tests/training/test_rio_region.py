"""scripts/rio_region.py: SpaceNet Rio's rasterised masks become a region folder whose
footprints are the masks' 8-connected components, which `training.region` reads as buildings."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rio():
    spec = importlib.util.spec_from_file_location("rio_region", ROOT / "scripts" / "rio_region.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path: Path, bands: np.ndarray) -> None:
    import rasterio
    from rasterio.transform import from_origin

    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=bands.shape[2], height=bands.shape[1],
                       count=bands.shape[0], dtype="uint8", crs="EPSG:4326",
                       transform=from_origin(-43.2, -22.9, 4.5e-6, 4.5e-6)) as dst:
        dst.write(bands)


def test_masks_become_a_region_folder_of_footprints(rio, tmp_path: Path) -> None:
    src = tmp_path / "data" / "labelled_more" / "spacenet1_rio"
    mask = np.zeros((1, 60, 80), np.uint8)
    mask[0, 5:15, 5:25] = 255  # a roof
    mask[0, 15:20, 25:30] = 255  # touching it at a corner: the same component (8-connected)
    mask[0, 40:55, 50:70] = 255  # another roof
    mask[0, 30, 40] = 255  # a speck, dropped
    _write(src / "images" / "chip1.tif", np.full((3, 60, 80), 90, np.uint8))
    _write(src / "building_masks" / "chip1.tif", mask)
    out = tmp_path / "region"
    assert rio.main(["--data", str(tmp_path / "data"), "--out", str(out)]) == 0
    assert (out / "chip1.tif").is_symlink()
    features = json.loads((out / "buildings_epsg4326.geojson").read_text())["features"]
    assert len(features) == 2
    assert all(f["properties"]["building"] == "yes" for f in features)
    from shapely.geometry import shape

    first, second = sorted((shape(f["geometry"]) for f in features), key=lambda g: -g.bounds[3])
    # The first roof and its corner neighbour: columns 5-30, rows 5-20 of the 4.5e-6 degree grid.
    assert first.bounds == pytest.approx((-43.2 + 5 * 4.5e-6, -22.9 - 20 * 4.5e-6,
                                          -43.2 + 30 * 4.5e-6, -22.9 - 5 * 4.5e-6), abs=1e-9)
    assert second.area == pytest.approx(15 * 20 * 4.5e-6 ** 2, rel=1e-6)

    from training.region import load_region, read_features

    spec = load_region(out)
    assert [p.name for p in spec.rasters] == ["chip1.tif"]
    read = read_features(spec.vectors, "EPSG:4326")
    assert list(read["cls"]) == ["building", "building"]


def test_missing_data_is_said(rio, tmp_path: Path, capsys) -> None:
    assert rio.main(["--data", str(tmp_path), "--out", str(tmp_path / "region")]) == 2
    assert "SpaceNet Rio not found" in capsys.readouterr().err
