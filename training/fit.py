"""Curriculum training (`rsvlm-train fit --config FILE`).

Reads top to bottom: parse the config; build the model (a preset, or `tiny` for tests); cache
the frozen vision tower's features; run the stages; export the trained parts in the layout
`rsvlm.loading` reads (`trained.json`, `trained.safetensors`, `adapter/`, `semantic_db/`).

Stages (LHRS-Bot's curriculum, seed 003's retriever):

- `retrieval`: the retriever's image projection, InfoNCE against the frozen text encoder's
  embeddings of each chip's scene description (CLIP-style, learnable temperature). With
  `negatives: database` every text of the semantic database is a candidate, as at inference:
  the positives are the image's own descriptions and every sentence of its scene class;
- `lm` stages: next-token loss on answers. Stage 1 aligns the connector on captions; stage 2
  tunes connector + LoRA + semantic experts on every task; an optional stage 3 repeats that on
  the analyst's own data (`data:` per stage). `semantic: retrieved` feeds each image the top-k
  descriptions the trained retriever finds (never the image's own), as at inference.

Checkpoints (`accelerate` save_state/load_state: trainable weights, optimizer, scheduler, RNG)
are written every `save_every` optimizer steps and at the end of every epoch, with
`trainer_state.json` (stage, epoch, batches done) and the resolved config; `--resume latest`
continues mid-epoch with `skip_first_batches` over the same seeded order (`--resume auto`: the
same when a checkpoint exists, a fresh start otherwise).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.features import FeatureCache, cached_vision
from training.lm_data import EpochSampler, LMCollator, read_examples

log = logging.getLogger(__name__)

PARTS = ("connector", "lora", "experts", "retrieval_projection", "box_head")
STAGE_KINDS = ("lm", "retrieval", "boxes")


@dataclass
class StageConfig:
    """One curriculum stage."""

    name: str
    # "lm" (next-token loss), "retrieval" (InfoNCE) or "boxes" (the box head on the grounding
    # samples' boxes; see training.box_targets)
    kind: str = "lm"
    tasks: list[str] | None = None  # dataset tasks to train on; None: all
    train: list[str] = field(default_factory=lambda: ["connector"])  # parts, see PARTS
    epochs: float = 1.0  # fractions stop early (e.g. 0.5)
    lr: float = 1e-4
    warmup_ratio: float = 0.03
    semantic: str = "none"  # "none" or "retrieved" (needs a trained retrieval projection)
    data: str | None = None  # another dataset folder (stage 3: the analyst's own data)
    # The run's batch_size unless set: InfoNCE wants large batches (every other image in the
    # batch is a negative), and the retrieval stage is cheap per sample.
    batch_size: int | None = None
    # Also train on the rotated/mirrored views of `build-data --augment`; false keeps the
    # original chips only (e.g. a stage that should see tasks in their built proportions).
    augmented: bool = True
    # Retrieval stages: "batch" (CLIP: the other images' descriptions in the batch are the
    # negatives) or "database" (a softmax over every text the shipped database will hold).
    negatives: str = "batch"
    # `negatives: database` only: "spread" (the target spread evenly over an image's positives)
    # or "any" (MIL-NCE, Miech et al. 2020: the probability of any positive, so an image may sit
    # nearest one of its class's sentences instead of between all of them).
    positives: str = "spread"
    # `negatives: database` only: a region chip's positives also hold the scene descriptions of
    # the other training chips of its region with its rural/urban label, so that an unseen chip
    # lands on a description of a chip like it rather than on a scene-class sentence.
    scene_positives: bool = False
    # Retrieval stages: start the projection from fresh weights instead of the init's parts.
    reinit: bool = False
    weight_decay: float | None = None  # the run's weight_decay unless set

    def __post_init__(self) -> None:
        if self.kind not in STAGE_KINDS:
            raise ValueError(f"stage {self.name}: kind must be one of {STAGE_KINDS}")
        bad = set(self.train) - set(PARTS)
        if bad:
            raise ValueError(f"stage {self.name}: unknown parts {sorted(bad)}; choose from {PARTS}")
        if self.semantic not in {"none", "retrieved"}:
            raise ValueError(f"stage {self.name}: semantic must be 'none' or 'retrieved'")
        if self.epochs <= 0 or self.lr <= 0:
            raise ValueError(f"stage {self.name}: epochs and lr must be positive")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"stage {self.name}: batch_size must be >= 1")
        if self.negatives not in {"batch", "database"}:
            raise ValueError(f"stage {self.name}: negatives must be 'batch' or 'database'")
        if self.positives not in {"spread", "any"}:
            raise ValueError(f"stage {self.name}: positives must be 'spread' or 'any'")
        if (self.positives != "spread" or self.scene_positives) and self.negatives != "database":
            raise ValueError(f"stage {self.name}: positives and scene_positives apply to "
                             "negatives: database")
        if self.kind != "retrieval" and (self.negatives != "batch" or self.reinit):
            raise ValueError(f"stage {self.name}: negatives and reinit apply to retrieval "
                             "stages only")
        if (self.kind == "boxes") != ("box_head" in self.train) or (
                self.kind == "boxes" and self.train != ["box_head"]):
            raise ValueError(f"stage {self.name}: the box head trains alone, in a 'boxes' "
                             "stage (train: [box_head])")
        if self.reinit and self.train != ["retrieval_projection"]:
            raise ValueError(f"stage {self.name}: reinit resets the retrieval projection; "
                             "train: [retrieval_projection] only")


def default_stages() -> list[StageConfig]:
    return [
        StageConfig("retriever", kind="retrieval", train=["retrieval_projection"], epochs=3,
                    lr=1e-3),
        StageConfig("align", tasks=["caption"], train=["connector"], epochs=1, lr=1e-3),
        StageConfig("instruct", tasks=None, train=["connector", "lora", "experts"], epochs=1,
                    lr=2e-4, semantic="retrieved"),
    ]


@dataclass
class FitConfig:
    """Training arguments (the model's architecture lives in its preset / config)."""

    data: str  # a `build-data` folder
    output_dir: str
    model: str = "embedded"  # preset name, or "tiny" (random tiny model, for tests)
    init: str = "base"  # "base": untrained connector; "trained": the preset's shipped parts;
    # or a folder of trained parts (a `fit` run's final/) to continue from
    # RSVLMConfig fields replacing the preset's (or the tiny model's): ablations such as
    # {connector_type: mlp} or {experts_enabled: false}
    model_overrides: dict[str, Any] = field(default_factory=dict)
    stages: list[StageConfig] = field(default_factory=default_stages)
    seed: int = 0
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 1024
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    save_every: int = 200  # optimizer steps between checkpoints
    keep_checkpoints: int = 2
    cache_features: bool = True  # vision tower output cached on disk (frozen tower)
    mixed_precision: str = "no"  # accelerate: "no" | "fp16" | "bf16"
    device: str | None = None  # None: accelerate's choice (CUDA when available)
    retrieval_top_k: int = 3
    log_every: int = 10
    text_encoder: str | None = None  # sentence-transformers folder (default: the embedded one)
    database: bool = True  # ship the semantic database (texts.jsonl, train split) with the parts

    def __post_init__(self) -> None:
        self.stages = [s if isinstance(s, StageConfig) else StageConfig(**s) for s in self.stages]
        if not self.stages:
            raise ValueError("the config has no stages")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path) -> FitConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping")
    known = {f.name for f in dataclasses.fields(FitConfig)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown config keys: {', '.join(sorted(unknown))}")
    # Relative paths are relative to the config file.
    for key in ("data", "output_dir"):
        if key in data and not Path(data[key]).is_absolute():
            data[key] = str((path.parent / data[key]).resolve())
    init = data.get("init")
    if init and init not in {"base", "trained"} and not Path(init).is_absolute():
        data["init"] = str((path.parent / init).resolve())
    for stage in data.get("stages", []) or []:
        if stage.get("data") and not Path(stage["data"]).is_absolute():
            stage["data"] = str((path.parent / stage["data"]).resolve())
    return FitConfig(**data)


# ----------------------------------------------------------------------------------- model


def build_model(cfg: FitConfig) -> tuple[Any, Any, str, dict[str, Any]]:
    """(model, processor, base preset name, architecture overrides)."""
    if cfg.model == "tiny":
        from rsvlm.testing import tiny_model, tiny_processor

        model = tiny_model(seed=cfg.seed, **cfg.model_overrides)
        processor = tiny_processor(model.config)
        if cfg.init not in {"base", "trained"}:
            model = load_parts(model, Path(cfg.init), cfg)
        return model, processor, "tiny", dict(cfg.model_overrides)
    from rsvlm.loading import load

    trained: Any = cfg.init == "trained" or (cfg.init not in {"base", "trained"} and cfg.init)
    if isinstance(trained, str) and cfg.model_overrides:
        # Parts load in the shape their trained.json records, whatever the overrides say; a
        # disagreement would train one architecture and export another's description.
        from rsvlm.loading import TRAINED_JSON

        manifest = Path(trained) / TRAINED_JSON
        arch = json.loads(manifest.read_text()).get("architecture", {}) if manifest.is_file() else {}
        clash = {k: (arch[k], v) for k, v in cfg.model_overrides.items()
                 if k in arch and arch[k] != v}
        if clash:
            raise ValueError(f"model_overrides {clash} (init's value, override) disagree with "
                             f"init {trained}: start from parts of that shape (copy the folder "
                             "and edit its trained.json if the change keeps the weights' shapes)")
    # The shipped adapter stays an adapter (not merged), so further training continues it and
    # the exported adapter still applies to the stock LM.
    loaded = load(cfg.model, device="cpu", trained=trained, merge_lora=False,
                  architecture=dict(cfg.model_overrides) or None, allow_untrained=True)
    preset = loaded.info.get("preset", cfg.model)
    # The whole architecture goes into trained.json, so the parts keep loading into the shape
    # they were trained in even if the preset's defaults change later.
    return (loaded.model, loaded.processor, preset,
            {**_preset_architecture(preset), **cfg.model_overrides})


def _preset_architecture(name: str) -> dict[str, Any]:
    from rsvlm.presets import PresetError, load_preset

    try:
        return dict(load_preset(name).architecture)
    except PresetError:  # a saved model folder, not a preset: its config holds the shape
        return {}


def _base(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def configure_parts(model: Any, parts: list[str], cfg: FitConfig) -> Any:
    """Freeze everything but `parts`; wraps the model with LoRA the first time it is asked for."""
    if "lora" in parts and not hasattr(model, "peft_config"):
        import peft

        from rsvlm.modeling import lora_target_modules

        lora = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                               lora_dropout=cfg.lora_dropout,
                               target_modules=lora_target_modules(tuple(cfg.lora_targets)))
        model = peft.get_peft_model(model, lora)
    base = _base(model)
    base.set_trainable(vision_tower=False, connector="connector" in parts, language_model=False,
                       experts="experts" in parts,
                       retrieval_projection="retrieval_projection" in parts,
                       box_head="box_head" in parts)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_("lora" in parts)
    return model


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_parts(model: Any, folder: Path, base_preset: str, architecture: dict[str, Any],
               database: Any = None) -> Path:
    """Every non-frozen-base part (connector, experts, retrieval projection, box head, LoRA
    adapter)."""
    from rsvlm.loading import save_trained_parts

    parts = ["connector", "experts"]
    if _base(model).retrieval_projection is not None:
        parts.append("retrieval_projection")
    if _base(model).box_head is not None:
        parts.append("box_head")
    return save_trained_parts(model, folder, base_preset=base_preset, architecture=architecture,
                              parts=parts, database=database)


def load_parts(model: Any, folder: Path, cfg: FitConfig) -> Any:
    """Load a stage's exported parts (LoRA stays a trainable adapter, not merged)."""
    from safetensors.torch import load_file

    from rsvlm.loading import ADAPTER_DIR, TRAINED_TENSORS

    state = load_file(str(folder / TRAINED_TENSORS))
    _base(model).load_state_dict(state, strict=False)
    adapter = folder / ADAPTER_DIR
    if adapter.is_dir():
        import peft

        if hasattr(model, "peft_config"):
            # Already a peft model (a run that started from other parts, `init: FOLDER`):
            # this export's adapter weights replace the ones it started with.
            weights = load_file(str(adapter / "adapter_model.safetensors"))
            result = peft.set_peft_model_state_dict(model, weights)
            if result.unexpected_keys:
                raise ValueError(f"{adapter} does not fit this model's LoRA layers "
                                 f"(e.g. {result.unexpected_keys[:3]})")
        else:
            model = peft.PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    return model


# ----------------------------------------------------------------------------------- data


def _scene_texts(data_dir: Path, split: str = "train") -> dict[str, tuple[str, str | None]]:
    """image -> (its scene description, its scene class or None) from texts.jsonl.

    The class (ImageFolder rows carry ``cls``) makes two images of one class positives of each
    other in the retrieval loss even when their sentences come from different templates."""
    path = data_dir / "texts.jsonl"
    out: dict[str, tuple[str, str | None]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            if r.get("level") == "scene" and r.get("split", "train") == split:
                group = f"{r.get('region')}:{r['cls']}" if r.get("cls") else None
                out.setdefault(r["image"], (r["text"], group))
    return out


def database_rows(data_dir: Path, regions: Collection[str] | None = None,
                  ) -> tuple[list[str], list[dict[str, Any]]]:
    """(texts, metadata) of a build-data folder's training-split descriptions (of ``regions``
    only, when given), each text once.

    Templated sentences repeat (a scene-class sentence per image of the class, "an open area
    without buildings" per empty chip): kept as separate rows they fill all top-k slots of a
    retrieval with one text. A text keeps its first row's metadata and ``sources``, the number of
    rows it stood for."""
    texts: list[str] = []
    meta: list[dict[str, Any]] = []
    first: dict[str, int] = {}
    path = data_dir / "texts.jsonl"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            if r.get("split", "train") != "train":
                continue  # validation chips stay unseen, their texts too
            if regions is not None and r.get("region") not in regions:
                continue
            if r["text"] in first:
                meta[first[r["text"]]]["sources"] += 1
                continue
            first[r["text"]] = len(texts)
            texts.append(r["text"])
            meta.append({**{k: v for k, v in r.items() if k != "text"}, "sources": 1})
    return texts, meta


def database_positives(data_dir: Path, texts: list[str], scene: bool = False
                       ) -> dict[str, list[int]]:
    """image -> indices into ``texts`` (`database_rows`) that are right answers for it: every
    description written for the image, and every sentence of its scene class (ImageFolder
    images; another image's class sentence is as right as its own). With ``scene``, a region
    chip's also include the scene descriptions of its region's chips with its rural/urban
    label."""
    index = {t: i for i, t in enumerate(texts)}
    own: dict[str, set[int]] = {}
    by_class: dict[str, set[int]] = {}
    image_class: dict[str, str] = {}
    for line in (data_dir / "texts.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if r.get("split", "train") != "train" or r["text"] not in index:
            continue
        i = index[r["text"]]
        own.setdefault(r["image"], set()).add(i)
        if r.get("cls"):
            group = f"{r.get('region')}:{r['cls']}"
        elif scene and r.get("level") == "scene" and r.get("scene"):
            group = f"{r.get('region')}:scene:{r['scene']}"
        else:
            continue
        by_class.setdefault(group, set()).add(i)
        image_class[r["image"]] = group
    return {img: sorted(ids | by_class.get(image_class.get(img, ""), set()))
            for img, ids in own.items()}


def _class_views(data_dir: Path, scenes: dict[str, tuple[str, str | None]]) -> dict[str, str]:
    """Rotated/mirrored view -> its origin image (paths as in the dataset), for origins with a
    scene class: their class sentences describe every view, while a region chip's description
    names positions ("a building in the top right") that a view moves."""
    path = data_dir / "chips.jsonl"
    out: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            origin = r.get("origin")
            if origin and origin in scenes and scenes[origin][1] is not None:
                out[r["image"]] = origin
    return out


def _text_encoder(cfg: FitConfig) -> Any:
    from rsvlm.weights import text_encoder

    return text_encoder(cfg.text_encoder)


def _origins(data_dir: Path) -> dict[str, str]:
    """Absolute path of each rotated/mirrored training chip -> that of the chip it shows."""
    path = data_dir / "chips.jsonl"
    out: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            if r.get("origin"):
                out[str((data_dir / r["image"]).resolve())] = str((data_dir / r["origin"]).resolve())
    return out


def _retrieved_texts(model: Any, cache: FeatureCache, images: list[str], database: Any,
                     k: int, origins: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Top-k database texts per image, leaving out the descriptions only this image has (a text
    that other images share, e.g. a scene-class sentence, says nothing private about it). A
    rotated view of a chip leaves out its origin's descriptions the same way."""
    origins = origins or {}
    base = _base(model)
    out: dict[str, list[str]] = {}
    with torch.inference_mode():
        for start in range(0, len(images), 64):
            names = images[start:start + 64]
            rows = torch.tensor([cache.rows[n] for n in names])
            levels = cache.levels(rows, torch.float32, "cpu")
            vec = base.retrieval_projection.to("cpu", torch.float32)(levels)
            vec = torch.nn.functional.normalize(vec, dim=-1).numpy()
            hits = database.search(vec, k + 8)
            for name, hs in zip(names, hits, strict=True):
                out[name] = [
                    h.text for h in hs
                    if h.metadata.get("image") != origins.get(name, name)
                    or h.metadata.get("sources", 1) > 1
                ][:k]
    return out


# ----------------------------------------------------------------------------------- training


@dataclass
class TrainerState:
    stage: int = 0
    epoch: int = 0
    batches_done: int = 0  # batches of the current epoch already consumed
    global_step: int = 0  # optimizer steps over all stages

    def save(self, folder: Path) -> None:
        (folder / "trainer_state.json").write_text(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def load(cls, folder: Path) -> TrainerState:
        return cls(**json.loads((folder / "trainer_state.json").read_text()))


def latest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    complete = [p for p in ckpts if (p / "trainer_state.json").is_file()]
    return complete[-1] if complete else None


class _Stop(Exception):
    """max_steps reached (a checkpoint was written)."""


def fit(cfg: FitConfig, *, resume: str | None = None, max_steps: int | None = None,
        progress: bool = True) -> dict[str, Any]:
    """Run the curriculum; returns a summary (also written to output_dir/summary.json)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("training").addHandler(handler)
    try:
        return _fit(cfg, out, resume, max_steps, progress)
    finally:
        logging.getLogger("training").removeHandler(handler)
        handler.close()


def _fit(cfg: FitConfig, out: Path, resume: str | None, max_steps: int | None,
         progress: bool) -> dict[str, Any]:
    import yaml
    from accelerate.utils import set_seed

    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    state, ckpt = TrainerState(), None
    if resume == "auto":  # scripts: continue a run if it has a checkpoint, else start it
        resume = "latest" if latest_checkpoint(out) is not None else None
    if resume:
        ckpt = latest_checkpoint(out) if resume == "latest" else Path(resume)
        if ckpt is None or not (ckpt / "trainer_state.json").is_file():
            raise FileNotFoundError(f"no checkpoint to resume from ({resume!r} in {out})")
        state = TrainerState.load(ckpt)
        log.info("resuming from %s: %s", ckpt, state)
    set_seed(cfg.seed)
    model, processor, preset, arch = build_model(cfg)
    if state.stage > 0:
        prev = out / "stages" / f"{state.stage - 1}-{cfg.stages[state.stage - 1].name}"
        model = load_parts(model, prev, cfg)

    # Vision features of every image any stage will read, computed once.
    cache = None
    if cfg.cache_features:
        images = _stage_images(cfg)
        if cfg.device != "cpu" and torch.cuda.is_available():
            _base(model).vision_tower.to("cuda")  # the rest follows in accelerator.prepare
        # A run of retrieval stages only needs the level means (see RetrievalProjection).
        pooled = all(s.kind == "retrieval" for s in cfg.stages)
        cache = FeatureCache.build(out / "feature_cache", images, Path("/"),
                                   _base(model).vision_tower, processor.image_processor,
                                   progress=progress, pooled=pooled)
    summary: dict[str, Any] = {"output_dir": str(out), "stages": []}
    t0 = time.perf_counter()
    try:
        for i in range(state.stage, len(cfg.stages)):
            stage = cfg.stages[i]
            stage_state = state if i == state.stage else TrainerState(i, 0, 0, state.global_step)
            model, stats = _run_stage(cfg, i, stage, model, processor, cache, stage_state,
                                      ckpt if i == state.stage else None, max_steps, progress)
            state = TrainerState(i + 1, 0, 0, stats["global_step"])
            save_parts(model, out / "stages" / f"{i}-{stage.name}", preset, arch)
            summary["stages"].append(stats)
            ckpt = None
    except _Stop as stop:
        summary["stopped"] = str(stop)
        summary["resumable"] = True
        return summary
    database = _final_database(cfg) if cfg.database else None
    final = save_parts(model, out / "final", preset, arch, database)
    summary.update({"final": str(final), "train_s": round(time.perf_counter() - t0, 1),
                    "global_step": state.global_step})
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _stage_images(cfg: FitConfig) -> list[str]:
    """Absolute paths of the images the stages read: a box stage its grounding chips only, a
    retrieval stage the described images (and their views), not every training image."""
    images: set[str] = set()
    for stage in cfg.stages:
        data_dir = Path(stage.data or cfg.data)
        if stage.kind == "retrieval":
            scenes = _scene_texts(data_dir)
            names = set(scenes) | (set(_class_views(data_dir, scenes)) if stage.augmented
                                   else set())
        elif stage.kind == "boxes":
            names = {image for image, _, _ in grounding_boxes(data_dir)}
        else:
            names = {ex.image for ex in read_examples(data_dir, "train", stage.tasks)}
        images |= {str((data_dir / n).resolve()) for n in names}
    return sorted(images)


def _final_database(cfg: FitConfig) -> Any:
    texts, meta = database_rows(Path(cfg.data))
    if not texts:
        return None
    from rsvlm.retrieval import SemanticDatabase

    return SemanticDatabase.from_texts(texts, meta, _text_encoder(cfg))


def _stage_batches(cfg: FitConfig, idx: int, stage: StageConfig, model: Any, processor: Any,
                   cache: FeatureCache | None) -> tuple[Any, Any]:
    """(dataset, collate_fn) for a stage."""
    data_dir = Path(stage.data or cfg.data)
    if stage.kind == "retrieval":
        if cache is None:
            raise ValueError("the retrieval stage needs cache_features: true")
        scenes = _scene_texts(data_dir)
        if not scenes:
            raise ValueError(f"{data_dir} has no scene descriptions (texts.jsonl) to align with")
        views = _class_views(data_dir, scenes) if stage.augmented else {}
        names = sorted(scenes)
        if stage.negatives == "database":
            return _database_batches(cfg, data_dir, names, cache, views,
                                     scene=stage.scene_positives)
        scenes.update({view: scenes[origin] for view, origin in views.items()})
        names = _with_views(sorted(scenes), views)
        vectors = torch.from_numpy(_text_encoder(cfg).encode([scenes[n][0] for n in names]))
        rows = [cache.rows[str((data_dir / n).resolve())] for n in names]
        # Positives of each other: images of one class, and images with one description.
        group_ids: dict[str, int] = {}
        groups = [group_ids.setdefault(scenes[n][1] or f"text:{scenes[n][0]}", len(group_ids))
                  for n in names]
        dataset = list(zip(rows, vectors, groups, strict=True))

        def collate(items: list[tuple[int, torch.Tensor, int]]) -> dict[str, torch.Tensor]:
            return {"rows": torch.tensor([r for r, _, _ in items]),
                    "text": torch.stack([v for _, v, _ in items]),
                    "group": torch.tensor([g for _, _, g in items])}

        return dataset, collate
    if stage.kind == "boxes":
        return _box_batches(data_dir, stage, model, processor, cache)
    examples = read_examples(data_dir, "train", stage.tasks)
    if not examples:
        raise ValueError(f"stage {stage.name}: no training examples for tasks {stage.tasks}")
    # Absolute image keys, so one feature cache serves several datasets.
    examples = [dataclasses.replace(ex, image=str((data_dir / ex.image).resolve()))
                for ex in examples]
    origins = _origins(data_dir)
    if not stage.augmented and origins:
        examples = [ex for ex in examples if ex.image not in origins]
    semantic = None
    if stage.semantic == "retrieved":
        texts, meta = database_rows(data_dir)
        if texts and cache is not None and _base(model).retrieval_projection is not None:
            from rsvlm.retrieval import SemanticDatabase

            for m in meta:
                m["image"] = str((data_dir / m["image"]).resolve())
            db = SemanticDatabase.from_texts(texts, meta, _text_encoder(cfg))
            semantic = _retrieved_texts(model, cache, sorted({e.image for e in examples}), db,
                                        cfg.retrieval_top_k, origins)
        else:
            log.warning("stage %s: no database or retriever; training without semantic texts",
                        stage.name)
    collate = LMCollator(processor, cfg.max_length, rows=cache.rows if cache else None,
                         image_root=Path("/"), semantic=semantic)
    return examples, collate


def _with_views(names: list[str], views: dict[str, str]) -> list[str]:
    """``names`` plus the views; an image without views is listed as often as one with them
    (itself + its views), so that the views do not shrink the other images' share of the
    batches (region chips would otherwise fall from a quarter of the retriever's data to a
    twentieth, and their retrievals drift)."""
    if not views:
        return names
    per_origin: Counter[str] = Counter(views.values())
    repeat = 1 + max(per_origin.values())
    out = []
    for n in names:
        if n in views:
            continue
        out += [n] if n in per_origin else [n] * repeat
    return sorted(out + list(views))


def _database_batches(cfg: FitConfig, data_dir: Path, names: list[str],
                      cache: FeatureCache, views: dict[str, str] | None = None,
                      scene: bool = False) -> tuple[Any, Any]:
    """Rows + positives over the whole database (`negatives: database`); a view of a
    classified image has its origin's positives (`_class_views`)."""
    texts, _ = database_rows(data_dir)
    positives = database_positives(data_dir, texts, scene)
    views = {v: o for v, o in (views or {}).items() if positives.get(o)}
    for view, origin in views.items():
        positives[view] = positives[origin]
    names = _with_views([n for n in names if positives.get(n)], views)
    database = torch.nn.functional.normalize(
        torch.from_numpy(_text_encoder(cfg).encode(texts)).float(), dim=-1)
    dataset = [(cache.rows[str((data_dir / n).resolve())], positives[n]) for n in names]

    def collate(items: list[tuple[int, list[int]]]) -> dict[str, torch.Tensor]:
        pos = torch.zeros(len(items), len(texts))
        for row, (_, ids) in enumerate(items):
            pos[row, ids] = 1.0
        return {"rows": torch.tensor([r for r, _ in items]), "positives": pos,
                "database": database}

    return dataset, collate


def grounding_boxes(data_dir: Path, split: str = "train") -> list[tuple[str, str, list]]:
    """(image, question, boxes in pixels) of every grounding sample of a split: a referring
    expression's one box, or every box of a "find all" question."""
    out = []
    path = data_dir / f"{split}.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        boxes = (r.get("meta") or {}).get("boxes_px")
        if r["task"] != "grounding" or not boxes:
            continue
        question = r["conversations"][0]["value"].replace("<image>", "").strip()
        out.append((r["image"], question, boxes))
    return out


def _box_batches(data_dir: Path, stage: StageConfig, model: Any, processor: Any,
                 cache: FeatureCache | None) -> tuple[Any, Any]:
    """(cache row, question ids, patch assignment, boxes in 0-1) per grounding sample."""
    from PIL import Image

    from training.box_targets import assign_patches

    if cache is None:
        raise ValueError(f"stage {stage.name}: the box head trains on cache_features: true")
    head = _base(model).box_head
    if head is None:
        raise ValueError(f"stage {stage.name}: the model has no box head; set "
                         "model_overrides: {box_head_dim: 192}")
    origins = _origins(data_dir)
    samples = [s for s in grounding_boxes(data_dir)
               if stage.augmented or str((data_dir / s[0]).resolve()) not in origins]
    if not samples:
        raise ValueError(f"stage {stage.name}: {data_dir} has no grounding samples with boxes")
    sizes: dict[str, tuple[int, int]] = {}
    dataset = []
    for image, question, boxes_px in samples:
        key = str((data_dir / image).resolve())
        if key not in sizes:
            with Image.open(key) as im:  # the header only
                sizes[key] = im.size
        w, h = sizes[key]
        boxes = torch.tensor(boxes_px, dtype=torch.float32) / torch.tensor([w, h, w, h])
        ids, _ = processor.encode_queries([question])
        dataset.append((cache.rows[key], ids[0], assign_patches(boxes, head.grid), boxes))

    def collate(items: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]
                ) -> dict[str, torch.Tensor]:
        width = max(len(ids) for _, ids, _, _ in items)
        most = max(len(b) for _, _, _, b in items)
        ids = torch.zeros(len(items), width, dtype=torch.long)
        mask = torch.zeros(len(items), width, dtype=torch.long)
        truth = torch.zeros(len(items), most, 4)
        for i, (_, q, _, b) in enumerate(items):
            ids[i, :len(q)], mask[i, :len(q)] = q, 1
            truth[i, :len(b)] = b
        return {"rows": torch.tensor([r for r, _, _, _ in items]), "query_input_ids": ids,
                "query_attention_mask": mask,
                "assign": torch.stack([a for _, _, a, _ in items]), "truth": truth}

    return dataset, collate


def _reinit_retrieval_projection(model: Any) -> None:
    proj = _base(model).retrieval_projection
    if proj is None:
        raise ValueError("reinit: this model has no retrieval projection")
    for module in proj.modules():
        if module is not proj and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    with torch.no_grad():
        proj.logit_scale.fill_(proj.INITIAL_LOGIT_SCALE)


def _run_stage(cfg: FitConfig, idx: int, stage: StageConfig, model: Any, processor: Any,
               cache: FeatureCache | None, state: TrainerState, ckpt: Path | None,
               max_steps: int | None, progress: bool) -> tuple[Any, dict[str, Any]]:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    out = Path(cfg.output_dir)
    # Each stage starts from its own seed, so a resumed run initialises LoRA exactly as the
    # uninterrupted one did, whatever happened to the RNG before.
    set_seed(cfg.seed + 1000 * (idx + 1))
    model = configure_parts(model, stage.train, cfg)
    if stage.kind == "retrieval" and cache is not None:
        cache = cache.pooled()  # the projection reads level means only
    if stage.reinit:  # a resumed stage then loads its checkpoint's weights over these
        _reinit_retrieval_projection(model)
    model.train()
    dataset, collate = _stage_batches(cfg, idx, stage, model, processor, cache)
    sampler = EpochSampler(len(dataset), cfg.seed + 17 * idx)
    # Its own generator: creating an iterator (also the one skip_first_batches makes) then
    # draws no number from the global RNG, whose state the checkpoints restore.
    loader = torch.utils.data.DataLoader(dataset, batch_size=stage.batch_size or cfg.batch_size,
                                         sampler=sampler,
                                         collate_fn=collate, num_workers=0,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum,
                              mixed_precision=cfg.mixed_precision,
                              cpu=cfg.device == "cpu")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"stage {stage.name}: nothing to train (parts {stage.train})")
    weight_decay = cfg.weight_decay if stage.weight_decay is None else stage.weight_decay
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=weight_decay)
    batches_per_epoch = len(loader)
    epochs = math.ceil(stage.epochs)
    total_batches = int(round(stage.epochs * batches_per_epoch))
    total_steps = max(1, math.ceil(total_batches / cfg.grad_accum))
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(stage.warmup_ratio * total_steps),
                                                total_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    # Checkpoints hold the trainable weights only (the frozen base comes from the preset).
    def save_hook(models: list[Any], weights: list[dict], _dir: str) -> None:
        for i, m in enumerate(models):
            keep = {n for n, p in m.named_parameters() if p.requires_grad}
            weights[i] = {k: v for k, v in weights[i].items() if k in keep}

    accelerator.register_save_state_pre_hook(save_hook)
    if ckpt is not None:
        accelerator.load_state(str(ckpt), strict=False)
    stats: dict[str, Any] = {"stage": stage.name, "kind": stage.kind, "examples": len(dataset),
                             "losses": []}
    global_step = state.global_step
    done_batches = state.epoch * batches_per_epoch + state.batches_done
    bar = tqdm(total=total_batches, initial=done_batches, desc=f"stage {idx} {stage.name}",
               disable=not progress or not accelerator.is_local_main_process, unit="batch")
    metrics = (out / "metrics.jsonl").open("a")
    running: list[float] = []
    with cached_vision(_base(accelerator.unwrap_model(model)), cache):
        for epoch in range(state.epoch, epochs):
            sampler.use_epoch(epoch)
            start = state.batches_done if epoch == state.epoch else 0
            epoch_loader = accelerator.skip_first_batches(loader, start) if start else loader
            batch_index = start
            for batch in epoch_loader:
                if epoch * batches_per_epoch + batch_index >= total_batches:
                    break
                with accelerator.accumulate(model):
                    loss = _loss(model, stage, batch)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm:
                        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                batch_index += 1
                bar.update(1)
                running.append(float(loss.detach()))
                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                if global_step % cfg.log_every == 0 or global_step == 1:
                    mean = sum(running) / len(running)
                    metrics.write(json.dumps({"stage": stage.name, "step": global_step,
                                              "epoch": epoch, "loss": round(mean, 5),
                                              "lr": scheduler.get_last_lr()[0]}) + "\n")
                    metrics.flush()
                    stats["losses"].append(round(mean, 5))
                    bar.set_postfix(loss=f"{mean:.4f}")
                    running.clear()
                stop = max_steps is not None and global_step >= max_steps
                if global_step % cfg.save_every == 0 or stop:
                    _checkpoint(accelerator, cfg, TrainerState(idx, epoch, batch_index,
                                                               global_step))
                if stop:
                    bar.close()
                    metrics.close()
                    raise _Stop(f"max_steps={max_steps} reached in stage {stage.name}")
            state = TrainerState(idx, epoch + 1, 0, global_step)
            _checkpoint(accelerator, cfg, state)
    bar.close()
    metrics.close()
    model = accelerator.unwrap_model(model)
    model.eval()
    stats["global_step"] = global_step
    stats["final_loss"] = stats["losses"][-1] if stats["losses"] else (
        round(sum(running) / len(running), 5) if running else None)
    accelerator.free_memory()
    return model, stats


def _loss(model: Any, stage: StageConfig, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if stage.kind == "boxes":
        from training.box_targets import box_head_loss

        base = _base(model.module if hasattr(model, "module") else model)
        logits, boxes = base.predict_boxes(batch["rows"], batch["query_input_ids"],
                                           batch["query_attention_mask"])
        return box_head_loss(logits, boxes, batch["assign"], batch["truth"])
    if stage.kind == "retrieval":
        base = _base(model.module if hasattr(model, "module") else model)
        # Rows of the feature cache stand in for pixels (see training.features).
        image = base.embed_image_for_retrieval(batch["rows"])
        scale = base.retrieval_projection.logit_scale.exp().clamp(max=100)
        if "database" in batch:  # negatives: database
            logits = scale * image @ batch["database"].to(image.dtype).T
            pos = batch["positives"].to(image.dtype)
            if stage.positives == "any":
                log_p = logits.log_softmax(-1).masked_fill(pos == 0, float("-inf"))
                return -log_p.logsumexp(-1).mean()
            return torch.nn.functional.cross_entropy(logits, pos / pos.sum(1, keepdim=True))
        text = torch.nn.functional.normalize(batch["text"].to(image.dtype), dim=-1)
        logits = scale * image @ text.T
        # Identical descriptions, and images of one scene class, are not negatives of each
        # other (a class's sentences come from several templates): see _stage_batches.
        same = batch["group"][:, None] == batch["group"][None, :]
        target = same.float() / same.float().sum(1, keepdim=True)
        loss_i = torch.nn.functional.cross_entropy(logits, target)
        loss_t = torch.nn.functional.cross_entropy(logits.T, target)
        return (loss_i + loss_t) / 2
    return lm_loss(model, batch)


def lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token loss computing the vocabulary projection only where an answer token is
    predicted: the tied 49k x 576 head is a fifth of SmolLM2's FLOPs, and prompts (image,
    class list) are most of every sequence. Equal to the model's own `labels=` loss."""
    batch = dict(batch)
    labels = batch.pop("labels")
    target = labels[:, 1:]
    keep = (target != -100).any(0).nonzero().squeeze(1)
    if keep.numel() == 0:  # every answer truncated away: a zero loss that still has a graph
        return model(**batch, logits_to_keep=1, use_cache=False).logits.sum() * 0.0
    logits = model(**batch, logits_to_keep=keep, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                             target[:, keep].flatten(), ignore_index=-100)


def _checkpoint(accelerator: Any, cfg: FitConfig, state: TrainerState) -> Path:
    out = Path(cfg.output_dir) / "checkpoints" / f"step-{state.global_step:07d}"
    if accelerator.is_main_process and out.exists():
        shutil.rmtree(out)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(out))
    if accelerator.is_main_process:
        import yaml

        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        state.save(out)  # written last: a checkpoint without it is incomplete
        ckpts = sorted((out.parent).glob("step-*"))
        for old in ckpts[:-cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    return out


def fit_from_config(path: str | Path, *, resume: str | None = None,
                    max_steps: int | None = None) -> dict[str, Any]:
    return fit(load_config(path), resume=resume, max_steps=max_steps)
