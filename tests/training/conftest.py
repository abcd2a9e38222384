"""Fixtures for training tests: small generated regions and image folders."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[2]
KAMPALA = REPO / "assets" / "demo" / "kampala"


@pytest.fixture(scope="session")
def small_region(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """512 x 512 px at 0.3 m with buildings, roads, parking, water and trees."""
    from training.synthetic import make_region

    out = tmp_path_factory.mktemp("region")
    make_region(out, 512, 512, n_buildings=60, n_roads=2, n_parking=2, n_trees=15, seed=7)
    return out


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ImageFolder with three classes of four 32 px images each (solid colours + noise)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for name, color in {"BareLand": (200, 180, 140), "Forest": (30, 120, 40),
                        "dense_residential": (150, 120, 110)}.items():
        (root / name).mkdir()
        for i in range(4):
            arr = np.clip(np.array(color) + rng.normal(0, 10, (32, 32, 3)), 0, 255)
            Image.fromarray(arr.astype(np.uint8)).save(root / name / f"{name.lower()}_{i}.jpg")
    return root


@pytest.fixture
def one_thread():
    """Tiny models are slower with two threads on a busy 2-core machine (oversubscription)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
