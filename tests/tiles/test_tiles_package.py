"""Package boundaries: `tiles` depends on none of the project's other packages."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

TILES = Path(__file__).resolve().parents[2] / "tiles"


def test_tiles_imports_no_other_project_package():
    for path in TILES.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in {"rsvlm", "training", "app"}, (path, name)


def test_import_is_light():
    code = (
        "import sys, tiles; heavy = [m for m in ('rasterio', 'geopandas', 'requests', "
        "'torch') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout.strip()
    assert out == "[]"


def _imports(package: Path) -> list[tuple[Path, str]]:
    found = []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                found += [(path, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.append((path, node.module))
    return found


def test_app_uses_only_what_tiles_exports_and_crs_work_stays_in_tiles():
    root = TILES.parent
    for path, name in _imports(root / "app"):
        assert not name.startswith("tiles."), (path, name)  # `from tiles import ...` only
    for package in ("app", "rsvlm"):
        for path, name in _imports(root / package):
            assert name.split(".")[0] not in {"pyproj", "rasterio", "affine"}, (path, name)


def test_area_source_is_a_window_of_its_source(demo_raster):
    """`tiles.AreaSource`: bounds clipped to the source, lon/lat bounds, whole-area chips."""
    import pytest

    from tiles import AreaSource, ImageryError, open_source

    with open_source(demo_raster) as src:
        minx, miny, maxx, maxy = src.bounds
        half = (minx - 50, miny, (minx + maxx) / 2, maxy + 50)  # overhangs west and north
        area = AreaSource(src, half)
        assert area.bounds == (minx, miny, (minx + maxx) / 2, maxy)
        w, s, e, n = area.bounds_lonlat
        sw, ss, se, sn = src.bounds_lonlat
        assert w == pytest.approx(sw) and e < se and (s, n) == pytest.approx((ss, sn))
        chip = area.chip(size=256)
        assert chip.bounds == pytest.approx(area.bounds) and (chip.width, chip.height) == (192, 256)
        assert area.info()["bounds"] == list(area.bounds)
        with pytest.raises(ImageryError, match="does not overlap"):
            AreaSource(src, (0, 0, 1, 1))
