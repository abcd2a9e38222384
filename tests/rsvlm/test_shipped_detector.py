"""The shipped detector with the real DINOv2 tower on the Kampala demo orthophoto: it finds the
mapped buildings. Kampala is one of the regions it trained on, so this guards the weights, the
decoding and the tower's features against a silent break (the honest numbers on regions it never
saw are the model card's leave-one-region-out table)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rsvlm import weights

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "assets" / "demo" / "kampala"
PARTS = ROOT / "assets" / "models" / "embedded"


@pytest.fixture(scope="module")
def perception():
    from transformers import AutoImageProcessor, Dinov2Model

    from rsvlm.perception import Perception

    vision_dir = weights.ensure_embedded_weights(weights.default_cache_dir(),
                                                 components=[weights.VISION])[weights.VISION]
    model = Dinov2Model.from_pretrained(vision_dir).eval()
    found = Perception.load(PARTS, model, AutoImageProcessor.from_pretrained(vision_dir))
    assert found is not None, "assets/models/embedded/detector is missing"
    return found


def test_the_shipped_detector_finds_the_mapped_buildings(perception) -> None:
    from PIL import Image

    from training.labelled import read_vector_set, tiles
    from training.metrics import match_boxes

    item = read_vector_set(DEMO / "oam_rgb_epsg3857.tif", DEMO / "osm_buildings_epsg4326.geojson",
                           "kampala_ug", gsd=0.15)
    tp = n_pred = n_true = 0
    for _, image, truth in tiles(item, 512):
        h, w = image.shape[:2]
        dets = perception.select(perception.detect(Image.fromarray(image)), "find_all")
        boxes = [np.array(d.box) * [w, h, w, h] for d in dets if d.label == "building"]
        # A town: no aircraft, at the threshold the aircraft class answers at.
        assert not [d for d in dets if d.label == "aircraft"], dets
        tp += match_boxes(boxes, list(truth))
        n_pred, n_true = n_pred + len(boxes), n_true + len(truth)
    precision, recall = tp / max(n_pred, 1), tp / max(n_true, 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-9)
    assert n_true > 20 and f1 > 0.45, (f1, precision, recall, n_pred, n_true)
