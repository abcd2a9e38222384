"""The box head's training: patch targets, the loss, and a `boxes` stage of `fit`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.box_targets import assign_patches, box_head_loss, generalized_iou
from training.build import BuildConfig, build_dataset
from training.dataset_files import grounding_boxes
from training.fit import FitConfig, StageConfig, fit
from training.model_setup import build_model, load_parts
from training.region import load_region


def test_patches_answer_for_the_box_around_them_and_the_smaller_box_wins() -> None:
    big = [0.0, 0.0, 1.0, 1.0]
    small = [0.5, 0.5, 0.75, 0.75]  # centre patch (2, 2) of a 4x4 grid
    tiny = [0.05, 0.05, 0.1, 0.1]  # far smaller than a patch: its centre patch still answers
    assign = assign_patches(torch.tensor([big, small, tiny]), grid=4).view(4, 4)
    assert assign[2, 2] == 1 and assign[0, 0] == 2
    # Centre sampling: near the big box's centre, not its far corners.
    assert assign[1, 1] == 0 and assign[3, 3] == -1
    assert (assign_patches(torch.tensor([small]), grid=4) >= 0).sum() >= 1
    assert (assign_patches(torch.zeros(0, 4), grid=4) == -1).all()


def test_loss_is_low_for_right_boxes_and_confident_right_patches() -> None:
    truth = torch.tensor([[[0.5, 0.5, 0.75, 0.75]]])
    assign = assign_patches(truth[0], grid=4)[None]
    positive = assign >= 0
    good_logits = torch.where(positive, 8.0, -8.0)
    good_boxes = truth[0, 0].expand(1, 16, 4)
    bad_boxes = torch.tensor([0.0, 0.0, 0.1, 0.1]).expand(1, 16, 4)
    good = box_head_loss(good_logits, good_boxes, assign, truth)
    assert good < 0.01
    assert box_head_loss(-good_logits, good_boxes, assign, truth) > good + 1
    assert box_head_loss(good_logits, bad_boxes, assign, truth) > good + 1
    a = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    assert generalized_iou(a, a).item() == pytest.approx(1.0)
    assert generalized_iou(a, torch.tensor([[0.5, 0.5, 1.0, 1.0]])).item() < 0


def test_a_boxes_stage_needs_the_box_head_alone() -> None:
    StageConfig("boxes", kind="boxes", train=["box_head"])
    with pytest.raises(ValueError, match="box head trains alone"):
        StageConfig("boxes", kind="boxes", train=["box_head", "connector"])
    with pytest.raises(ValueError, match="box head trains alone"):
        StageConfig("instruct", train=["box_head"])


@pytest.fixture(scope="module")
def grounding_data(small_region: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("boxdata")
    spec = load_region(small_region, chip_size=128, val_fraction=0.0)
    build_dataset(out, [spec], [], BuildConfig(seed=0, tasks=("grounding",)), progress=False)
    return out


def test_fit_trains_the_box_head_and_exports_it(grounding_data: Path, tmp_path: Path) -> None:
    samples = grounding_boxes(grounding_data)
    assert samples and all(len(b) >= 1 and len(b[0]) == 4 for _, _, b in samples)
    head = {"box_head_dim": 16, "box_head_layers": 1, "box_head_heads": 2}
    cfg = FitConfig(data=str(grounding_data), output_dir=str(tmp_path / "run"), model="tiny",
                    model_overrides=head, database=False, device="cpu", batch_size=8,
                    log_every=1, save_every=1000,
                    stages=[StageConfig("boxes", kind="boxes", train=["box_head"], epochs=12,
                                        lr=3e-3)])
    summary = fit(cfg, progress=False)
    (stage,) = summary["stages"]
    losses = stage["losses"]
    assert stage["examples"] == len(samples)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    final = Path(summary["final"])
    assert "box_head" in json.loads((final / "trained.json").read_text())["parts"]
    saved = load_file(str(final / "trained.safetensors"))
    assert any(k.startswith("box_head.") for k in saved)
    # The exported head loads into a fresh model and predicts what the trained one did.
    fresh, processor, _, _ = build_model(cfg)
    before = fresh.box_head.score.weight.clone()
    fresh = load_parts(fresh, final).eval()
    assert not torch.equal(before, fresh.box_head.score.weight)
    assert torch.equal(fresh.box_head.score.weight, saved["box_head.score.weight"])
