from pathlib import Path

from training.probe import run_probe


def test_linear_probe_on_tiny_random_vision_tower(image_folder: Path) -> None:
    """Colour classes are linearly separable even in a random ViT's pooled features."""
    import torch
    from transformers import AutoModel, Dinov2Config

    from rsvlm.testing import TINY_VISION, tiny_image_processor

    torch.manual_seed(0)
    vision = AutoModel.from_config(Dinov2Config(**{k: v for k, v in TINY_VISION["dinov2"].items()
                                                   if k != "model_type"}))
    report = run_probe(image_folder, vision=vision, image_processor=tiny_image_processor(),
                       layers=[1, 2], train_per_class=2)
    assert report["n_train"] == 6 and report["n_test"] == 6
    assert report["feature_dim"] == 2 * 2 * 32
    assert report["accuracy"] >= 2 / 3
    assert set(report["per_class"]) == {"bare land", "dense residential", "forest"}


def test_probe_on_a_build_data_folder_uses_its_split(image_folder: Path, tmp_path: Path) -> None:
    """Given a dataset folder, the probe trains on its train split and tests on its val split,
    the same images `eval --data DIR` scores the chat model on."""
    import json

    import torch
    from transformers import AutoModel, Dinov2Config

    from rsvlm.testing import TINY_VISION, tiny_image_processor
    from training.build import BuildConfig, build_dataset

    build_dataset(tmp_path, [], [image_folder], BuildConfig(seed=0), folder_val_fraction=0.4,
                  progress=False)
    n_val = sum(json.loads(line)["task"] == "classification"
                for line in (tmp_path / "val.jsonl").read_text().splitlines())
    torch.manual_seed(0)
    vision = AutoModel.from_config(Dinov2Config(**{k: v for k, v in TINY_VISION["dinov2"].items()
                                                   if k != "model_type"}))
    report = run_probe(tmp_path, vision=vision, image_processor=tiny_image_processor(),
                       layers=[1, 2])
    assert 0 < n_val < 12
    assert report["n_test"] == n_val and report["n_train"] == 12 - n_val
    assert report["split_from"] == str(tmp_path) and report["train_per_class"] is None
