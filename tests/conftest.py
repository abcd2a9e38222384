"""Suite-wide settings: never reach for the Hugging Face hub (this environment has no network to
it, and tests must not depend on one)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Engines decode in PyTorch unless a test asks for ONNX Runtime (tests/rsvlm/test_onnx_decode.py):
# exporting a decoder per test model would only slow the suite down.
os.environ.setdefault("RSVLM_DECODE", "torch")


def _tiny_for_fit(cfg, architecture):
    """``model: tiny`` in a fit config: the tiny random model of `rsvlm.testing`."""
    from rsvlm.testing import tiny_model, tiny_processor

    model = tiny_model(seed=cfg.seed, **architecture)
    return model, tiny_processor(model.config)


def _register_tiny() -> None:
    from training.model_setup import register_model_builder

    register_model_builder("tiny", _tiny_for_fit)


_register_tiny()
