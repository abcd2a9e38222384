"""Model presets: the shipped JSON files, config building, load plans and the default choice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rsvlm.presets import (
    PresetError,
    available_presets,
    default_preset_choice,
    hub_repo_cached,
    load_preset,
)


def test_shipped_presets_make_valid_configs() -> None:
    assert {"embedded", "large"} <= set(available_presets())
    embedded = load_preset("embedded").to_config()
    # Middle DINOv2 layers (the last block of this copy is specialised), never only the last.
    assert embedded.vision_feature_layers == [7, 9, 11]
    assert (
        embedded.vision_config.model_type == "dinov2" and embedded.text_config.model_type == "llama"
    )
    assert embedded.connector_type == "semantic_prompter"
    assert embedded.expert_layer_indices == [3, 7, 11, 15, 19, 23, 27]
    assert embedded.num_patches == 256 and embedded.retrieval_embed_dim == 384

    large = load_preset("large").to_config()
    # Seed 003: 1/3, 2/3 and the last of SigLIP2's 27 layers, 3 experts every 4th LLM layer.
    assert large.vision_feature_layers == [9, 18, 27]
    assert large.vision_config.num_hidden_layers == 27 and large.text_config.model_type == "qwen2"
    assert large.num_levels == 3 and large.expert_layer_indices == list(range(3, 28, 4))
    assert large.prompter_num_tokens == 144 and large.num_patches == 27 * 27


def test_overrides_and_bad_overrides() -> None:
    preset = load_preset("embedded")
    assert preset.to_config(connector_type="mlp").connector_type == "mlp"
    with pytest.raises(PresetError, match="valid model config"):
        preset.to_config(connector_type="qformer")


def test_embedded_config_matches_converted_parts() -> None:
    """The offline shapes in embedded.json agree with the converted checkpoints' configs."""
    from transformers import AutoConfig

    from rsvlm import weights

    paths = weights.embedded_weight_paths()
    if not all((paths[c] / "config.json").is_file() for c in (weights.VISION, weights.LANGUAGE)):
        pytest.skip("embedded weights not converted yet (run tests/rsvlm/test_weights.py -m slow)")
    preset = load_preset("embedded")
    for role, key in ((weights.VISION, "vision_config"), (weights.LANGUAGE, "text_config")):
        real = AutoConfig.from_pretrained(paths[role]).to_dict()
        for name, value in getattr(preset, key).items():
            assert real[name] == pytest.approx(value), (role, name)
    config = preset.to_config(
        vision_config=AutoConfig.from_pretrained(paths[weights.VISION]),
        text_config=AutoConfig.from_pretrained(paths[weights.LANGUAGE]),
    )
    assert config.num_image_tokens == preset.to_config().num_image_tokens


def test_plans() -> None:
    embedded = load_preset("embedded").plan("cpu", convert=False)
    assert not embedded.quantized and embedded.dtype == "float32"
    assert embedded.components["vision"].model_class == "Dinov2Model"
    assert embedded.components["text_encoder"].model_class == "SentenceTransformer"
    assert "on cpu" in embedded.describe()

    large = load_preset("large").plan("cuda", convert=False)
    qconfig = large.components["language"].kwargs["quantization_config"]
    assert large.quantized and qconfig.load_in_4bit and qconfig.bnb_4bit_quant_type == "nf4"
    assert (
        qconfig.bnb_4bit_use_double_quant
        and str(qconfig.bnb_4bit_compute_dtype) == "torch.bfloat16"
    )
    assert large.components["language"].location == "Qwen/Qwen2.5-7B-Instruct"
    assert "quantization_config" not in large.components["vision"].kwargs  # vision stays 16-bit
    with pytest.raises(PresetError, match="CUDA"):
        load_preset("large").plan("cpu", convert=False)
    forced = load_preset("embedded").plan("cpu", quantize=True, convert=False)
    assert forced.quantized and "quantization_config" in forced.components["language"].kwargs


def test_unknown_and_malformed_presets(tmp_path: Path) -> None:
    with pytest.raises(PresetError, match="unknown preset 'huge'.*embedded"):
        load_preset("huge")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PresetError, match="cannot read"):
        load_preset(bad)
    incomplete = tmp_path / "incomplete.json"
    data = json.loads(load_preset("embedded").path.read_text())
    del data["components"]["language"]
    incomplete.write_text(json.dumps(data))
    with pytest.raises(PresetError, match="lacks components"):
        load_preset(incomplete)


def test_preset_round_trips_through_a_file(tmp_path: Path) -> None:
    preset = load_preset("large")
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({**preset.to_dict(), "name": "mine"}))
    mine = load_preset(path)
    assert mine.name == "mine" and mine.to_config().to_dict() == preset.to_config().to_dict()


def test_default_choice() -> None:
    name, why = default_preset_choice(cuda_memory_gb=None)
    assert name == "embedded" and "no CUDA GPU" in why
    # A pretrained Qwen-VL in 4-bit on a GPU; the untrained large preset never.
    name, why = default_preset_choice(cuda_memory_gb=24.0, cached=True)
    assert name == "qwen2.5-vl-7b" and "cached" in why and "4-bit" in why
    name, why = default_preset_choice(cuda_memory_gb=24.0,
                                      cached={"Qwen/Qwen3-VL-8B-Instruct": True})
    assert name == "qwen3-vl-8b"  # a cached model of the tier wins over a download
    name, why = default_preset_choice(cuda_memory_gb=24.0, cached=False, offline=True)
    assert name == "embedded" and "HF_HUB_OFFLINE" in why
    name, why = default_preset_choice(cuda_memory_gb=24.0, cached=False, offline=False)
    assert name == "qwen2.5-vl-7b" and "downloaded" in why
    name, why = default_preset_choice(cuda_memory_gb=8.0, cached=False, offline=False)
    assert name == "qwen2.5-vl-3b" and "needs about 10 GiB" in why
    name, why = default_preset_choice(cuda_memory_gb=4.0, cached=True)
    assert name == "embedded" and "qwen2.5-vl-3b" in why and "6 GiB" in why
    for memory in (None, 4.0, 8.0, 16.0, 80.0):
        for cached in (True, False):
            assert default_preset_choice(cuda_memory_gb=memory, cached=cached)[0] != "large"


def test_which_explains_a_gpu_machine_without_one(capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from rsvlm.cli import main

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    assert main(["which", "--gpu-memory-gb", "24", "--offline"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("embedded:") and "HF_HUB_OFFLINE" in out and "qwen2.5-vl-7b" in out
    assert main(["which", "--gpu-memory-gb", "12"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(("qwen2.5-vl-7b:", "qwen3-vl-8b:")) and "4-bit NF4" in first


def test_hub_cache_detection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A repo counts as cached only with config and every weight shard in the HF cache."""
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    snapshot = hub / "models--org--tiny" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (hub / "models--org--tiny" / "refs").mkdir()
    (hub / "models--org--tiny" / "refs" / "main").write_text("a" * 40)
    assert not hub_repo_cached("org/tiny")
    (snapshot / "config.json").write_text("{}")
    index = {
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        }
    }
    (snapshot / "model.safetensors.index.json").write_text(json.dumps(index))
    (snapshot / "model-00001-of-00002.safetensors").write_bytes(b"x")
    assert not hub_repo_cached("org/tiny")
    (snapshot / "model-00002-of-00002.safetensors").write_bytes(b"x")
    assert hub_repo_cached("org/tiny")


def test_a_folder_of_trained_parts_loads_on_its_base_preset(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`load("runs/x/final")` (a `fit` output: trained.json, no config.json) assembles the
    base preset it names with those parts, as eval, the app and `rsvlm ask --model` expect."""
    from rsvlm import loading

    (tmp_path / loading.TRAINED_JSON).write_text(json.dumps(
        {"base_preset": "embedded", "architecture": {}, "parts": ["connector"]}))
    seen: dict = {}

    def assemble(preset, **kwargs):
        seen.update(preset=preset.name, **kwargs)
        return loading.LoadedModel(None, None, None, {"preset": preset.name, "device": "cpu",
                                                      "precision": "float32", "trained": True})

    monkeypatch.setattr(loading, "_load_preset", assemble)
    loaded = loading.load(str(tmp_path), device="cpu")
    assert seen["preset"] == "embedded" and seen["trained_dir"] == tmp_path
    assert loaded.info["trained"]
