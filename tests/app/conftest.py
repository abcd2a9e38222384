"""Fixtures for the app tests: the demo region, a copy of it with a hostile OSM tag, a context
with the deterministic fake backend."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from app.backend import FakeBackend
from app.handlers import AppContext
from app.region import DEMO_REGION, Region

XSS = "<img src=x onerror=alert(1)>"


def make_xss_region(folder: Path, feature_index: int = 0) -> Path:
    """The demo region with one OSM feature tagged ``name=<img src=x onerror=alert(1)>``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("oam_rgb_epsg3857.tif", "ATTRIBUTION.md"):
        shutil.copy(DEMO_REGION / name, folder / name)
    fc = json.loads((DEMO_REGION / "osm_buildings_epsg4326.geojson").read_text())
    fc["features"][feature_index]["properties"]["name"] = XSS
    (folder / "osm_buildings_epsg4326.geojson").write_text(json.dumps(fc))
    return folder


@pytest.fixture(scope="session")
def demo_region() -> Region:
    return Region.load(DEMO_REGION)


@pytest.fixture(scope="session")
def xss_region_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_xss_region(tmp_path_factory.mktemp("xss_region") / "kampala")


@pytest.fixture(scope="session")
def xss_region(xss_region_dir: Path) -> Region:
    return Region.load(xss_region_dir)


@pytest.fixture
def ctx(demo_region: Region, tmp_path: Path) -> AppContext:
    return AppContext(backend=FakeBackend(), region=demo_region, export_dir=tmp_path / "exports")
