"""Tiny random checkpoints of every pretrained family, loaded as a hub id would be, asked
questions through the engine, the CLI and the app's backend, in fp32 and NF4 on the CPU."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rsvlm.backends import FamilyError
from rsvlm.backends.tiny import FAMILIES, write_tiny_checkpoint
from rsvlm.engine import ChatEngine
from rsvlm.loading import load

os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUESTIONS = ("find all buildings", "how many are there?")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_backends")
    return {f: write_tiny_checkpoint(f, root / f) for f in FAMILIES}


def _image(width: int = 200, height: int = 120) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


class _Retriever:
    def retrieve_image(self, image):
        return [{"text": "Dense residential area with metal roofs.", "score": 0.7}]


def _engine(folder: Path, **kwargs) -> ChatEngine:
    loaded = load(str(folder), device="cpu", quantize=kwargs.pop("quantize", None))
    # Florence-2's random decoder would stop at once: a few tokens make the stream observable.
    generation = {"min_new_tokens": 3} if loaded.family.name == "florence2" else None
    return ChatEngine(loaded, max_new_tokens=8, generation=generation, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_hub_layout_loads_and_answers_with_semantic_context(checkpoints, family) -> None:
    folder = checkpoints[family]
    names = set(os.listdir(folder))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    engine = _engine(folder, osm=lambda chip: ["OSM building=house: 12"], retriever=_Retriever())
    assert type(engine).__name__ == "PretrainedEngine" and engine.info["family"] == family
    session = engine.session(_image())
    pieces = list(session.ask(QUESTIONS[0]))
    answer = session.last
    assert answer is not None and answer.timing["prefill_tokens"] > 0
    assert "".join(pieces).strip() and answer.text.strip()
    assert "".join(pieces).strip() == session.turns[-1][1]  # the stream is the model's own text
    assert answer.retrieved[0]["text"].startswith("Dense residential")
    if family != "florence2":  # Florence-2's task prompts have no room for context
        assert "OSM building=house: 12" in answer.prompt and "Dense residential" in answer.prompt
    ablated = _engine(folder, osm=lambda chip: ["OSM building=house: 12"], retriever=_Retriever(),
                      semantic_context=False).session(_image())
    list(ablated.ask(QUESTIONS[0]))
    assert "OSM building" not in ablated.last.prompt and ablated.last.retrieved


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "llava"])
def test_follow_up_reuses_the_cache_and_answers_as_a_fresh_prefill(checkpoints, family) -> None:
    engine = _engine(checkpoints[family])
    cached = engine.session(_image())
    fresh = engine.session(_image())
    for q in QUESTIONS[:1]:
        list(cached.ask(q))
        list(fresh.ask(q))
    fresh.drop_cache()  # the second turn of `fresh` encodes the whole conversation again
    list(cached.ask(QUESTIONS[1]))
    list(fresh.ask(QUESTIONS[1]))
    assert cached.last.timing["prefill_tokens"] < fresh.last.timing["prefill_tokens"] / 2
    assert cached.last.text == fresh.last.text


def test_only_the_most_recent_sessions_keep_their_cache(checkpoints) -> None:
    engine = _engine(checkpoints["llava"], max_cached_sessions=2)
    sessions = [engine.session(_image()) for _ in range(3)]
    for session in sessions:
        list(session.ask(QUESTIONS[0]))
    assert [s._cache is not None for s in sessions] == [False, True, True]
    list(sessions[0].ask(QUESTIONS[1]))  # evicted: answers from a fresh prefill, and caches again
    assert sessions[0]._cache is not None and sessions[1]._cache is None


@pytest.mark.parametrize("family", FAMILIES)
def test_nf4_on_the_cpu_keeps_vision_and_head_16_bit(checkpoints, family) -> None:
    import bitsandbytes as bnb

    engine = _engine(checkpoints[family], quantize=True)
    model = engine.model
    four_bit = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert four_bit and "NF4" in engine.info["precision"]
    assert not any(n.startswith(("model.visual", "model.vision_tower", "model.multi_modal_projector",
                                 "lm_head")) for n in four_bit)
    assert all(".language_model." in n for n in four_bit)
    assert model.get_output_embeddings().weight.dtype == torch.float32
    session = engine.session(_image())
    assert "".join(session.ask(QUESTIONS[0])) is not None and session.last is not None


def test_qwen25_frame_is_the_processors_actual_resize(checkpoints) -> None:
    engine = _engine(checkpoints["qwen2_5_vl"])
    processor = engine.processor
    # The pinned budget (256..1280 x 28 x 28 px) replaces the checkpoint's own: a 500 x 300 chip
    # is seen as 588 x 364 (see test_backend_conventions).
    inputs = processor(text=["<|vision_start|><|image_pad|><|vision_end|>x"],
                       images=[_image(500, 300)], return_tensors="pt")
    frame = engine.family.frame(processor, inputs, None)
    assert frame["resized"] == (588, 364)
    session = engine.session(_image(500, 300))
    answer = session._answer('[{"bbox_2d": [147, 91, 294, 182], "label": "building"}]',
                             type("E", (), {"frame": frame, "prompt": ""})(),
                             type("S", (), {"first_token_at": None, "n_new": 0})(), 0.0, 0.0, 1)
    assert answer.boxes[0].box_px == pytest.approx((125, 75, 250, 150))
    assert "<ref>building</ref><box>[250,250,500,500]</box>" in answer.text


def test_unsupported_model_type_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(FamilyError, match="not a supported vision-language family.*qwen2_5_vl"):
        load(str(tmp_path), device="cpu")


def test_untrained_large_preset_needs_the_explicit_flag() -> None:
    from rsvlm.presets import PresetError

    with pytest.raises(PresetError, match="--allow-untrained"):
        load("large", device="cuda")  # refused before any device or memory check


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_ask_with_a_tiny_checkpoint(checkpoints, tmp_path: Path, capsys, family) -> None:
    from rsvlm.cli import main

    path = tmp_path / "chip.png"
    _image().save(path)
    assert main(["ask", str(path), "find all buildings", "--model", str(checkpoints[family]),
                 "--max-new-tokens", "6", "--json", "--no-context", "--retriever", "none"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"answer", "boxes", "retrieved", "timing"}
    assert out["timing"]["prefill_tokens"] > 0


def test_tiny_checkpoint_command_and_bad_checkpoints(tmp_path: Path, capsys) -> None:
    import shutil

    from rsvlm.cli import main as rsvlm_main
    from rsvlm.testing import main

    assert main(["tiny-checkpoint", "--family", "llava", "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "m", broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(RuntimeError, match="Could not load .* as llava"):
        load(str(broken), device="cpu")
    path = tmp_path / "chip.png"
    _image().save(path)
    capsys.readouterr()
    assert rsvlm_main(["ask", str(path), "hi", "--model", str(broken), "--retriever", "none"]) == 2
    assert "Could not load" in capsys.readouterr().err
    assert rsvlm_main(["ask", str(path), "hi", "--model", str(tmp_path / "missing-model")]) == 2


def test_scan_runs_a_pretrained_family(checkpoints, tmp_path: Path) -> None:
    import rasterio
    from rasterio.transform import from_origin

    import tiles
    from rsvlm.scan import scan

    path = tmp_path / "scene.tif"
    data = np.random.default_rng(0).integers(0, 255, (3, 200, 300), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=300, height=200, count=3, dtype="uint8",
                       crs="EPSG:32636", transform=from_origin(500000, 40000, 1.0, 1.0)) as ds:
        ds.write(data)
    engine = _engine(checkpoints["qwen3_vl"])
    with tiles.open_source(path) as source:
        result = scan(source, "find all buildings", engine=engine, chip_size=128, batch_size=2,
                      max_new_tokens=4)
    assert result.chips_done == result.chips_total > 1 and not result.cancelled


def test_the_embedded_retriever_serves_a_pretrained_family(checkpoints) -> None:
    from rsvlm.backends.retriever import EmbeddedRetriever
    from rsvlm.loading import LoadedModel
    from rsvlm.retrieval import SemanticDatabase
    from rsvlm.testing import tiny_model, tiny_processor

    texts = ["Dense residential area.", "Farmland with fields.", "An airport runway."]

    def encode(batch):
        rng = np.random.default_rng(len(batch[0]))
        vectors = rng.normal(size=(len(batch), 16)).astype("float32")
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    database = SemanticDatabase.from_texts(texts, encoder=encode)
    model = tiny_model()
    retriever = EmbeddedRetriever(LoadedModel(model, tiny_processor(model.config), database, {}), k=2)
    hits = retriever.retrieve_image(_image())
    assert len(hits) == 2 and all(h["text"] in texts for h in hits)
    session = _engine(checkpoints["llava"], retriever=retriever).session(_image())
    list(session.ask("describe the image"))
    assert [h["text"] for h in session.last.retrieved] == [h["text"] for h in hits]
    assert all(h["text"] in session.last.prompt for h in hits)


def test_a_gpu_too_small_names_the_smaller_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import rsvlm.loading as loading

    monkeypatch.setattr(loading, "_cuda_free_gb", lambda device: 7.0)
    with pytest.raises(loading.GPUMemoryError, match="qwen2.5-vl-3b") as info:
        load("qwen2.5-vl-7b", device="cuda")  # refused before any download
    assert "needs about 10 GiB" in str(info.value) and "--model embedded" in str(info.value)
    monkeypatch.setattr(loading, "_cuda_free_gb", lambda device: 3.0)
    with pytest.raises(loading.GPUMemoryError) as info:
        load("qwen2.5-vl-3b", device="cuda")
    assert "--model embedded" in str(info.value) and "qwen3-vl" not in str(info.value)


def test_unparseable_boxes_stay_text_and_are_logged(checkpoints, caplog) -> None:
    engine = _engine(checkpoints["qwen2_5_vl"])
    session = engine.session(_image(500, 300))
    frame = {"resized": (588, 364)}
    with caplog.at_level("WARNING"):
        answer = session._answer('[{"bbox_2d": [1, 2, "three"], "label": "x"}]',
                                 type("E", (), {"frame": frame, "prompt": ""})(),
                                 type("S", (), {"first_token_at": None, "n_new": 0})(), 0.0, 0.0, 1)
    assert answer.boxes == [] and answer.text == '[{"bbox_2d": [1, 2, "three"], "label": "x"}]'
    assert "do not parse" in caplog.text


@pytest.mark.parametrize("family", FAMILIES)
def test_scan_batches_answer_as_one_chip_at_a_time(checkpoints, family) -> None:
    import tiles

    rng = np.random.default_rng(1)
    chips = [tiles.PlainImageSource.from_array(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8),
                                               f"c{i}").chip() for i in range(3)]
    # Contexts of different lengths: the batch is padded on the left.
    osm = {id(c): [f"OSM building=house: {i}"] * (i + 1) for i, c in enumerate(chips)}
    engine = _engine(checkpoints[family], osm=lambda chip: osm.get(id(chip), []))
    batched = engine.answer_chips(chips, "find all buildings", max_new_tokens=6)
    one_by_one = []
    for chip in chips:
        session = engine.session(chip)
        list(session.ask("find all buildings", max_new_tokens=6))
        one_by_one.append(session.last.text)
    assert batched == one_by_one
