"""scripts/loro_zoom.py maps each crop's detections back into the whole tile."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def test_crop_detections_land_where_the_crop_lies() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location("loro_zoom", ROOT / "scripts" / "loro_zoom.py")
    zoom = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(zoom)
    seen = []

    def tower(crops):  # 4 x 4 patches, 3 levels of 2
        seen.extend(c.shape for c in crops)
        return torch.zeros(len(crops), 3, 16, 2)

    def head(levels):  # one peak at patch (1, 1) whose box is the whole crop
        b = levels[0].shape[0]
        heat = torch.full((b, 1, 4, 4), -9.0)
        heat[:, :, 1, 1] = 3.0
        box = torch.full((b, 4, 4, 4), math.log(2.0))
        box[:, 0, 1, 1] = box[:, 1, 1, 1] = math.log(1.5)
        box[:, 2, 1, 1] = box[:, 3, 1, 1] = math.log(2.5)
        return heat, box

    dets = zoom.zoomed(head, tower, np.zeros((100, 100, 3), np.uint8), 0.6)
    assert seen == [(60, 60, 3)] * 4
    want = sorted((ox, oy, ox + 0.6, oy + 0.6) for ox, oy in zoom.crop_frames(0.6))
    got = sorted(d.box for d in dets)
    assert len(got) == 4
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w)
