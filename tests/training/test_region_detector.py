"""The finetune step that continues the shipped detector on a region's training chips: it
reads only the training split, starts from the shipped weights, chooses its thresholds again
and is not run again once written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rsvlm.perception import CONFIG_NAME, WEIGHTS_NAME, DetectorConfig, save_detector
from training.detection import THRESHOLDS
from training.region import load_region
from training.region_detector import region_items, tune_detector


class Tower:
    """Stand-in for the frozen tower: per patch of a 32 x 32 grid, the view's mean colour."""

    def __init__(self) -> None:
        self.seen = 0

    def __call__(self, images):
        self.seen += len(images)
        out = []
        for im in images:
            t = torch.from_numpy(np.array(im)).permute(2, 0, 1).float()[None] / 255
            f = torch.nn.functional.interpolate(t, size=(32, 32), mode="area")[0]
            f = f.flatten(1).T.repeat(1, 3)[:, :8]
            out.append(torch.stack([f, 1 - f]))
        return torch.stack(out).half()


@pytest.mark.parametrize("heads", [1, 2])  # the shipped detector averages several
def test_the_detector_continues_on_the_training_chips_only(small_region: Path, tmp_path: Path,
                                                           heads: int):
    spec = load_region(str(small_region), chip_size=128, block_chips=2)
    train = region_items(spec, seed=0)
    held = region_items(spec, seed=0, split="val")
    assert train and held and not {t.name for t in train} & {h.name for h in held}
    assert sum(len(t.boxes) for t in train) > 10

    config = DetectorConfig(labels=["building"], input_size=56, layers=[1, 2], hidden=8, dim=8,
                            convs=1, heads=heads, threshold=0.35, count_threshold=0.3,
                            count_factor=1.1)
    torch.manual_seed(0)
    shipped = tmp_path / "shipped"
    save_detector(config.build(), config, shipped)
    tower = Tower()
    folder = tune_detector(spec, shipped, tmp_path / "run" / "detector", epochs=2,
                           views_per_chip=2, tower=tower)
    assert folder is not None and tower.seen == 2 * len([t for t in train if len(t.boxes)])
    saved = json.loads((folder / CONFIG_NAME).read_text())
    # Thresholds chosen again (on the training chips), the shipped ones noted.
    assert {saved["threshold"], saved["count_threshold"]} <= set(THRESHOLDS)
    assert saved["notes"]["shipped_thresholds"] == [0.35, 0.3]
    assert saved["count_factor"] == 1.0  # the region's own threshold counts 1:1
    assert saved["notes"]["tuned_on"] == spec.name and saved["heads"] == heads
    before = load_file(str(shipped / "detector" / WEIGHTS_NAME))
    after = load_file(str(folder / WEIGHTS_NAME))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # Written once: a second call (a resumed finetune) trains nothing.
    assert tune_detector(spec, shipped, tmp_path / "run" / "detector", tower=tower) == folder
    assert tower.seen == 2 * len([t for t in train if len(t.boxes)])
    # Parts without a detector: nothing to tune.
    assert tune_detector(spec, tmp_path / "none", tmp_path / "x", tower=tower) is None


def test_a_detector_of_several_classes_learns_only_buildings_from_the_region(
        small_region: Path, tmp_path: Path):
    """The region's chips label buildings: the tree heatmap's own weights get no gradient
    (weight decay alone moves them), the building heatmap's move."""
    spec = load_region(str(small_region), chip_size=128, block_chips=2)
    config = DetectorConfig(labels=["building", "tree"], input_size=56, layers=[1, 2], hidden=8,
                            dim=8, convs=1, threshold=0.35, count_threshold=0.3,
                            class_thresholds={"tree": [0.3, 0.3]})
    torch.manual_seed(0)
    shipped = tmp_path / "shipped"
    save_detector(config.build(), config, shipped)
    folder = tune_detector(spec, shipped, tmp_path / "run" / "detector", epochs=2,
                           views_per_chip=2, tower=Tower())
    before = load_file(str(shipped / "detector" / WEIGHTS_NAME))
    after = load_file(str(folder / WEIGHTS_NAME))
    moved = (after["heat.weight"] - before["heat.weight"]).abs().flatten(1).amax(1)
    assert moved[0] > 10 * moved[1] and moved[1] < 1e-3, moved
    saved = json.loads((folder / CONFIG_NAME).read_text())
    assert saved["labels"] == ["building", "tree"] and saved["class_thresholds"] == {
        "tree": [0.3, 0.3]}


def test_the_shipped_box_refiner_goes_along_with_the_tuned_detector(small_region: Path,
                                                                    tmp_path: Path):
    from rsvlm.perception import detector_refiner, load_detector
    from rsvlm.refine import REFINER_NAME, BoxRefiner

    spec = load_region(str(small_region), chip_size=128, block_chips=2)
    config = DetectorConfig(labels=["building"], input_size=56, layers=[1, 2], hidden=8, dim=8,
                            convs=1, threshold=0.35, count_threshold=0.3,
                            refiner={"steps": 1, "rescore": 0.0, "labels": ["building"]})
    torch.manual_seed(0)
    shipped = tmp_path / "shipped"
    save_detector(config.build(), config, shipped, BoxRefiner(32, 8))
    folder = tune_detector(spec, shipped, tmp_path / "run" / "detector", epochs=1,
                           views_per_chip=2, tower=Tower())
    assert (folder / REFINER_NAME).read_bytes() == (
        shipped / "detector" / REFINER_NAME).read_bytes()
    _, tuned = load_detector(folder.parent)
    assert tuned.refiner["labels"] == ["building"]
    assert detector_refiner(folder.parent, tuned) is not None
