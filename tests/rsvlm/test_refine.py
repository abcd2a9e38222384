"""The box refiner: a second look at each detected box in the image's own pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rsvlm.detector import Detection
from rsvlm.perception import DetectorConfig, Perception, load_detector, save_detector
from rsvlm.refine import (
    BoxRefiner,
    apply_deltas,
    box_deltas,
    crop_boxes,
    image_tensor,
    pyramid,
    refine,
    refine_detections,
)
from training.labelled import LabelledImage
from training.refine import jitter, nearest_truth, sample_crops, train_refiner


def roofs(seed: int, n: int = 6, side: int = 192) -> LabelledImage:
    """Bright rectangles of random sizes on a noisy dark ground, apart from one another."""
    rng = np.random.default_rng(seed)
    image = rng.integers(20, 70, (side, side, 3)).astype(np.uint8)
    boxes: list[list[float]] = []
    while len(boxes) < n:
        w, h = rng.integers(14, 36, 2)
        x, y = rng.integers(4, side - 4 - w), rng.integers(4, side - 4 - h)
        if any(x < b[2] + 6 and b[0] < x + w + 6 and y < b[3] + 6 and b[1] < y + h + 6
               for b in boxes):
            continue
        image[y:y + h, x:x + w] = rng.integers(150, 255, 3)
        boxes.append([float(x), float(y), float(x + w), float(y + h)])
    return LabelledImage("roofs", f"r{seed}", image, np.array(boxes, np.float32),
                         ["building"] * n)


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    x1, y1 = torch.maximum(a[:, 0], b[:, 0]), torch.maximum(a[:, 1], b[:, 1])
    x2, y2 = torch.minimum(a[:, 2], b[:, 2]), torch.minimum(a[:, 3], b[:, 3])
    inter = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    area = lambda t: (t[:, 2] - t[:, 0]) * (t[:, 3] - t[:, 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def test_deltas_move_a_box_onto_its_truth_and_back() -> None:
    props = torch.tensor([[10.0, 20.0, 50.0, 40.0], [0.0, 0.0, 8.0, 16.0]])
    truth = torch.tensor([[12.0, 18.0, 60.0, 44.0], [1.0, 2.0, 7.0, 12.0]])
    assert torch.allclose(apply_deltas(props, box_deltas(props, truth)), truth, atol=1e-4)
    assert torch.allclose(box_deltas(truth, truth), torch.zeros(2, 4), atol=1e-6)


def test_a_crop_holds_its_box_in_the_middle_half_at_any_scale() -> None:
    image = np.zeros((400, 400, 3), np.uint8)
    image[100:300, 150:250] = 255  # a 100 x 200 roof: its crop comes from a coarser level
    levels = pyramid(image_tensor(image))
    crops = crop_boxes(levels, torch.tensor([[150.0, 100.0, 250.0, 300.0]]), 32, 2.0)
    assert crops.shape == (1, 3, 32, 32)
    inside, outside = crops[0, 0, 10:22, 10:22], crops[0, 0, :, :6]
    assert (inside > 0.5).all() and (outside < -0.5).all()
    # standardised per crop: a dimmer copy of the same roof crops the same
    dim = image_tensor(image) * 0.3
    again = crop_boxes(pyramid(dim), torch.tensor([[150.0, 100.0, 250.0, 300.0]]), 32, 2.0)
    assert torch.allclose(crops, again, atol=1e-3)


def test_crops_turn_with_their_boxes() -> None:
    item = roofs(0)
    crops, deltas, quality, trains = sample_crops({"roofs": [item]}, BoxRefiner(32, 8), 60,
                                                  torch.Generator().manual_seed(0),
                                                  quality_sets=["roofs"])
    assert len(crops) == len(deltas) == len(quality) == len(trains) > 60
    # background boxes teach the expected IoU (low), not where a box should move
    assert (quality[~trains[:, 0]] < 0.2).all() and trains[:, 1].all()
    props, _ = jitter(torch.from_numpy(item.boxes), 3, torch.Generator().manual_seed(1))
    target, best = nearest_truth(props, torch.from_numpy(item.boxes))
    assert best.min() > 0 and (iou(props, target) == best).all()


def test_a_trained_refiner_moves_boxes_closer_on_images_it_never_saw() -> None:
    torch.manual_seed(0)
    refiner = train_refiner({"roofs": [roofs(s) for s in range(6)]}, epochs=12, per_set=600,
                            width=8, size=32, quality_sets=["roofs"], lr=3e-3)
    new = roofs(100)
    truth = torch.from_numpy(new.boxes)
    props, target = jitter(truth, 8, torch.Generator().manual_seed(5))
    moved, quality = refine(refiner, new.image, props)
    before, after = iou(props, target), iou(moved, target)
    assert after.mean() > before.mean() + 0.05, (before.mean(), after.mean())
    # and it expects more of a box on a roof than of one on bare ground
    ground = np.random.default_rng(7).integers(20, 70, (64, 64, 3)).astype(np.uint8)
    _, bare = refine(refiner, ground, torch.tensor([[20.0, 20.0, 44.0, 40.0]]))
    assert quality.mean() > bare.mean()


def test_the_detector_folder_carries_its_refiner(tmp_path) -> None:
    config = DetectorConfig(hidden=8, layers=[1, 2], dim=8, refiner={"steps": 1,
                                                                     "rescore": 0.0})
    head = config.build()
    with pytest.raises(ValueError, match="refiner"):
        save_detector(head, config, tmp_path)
    refiner = BoxRefiner(32, 8)
    torch.nn.init.normal_(refiner.out[-1].weight, std=0.05)
    save_detector(head, config, tmp_path, refiner)
    loaded, again = load_detector(tmp_path)
    assert again.refiner["width"] == 8 and again.refiner["size"] == 32
    perception = Perception.load(tmp_path, torch.nn.Identity(), type(
        "P", (), {"image_mean": [0, 0, 0], "image_std": [1, 1, 1]})())
    assert perception.refiner is not None
    image = roofs(3).image
    dets = [Detection("building", 0.9, (0.1, 0.1, 0.3, 0.3))]
    moved = perception.refined(image, dets)
    want = refine_detections(refiner.eval(), image, dets)
    assert moved[0].box == pytest.approx(want[0].box) and moved[0].box != dets[0].box
    assert moved[0].score == 0.9  # rescore 0: the detector's score stays


def test_refiners_of_several_seeds_read_as_their_average_and_save_as_one(tmp_path) -> None:
    from rsvlm.refine import RefinerEnsemble, load_refiner, save_refiner

    torch.manual_seed(0)
    members = [BoxRefiner(32, 8) for _ in range(2)]
    for m in members:
        torch.nn.init.normal_(m.out[-1].weight, std=0.1)
    both = RefinerEnsemble(members).eval()
    crops = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        want = (members[0].eval()(crops) + members[1].eval()(crops)) / 2
        assert torch.allclose(both(crops), want, atol=1e-6)
    config = save_refiner(both, tmp_path)
    assert config["members"] == 2
    again = load_refiner(tmp_path, config)
    with torch.inference_mode():
        assert torch.allclose(again(crops), want, atol=1e-6)
    with pytest.raises(ValueError, match="same crops"):
        RefinerEnsemble([BoxRefiner(32, 8), BoxRefiner(64, 8)])
