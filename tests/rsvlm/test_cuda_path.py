"""The large preset's CUDA path, checked without a GPU: 4-bit plan, attention, memory errors."""

from __future__ import annotations

import pytest
import torch

from rsvlm import loading
from rsvlm.presets import Preset, load_preset


def test_large_plan_is_nf4_bf16_double_quant_with_sdpa() -> None:
    plan = loading.with_attention(load_preset("large").plan("cuda", convert=False), "cuda")
    assert plan.quantized and plan.dtype == "bfloat16"
    language, vision = plan.components["language"].kwargs, plan.components["vision"].kwargs
    bnb = language["quantization_config"]
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4"
    assert bnb.bnb_4bit_use_double_quant and bnb.bnb_4bit_compute_dtype == torch.bfloat16
    assert language["device_map"] == {"": 0}
    assert vision["dtype"] == "bfloat16" and "quantization_config" not in vision  # 16-bit tower
    expected = "flash_attention_2" if loading._attention("cuda") == "flash_attention_2" else "sdpa"
    assert language["attn_implementation"] == vision["attn_implementation"] == expected
    assert loading._attention("cpu") == "sdpa"


def test_too_little_free_gpu_memory_is_said_before_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "_cuda_free_gb", lambda device: 3.0)
    monkeypatch.setattr(loading, "_assemble", lambda *a, **k: pytest.fail("must not load"))
    with pytest.raises(loading.GPUMemoryError) as info:
        loading.load("large", device="cuda", allow_untrained=True)
    message = str(info.value)
    assert "--model embedded" in message and "3.0 GiB are free" in message
    assert "--quantize" not in message  # already 4-bit: no point suggesting it


def test_fallback_preset_is_loaded_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "_cuda_free_gb", lambda device: 3.0)
    original = loading._load_preset

    def fake(preset: Preset, **kwargs):
        if preset.name == "large":
            return original(preset, **kwargs)  # raises on the memory check
        return loading.LoadedModel(
            None,
            None,
            None,
            {"preset": preset.name, "device": "cpu", "precision": "float32", "trained": True},
        )

    monkeypatch.setattr(loading, "_load_preset", fake)
    said: list[str] = []
    loaded = loading.load("large", device="cuda", fallback="embedded", progress=said.append,
                          allow_untrained=True)
    assert loaded.info["preset"] == "embedded"
    assert loaded.info["why"].startswith("fallback:") and "out of memory" in loaded.info["why"]
    assert any("instead" in m for m in said)


def test_out_of_memory_while_loading_becomes_a_readable_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(loading, "_cuda_free_gb", lambda device: 80.0)
    plan = Preset.plan
    monkeypatch.setattr(
        Preset, "plan", lambda self, device, **k: plan(self, device, convert=False, **k)
    )

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loading, "_assemble", oom)
    with pytest.raises(loading.GPUMemoryError, match="ran out of memory.*--model embedded") as info:
        loading.load("large", device="cuda", allow_untrained=True)  # 4-bit already: --quantize would not help
    assert "--quantize" not in str(info.value)
    with pytest.raises(loading.GPUMemoryError, match="--quantize"):  # bf16 load: 4-bit would help
        loading.load("large", device="cuda", quantize=False, allow_untrained=True)


def test_is_cuda_oom() -> None:
    assert loading.is_cuda_oom(torch.OutOfMemoryError("x"))
    assert loading.is_cuda_oom(RuntimeError("CUDA error: out of memory"))
    assert not loading.is_cuda_oom(ValueError("out of memory"))
    assert not loading.is_cuda_oom(RuntimeError("shape mismatch"))
