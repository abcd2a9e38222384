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
