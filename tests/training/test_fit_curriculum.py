"""Tiny end to end: build data from a generated raster -> fit a tiny random model through the
curriculum -> stop mid-stage and resume (same weights as an uninterrupted run) -> eval runs."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.build import BuildConfig, build_dataset
from training.fit import FitConfig, StageConfig, fit, latest_checkpoint, load_config
from training.region import load_region

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(small_region: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fitdata")
    spec = load_region(small_region, chip_size=128, val_fraction=0.2, block_chips=2)
    build_dataset(out, [spec], [], BuildConfig(seed=0, tasks=("caption", "vqa", "grounding")),
                  progress=False)
    return out


def _config(data: Path, out: Path) -> FitConfig:
    return FitConfig(
        data=str(data), output_dir=str(out), model="tiny",
        model_overrides={"retrieval_embed_dim": 384},  # the text encoder's dimension
        stages=[
            StageConfig("retriever", kind="retrieval", train=["retrieval_projection"],
                        epochs=1, lr=1e-3),
            StageConfig("align", tasks=["caption"], train=["connector"], epochs=0.6, lr=1e-3),
            StageConfig("instruct", train=["connector", "lora", "experts"], epochs=0.05,
                        lr=5e-4, semantic="retrieved"),
        ],
        batch_size=2, max_length=200, save_every=3, lora_r=4, lora_alpha=8, device="cpu",
        log_every=1,
    )


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    w = load_file(str(folder / "trained.safetensors"))
    adapter = folder / "adapter" / "adapter_model.safetensors"
    if adapter.is_file():
        w.update({f"adapter.{k}": v for k, v in load_file(str(adapter)).items()})
    return w


@pytest.mark.slow
def test_full_curriculum_resume_equivalence_and_eval(dataset: Path, small_region: Path,
                                         tmp_path: Path) -> None:
    full = fit(_config(dataset, tmp_path / "a"), progress=False)
    assert [s["stage"] for s in full["stages"]] == ["retriever", "align", "instruct"]
    assert all(s["final_loss"] is not None and s["final_loss"] == s["final_loss"]
               for s in full["stages"])
    final = Path(full["final"])
    manifest = json.loads((final / "trained.json").read_text())
    assert manifest["base_preset"] == "tiny" and "connector" in manifest["parts"]
    assert (final / "adapter").is_dir() and (final / "semantic_db").is_dir()
    assert (tmp_path / "a" / "config.yaml").is_file() and (tmp_path / "a" / "train.log").is_file()

    # Interrupted in the middle of the align stage, then resumed from the latest checkpoint.
    b = tmp_path / "b"
    align_start = full["stages"][0]["global_step"]
    stopped = fit(_config(dataset, b), max_steps=align_start + 2, progress=False)
    assert stopped["resumable"]
    ckpt = latest_checkpoint(b)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["stage"] == 1 and state["batches_done"] == 2
    assert (ckpt / "config.yaml").is_file()
    resumed = fit(_config(dataset, b), resume="latest", progress=False)
    wa, wb = _weights(final), _weights(Path(resumed["final"]))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k
    # Training changed the connector (it is not the random init any more).
    first = load_file(str(b / "stages" / "0-retriever" / "trained.safetensors"))
    moved = [k for k in first if k.startswith("connector.") and not torch.equal(first[k], wb[k])]
    assert moved

    # The trained parts load back into the tiny model and the eval harness runs on it.
    from rsvlm.engine import ChatEngine
    from rsvlm.loading import LoadedModel, apply_trained_parts
    from rsvlm.testing import tiny_model, tiny_processor
    from training.evaluate import run_eval

    model = apply_trained_parts(tiny_model(retrieval_embed_dim=384), final).eval()
    engine = ChatEngine(LoadedModel(model, tiny_processor(model.config)), max_new_tokens=8)

    def answer(chip, question: str) -> str:
        return "".join(engine.session(chip).ask(question))

    report = run_eval("vqa", small_region, answer, limit=6, region_overrides={"chip_size": 128},
                      progress=False)
    assert report["n"] == 6 and 0.0 <= report["accuracy"] <= 1.0


def test_align_stage_stop_and_resume_match_an_uninterrupted_run(dataset: Path,
                                                                  tmp_path: Path) -> None:
    """The fast version: one LM stage, stopped mid-epoch by max_steps, resumed."""
    def config(out: Path) -> FitConfig:
        cfg = _config(dataset, out)
        cfg.stages = [StageConfig("align", tasks=["caption"], train=["connector"], epochs=1,
                                  lr=1e-3)]
        cfg.database = False  # no text encoder in the fast test
        return cfg

    full = fit(config(tmp_path / "a"), progress=False)
    steps = full["stages"][0]["global_step"]
    assert steps >= 4
    fit(config(tmp_path / "b"), max_steps=steps // 2 + 1, progress=False)
    state = json.loads((latest_checkpoint(tmp_path / "b") / "trainer_state.json").read_text())
    assert state == {"stage": 0, "epoch": 0, "batches_done": steps // 2 + 1,
                     "global_step": steps // 2 + 1}
    resumed = fit(config(tmp_path / "b"), resume="latest", progress=False)
    wa = load_file(str(Path(full["final"]) / "trained.safetensors"))
    wb = load_file(str(Path(resumed["final"]) / "trained.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    losses = [json.loads(line)["loss"] for line in
              (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == steps and all(v == v for v in losses)  # logged every step, finite


def test_config_file_round_trip(tmp_path: Path) -> None:
    cfg = tmp_path / "fit.yaml"
    cfg.write_text("data: ds\noutput_dir: run\nmodel: tiny\ninit: prev/final\nstages:\n"
                   "  - {name: align, tasks: [caption], train: [connector], batch_size: 8}\n")
    loaded = load_config(cfg)
    assert loaded.data == str((tmp_path / "ds").resolve()) and loaded.stages[0].name == "align"
    assert loaded.init == str((tmp_path / "prev" / "final").resolve())
    assert loaded.stages[0].batch_size == 8
    cfg.write_text("data: ds\noutput_dir: run\nlearning_rate: 3\n")
    with pytest.raises(ValueError, match="unknown config keys: learning_rate"):
        load_config(cfg)
    with pytest.raises(ValueError, match="unknown parts"):
        StageConfig("x", train=["everything"])


def test_answer_only_loss_equals_the_models_own_loss(dataset: Path) -> None:
    """lm_loss projects only answer positions onto the vocabulary; the value must not change."""
    from rsvlm.testing import tiny_model, tiny_processor
    from training.lm_data import LMCollator, read_examples
    from training.losses import lm_loss

    model = tiny_model(seed=0)
    collate = LMCollator(tiny_processor(model.config), 200, image_root=dataset)
    batch = collate(read_examples(dataset, "train", None)[:3])
    assert (batch["labels"] != -100).sum() > 0
    reference = model(**batch).loss
    trimmed = lm_loss(model, batch)
    torch.testing.assert_close(trimmed, reference, rtol=1e-5, atol=1e-6)
    trimmed.backward()  # and it trains
    assert any(p.grad is not None for p in model.parameters())


def test_a_run_continues_from_parts_with_its_adapter_and_a_stage_batch_size(
        dataset: Path, tmp_path: Path) -> None:
    """`init: FOLDER` starts from another run's parts, LoRA still an adapter (what the shipped
    model's second round does); a stage's own batch_size replaces the run's."""
    import math

    common = {"data": str(dataset), "model": "tiny", "batch_size": 2, "max_length": 200,
              "lora_r": 4, "lora_alpha": 8, "device": "cpu", "database": False,
              "model_overrides": {"retrieval_embed_dim": 384}}
    first = fit(FitConfig(output_dir=str(tmp_path / "a"), **common, stages=[
        StageConfig("instruct", train=["connector", "lora"], epochs=0.05, lr=5e-4)]),
        progress=False)
    second = fit(FitConfig(output_dir=str(tmp_path / "b"), init=first["final"], **common,
                           stages=[StageConfig("retriever", kind="retrieval",
                                               train=["retrieval_projection"], epochs=1,
                                               lr=1e-3, batch_size=8)]),
                 progress=False)
    stage = second["stages"][0]
    assert stage["global_step"] == math.ceil(stage["examples"] / 8)
    before, after = _weights(Path(first["final"])), _weights(Path(second["final"]))
    assert before.keys() == after.keys()
    adapter = [k for k in before if k.startswith("adapter.")]
    assert adapter and "lora" in adapter[0]
    for key in before:
        same = torch.equal(before[key], after[key])
        assert same != key.startswith("retrieval_projection."), key
    with pytest.raises(ValueError, match="batch_size"):
        StageConfig("x", batch_size=0)


def test_a_continued_run_resumed_after_a_lora_stage_keeps_that_stages_adapter(
        dataset: Path, tmp_path: Path) -> None:
    """Resuming a run that started from other parts: the model is already a peft model when the
    previous stage's export is loaded, and its adapter must still be the one that stage left."""
    common = {"data": str(dataset), "model": "tiny", "batch_size": 2, "max_length": 200,
              "lora_r": 4, "lora_alpha": 8, "device": "cpu", "database": False,
              "save_every": 1, "model_overrides": {"retrieval_embed_dim": 384}}
    first = fit(FitConfig(output_dir=str(tmp_path / "a"), **common, stages=[
        StageConfig("instruct", train=["connector", "lora"], epochs=0.05, lr=5e-4)]),
        progress=False)
    stages = [StageConfig("instruct", train=["lora"], epochs=0.05, lr=5e-3),
              StageConfig("retriever", kind="retrieval", train=["retrieval_projection"],
                          epochs=1, lr=1e-3)]

    def run(out: Path, **kw) -> dict:
        return fit(FitConfig(output_dir=str(out), init=first["final"], **common,
                             stages=stages), progress=False, **kw)

    whole = run(tmp_path / "whole")
    lora_steps = whole["stages"][0]["global_step"]
    # resume="auto" (what the scripts pass): a fresh start first, then the continuation.
    assert run(tmp_path / "cut", max_steps=lora_steps + 1, resume="auto")["resumable"]
    resumed = run(tmp_path / "cut", resume="auto")
    assert resumed["stages"][0]["stage"] == "retriever"  # continued, not started again
    expect, got = _weights(Path(whole["final"])), _weights(Path(resumed["final"]))
    before = _weights(Path(first["final"]))
    adapter = [k for k in expect if k.startswith("adapter.")]
    assert any(not torch.equal(expect[k], before[k]) for k in adapter)  # the stage trained it
    for key in expect:
        torch.testing.assert_close(got[key], expect[key], msg=key)


def test_the_repos_fit_configs_load_and_name_real_architecture_fields() -> None:
    """The shipped model's two rounds and the connector ablations: valid configs whose
    overrides are RSVLMConfig fields, with paths inside the repository."""
    import os

    import yaml

    from rsvlm.configuration import RSVLMConfig

    repo = Path(__file__).resolve().parents[2]
    paths = sorted((repo / "training" / "configs").rglob("*.yaml"))
    assert len(paths) >= 5
    fields = set(RSVLMConfig().to_dict())
    for path in paths:
        cfg = load_config(path)
        assert set(cfg.model_overrides) <= fields, path
        raw = yaml.safe_load(path.read_text())
        for key in ("data", "output_dir"):  # as written: runs/ may be a symlink
            folder = Path(os.path.normpath(path.parent / raw[key]))
            assert folder.is_relative_to(repo / "runs"), (path, folder)
    connectors = {load_config(p).model_overrides.get("connector_type")
                  for p in paths if p.parent.name == "ablations"}
    assert connectors == {"mlp", "perceiver", "semantic_prompter"}


def test_database_rows_hold_each_training_text_once(tmp_path) -> None:
    from training.dataset_files import database_rows

    rows = [
        {"text": "An aerial image of a port.", "split": "train", "cls": "port", "image": "a.png"},
        {"text": "An aerial image of a port.", "split": "train", "cls": "port", "image": "b.png"},
        {"text": "A building in the top left.", "split": "train", "image": "c.png"},
        {"text": "A held-back chip.", "split": "val", "image": "d.png"},
        {"text": "An aerial image of a port.", "split": "val", "cls": "port", "image": "e.png"},
    ]
    (tmp_path / "texts.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    texts, meta = database_rows(tmp_path)
    assert texts == ["An aerial image of a port.", "A building in the top left."]
    assert [m["sources"] for m in meta] == [2, 1]  # validation rows are not counted
    assert meta[0]["image"] == "a.png" and meta[0]["cls"] == "port"
    # Regions are chosen before texts are merged: a text first seen in a region left out still
    # comes from the regions kept.
    for row, region in zip(rows, ["aid", "kept", "kept", "kept", "kept"], strict=True):
        row["region"] = region
    (tmp_path / "texts.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    texts, meta = database_rows(tmp_path, regions={"kept"})
    assert texts == ["An aerial image of a port.", "A building in the top left."]
    assert meta[0]["image"] == "b.png" and [m["sources"] for m in meta] == [1, 1]


def test_augmented_views_origins_and_stage_filter(small_region: Path, tmp_path: Path) -> None:
    from rsvlm.testing import tiny_model, tiny_processor
    from training.dataset_files import view_origins
    from training.stage_kinds import stage_batches

    spec = load_region(small_region, chip_size=128, val_fraction=0.2, block_chips=2)
    data = tmp_path / "aug"
    build_dataset(data, [spec], [], BuildConfig(seed=0, tasks=("grounding",), augment=1),
                  progress=False)
    origins = view_origins(data)
    assert origins and all("_d" in Path(k).name and "_d" not in Path(v).name
                           for k, v in origins.items())
    cfg = _config(data, tmp_path / "run")
    model = tiny_model(retrieval_embed_dim=384)
    processor = tiny_processor(model.config)
    everything, _ = stage_batches(cfg, StageConfig("g"), model, processor, None)
    originals, _ = stage_batches(cfg, StageConfig("g", augmented=False), model, processor,
                                 None)
    assert {e.image for e in everything} - {e.image for e in originals} == set(origins)
    assert not {e.image for e in originals} & set(origins)


def test_scene_classes_group_retrieval_positives(tmp_path: Path) -> None:
    from training.dataset_files import scene_texts

    rows = [{"text": "This image shows a park.", "level": "scene", "cls": "park",
             "image": "a.png", "region": "aid", "split": "train"},
            {"text": "A park seen from above.", "level": "scene", "cls": "park",
             "image": "b.png", "region": "aid", "split": "train"},
            {"text": "Four buildings.", "level": "scene", "image": "c.png", "region": "r",
             "split": "train"},
            {"text": "held back", "level": "scene", "image": "d.png", "split": "val"}]
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    scenes = scene_texts(tmp_path)
    assert scenes == {"a.png": ("This image shows a park.", "aid:park"),
                      "b.png": ("A park seen from above.", "aid:park"),
                      "c.png": ("Four buildings.", None)}


def test_overrides_that_disagree_with_init_parts_are_refused(tmp_path: Path) -> None:
    from training.model_setup import build_model

    init = tmp_path / "parts"
    init.mkdir()
    (init / "trained.json").write_text(json.dumps({"architecture": {"patch_pool": 4}}))
    cfg = FitConfig(data=str(tmp_path), output_dir=str(tmp_path / "o"), model="embedded",
                    init=str(init), model_overrides={"patch_pool": 2})
    with pytest.raises(ValueError, match="patch_pool"):
        build_model(cfg)


def test_database_positives_are_own_texts_and_the_scene_class(tmp_path: Path) -> None:
    from training.dataset_files import database_positives, database_rows

    rows = [{"text": "This image shows a park.", "level": "scene", "cls": "park",
             "image": "a.png", "region": "aid", "split": "train"},
            {"text": "A park seen from above.", "level": "scene", "cls": "park",
             "image": "b.png", "region": "aid", "split": "train"},
            {"text": "This image shows a port.", "level": "scene", "cls": "port",
             "image": "p.png", "region": "aid", "split": "train"},
            {"text": "An open area.", "level": "scene", "image": "c.png", "region": "r",
             "split": "train"},
            {"text": "A building in the top left.", "level": "object", "image": "c.png",
             "region": "r", "split": "train"},
            {"text": "An open area.", "level": "scene", "image": "e.png", "region": "r",
             "split": "train"},
            {"text": "A built-up area.", "level": "scene", "image": "u.png", "region": "r",
             "scene": "urban", "split": "train"},
            {"text": "A dense built-up area.", "level": "scene", "image": "v.png", "region": "r",
             "scene": "urban", "split": "train"},
            {"text": "Fields.", "level": "scene", "image": "f.png", "region": "r",
             "scene": "rural", "split": "train"},
            {"text": "Other town.", "level": "scene", "image": "o.png", "region": "q",
             "scene": "urban", "split": "train"},
            {"text": "held back", "level": "scene", "image": "d.png", "split": "val"}]
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts, _ = database_rows(tmp_path)
    pos = {img: [texts[i] for i in ids]
           for img, ids in database_positives(tmp_path, texts).items()}
    park = ["This image shows a park.", "A park seen from above."]
    assert pos == {"a.png": park, "b.png": park, "p.png": ["This image shows a port."],
                   "c.png": ["An open area.", "A building in the top left."],
                   "e.png": ["An open area."],  # a shared text is a positive of every owner
                   "u.png": ["A built-up area."], "v.png": ["A dense built-up area."],
                   "f.png": ["Fields."], "o.png": ["Other town."]}
    # scene_positives: a region's chips of one rural/urban label share their descriptions.
    pos = {img: [texts[i] for i in ids]
           for img, ids in database_positives(tmp_path, texts, scene=True).items()}
    urban = ["A built-up area.", "A dense built-up area."]
    assert pos["u.png"] == pos["v.png"] == urban
    assert pos["f.png"] == ["Fields."] and pos["o.png"] == ["Other town."]
    assert pos["a.png"] == park and pos["e.png"] == ["An open area."]


def test_a_retriever_reinitialised_and_trained_against_the_whole_database(
        dataset: Path, tmp_path: Path) -> None:
    """`negatives: database` + `reinit`: fresh projection weights, and the loss (a softmax over
    every database text) falls as it trains."""
    from rsvlm.loading import apply_trained_parts
    from rsvlm.testing import tiny_model
    from training.dataset_files import scene_texts
    from training.features import FeatureCache, cached_vision
    from training.model_setup import reinit_retrieval_projection
    from training.stage_data import database_batches

    trained = tiny_model(retrieval_embed_dim=384)
    proj = trained.retrieval_projection
    with torch.no_grad():
        proj.fc1.weight.fill_(1.0)
        proj.logit_scale.fill_(4.0)
    reinit_retrieval_projection(trained)
    assert proj.fc1.weight.std() > 0 and float(proj.logit_scale) == pytest.approx(2.6592, 1e-4)

    cfg = _config(dataset, tmp_path / "run")
    stage = StageConfig("retriever", kind="retrieval", train=["retrieval_projection"],
                        epochs=40, lr=3e-3, negatives="database", reinit=True, batch_size=64,
                        weight_decay=0.01)
    cfg.stages = [stage]
    result = fit(cfg, progress=False)
    losses = result["stages"][0]["losses"]
    assert losses[-1] < 0.8 * losses[0]
    # The fitted projection ranks a positive first for most training images (the run's own
    # feature cache stands in for the vision tower).
    model = apply_trained_parts(tiny_model(retrieval_embed_dim=384), Path(result["final"]))
    (cache_dir,) = (tmp_path / "run" / "feature_cache").iterdir()
    cache = FeatureCache(cache_dir)
    data, collate = database_batches(cfg, dataset, sorted(scene_texts(dataset)), cache)
    with torch.inference_mode(), cached_vision(model, cache):
        batch = collate(data)
        full = model.embed_image_for_retrieval(batch["rows"])
    best = (full @ batch["database"].T).argmax(1)
    assert batch["positives"][torch.arange(len(best)), best].mean() > 0.5
    # The stage trains on the level means only; they give the same image vectors.
    with torch.inference_mode(), cached_vision(model, cache.pooled(chunk=3)):
        pooled = model.embed_image_for_retrieval(batch["rows"])
    torch.testing.assert_close(pooled, full, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="retrieval stages only"):
        StageConfig("x", negatives="database")
    with pytest.raises(ValueError, match="reinit"):
        StageConfig("x", kind="retrieval", train=["connector"], reinit=True)


def test_retrieval_trains_on_views_of_classified_images_only(small_region: Path,
                                                            image_folder: Path,
                                                            tmp_path: Path) -> None:
    """A rotated scene keeps its class sentences as positives; a rotated region chip is left
    out (its description names positions the rotation moved). The run caches what its stages
    read, pooled when they are all retrieval stages."""
    from training.dataset_files import (
        class_views,
        database_positives,
        database_rows,
        scene_texts,
    )
    from training.features import FeatureCache, cached_vision
    from training.stage_data import database_batches
    from training.stage_kinds import stage_images

    spec = load_region(small_region, chip_size=128, val_fraction=0.2, block_chips=2)
    data = tmp_path / "aug"
    build_dataset(data, [spec], [image_folder], BuildConfig(seed=0, tasks=("grounding",),
                                                            augment=1),
                  folder_val_fraction=0.25, progress=False)
    scenes = scene_texts(data)
    views = class_views(data, scenes)
    chips = [json.loads(x) for x in (data / "chips.jsonl").read_text().splitlines()]
    region_views = {c["image"] for c in chips
                    if c.get("origin") and c["id"].startswith(f"{spec.name}/")}
    folder_views = {c["image"] for c in chips if c.get("origin")} - region_views
    assert region_views and folder_views and set(views) == folder_views
    assert all(scenes[o][1] is not None for o in views.values())

    cfg = _config(data, tmp_path / "run")
    cfg.model_overrides = {"retrieval_embed_dim": 384}
    stage = StageConfig("retriever", kind="retrieval", train=["retrieval_projection"],
                        epochs=1, lr=1e-3, negatives="database", positives="any")
    cfg.stages = [stage]
    images = stage_images(cfg)
    assert {str((data / v).resolve()) for v in views} <= set(images)
    assert not {str((data / v).resolve()) for v in region_views} & set(images)
    box_cfg = _config(data, tmp_path / "run2")
    box_cfg.stages = [StageConfig("b", kind="boxes", train=["box_head"])]
    assert not {str((data / v).resolve()) for v in folder_views} & set(stage_images(box_cfg))

    result = fit(cfg, progress=False)
    (cache_dir,) = (tmp_path / "run" / "feature_cache").iterdir()
    cache = FeatureCache(cache_dir)
    assert cache.array.shape[2] == 1  # pooled: one mean per level
    texts, _ = database_rows(data)
    positives = database_positives(data, texts)
    rows, collate = database_batches(cfg, data, sorted(scenes), cache, views)
    by_row = dict(rows)
    for view, origin in views.items():
        assert by_row[cache.rows[str((data / view).resolve())]] == positives[origin]
    # With one view per classified image, every other image is listed twice (same share).
    counts = Counter(r for r, _ in rows)
    for name in scenes:
        row = cache.rows[str((data / name).resolve())]
        if positives.get(name):
            assert counts[row] == (1 if name in views.values() else 2), name
    with pytest.raises(ValueError, match="positives"):
        StageConfig("x", kind="retrieval", train=["retrieval_projection"], positives="any")
    with pytest.raises(ValueError, match="scene_positives"):
        StageConfig("x", kind="retrieval", train=["retrieval_projection"],
                    scene_positives=True)
    assert len(result["stages"][0]["losses"]) >= 1

    # The pooled rows give the vectors the full rows give.
    from rsvlm.loading import apply_trained_parts
    from rsvlm.testing import tiny_model

    model = apply_trained_parts(tiny_model(retrieval_embed_dim=384), Path(result["final"]))
    full = FeatureCache.build(tmp_path / "full", images[:6], Path("/"), model.vision_tower,
                              tiny_processor_for(model).image_processor, progress=False)
    pooled = FeatureCache.build(tmp_path / "full", images[:6], Path("/"), model.vision_tower,
                                tiny_processor_for(model).image_processor, progress=False,
                                pooled=True)
    assert full.folder != pooled.folder
    idx = torch.arange(6)
    with torch.inference_mode():
        with cached_vision(model, full):
            a = model.embed_image_for_retrieval(idx)
        with cached_vision(model, pooled):
            b = model.embed_image_for_retrieval(idx)
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def tiny_processor_for(model: object) -> object:
    from rsvlm.testing import tiny_processor

    return tiny_processor(model.config)
