"""The training arguments of `rsvlm-train fit`: the schema (`FitConfig`, `StageConfig`) and the
YAML/JSON loader. Architecture lives in the model's preset/config; what is trained, how long and
at what learning rate lives here."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    model: str = "embedded"  # a preset, or a name in training.model_setup.MODEL_BUILDERS
    init: str = "base"  # "base": untrained connector; "trained": the preset's shipped parts;
    # or a folder of trained parts (a `fit` run's final/) to continue from
    # RSVLMConfig fields replacing the preset's (or the built model's): ablations such as
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




__all__ = ["PARTS", "STAGE_KINDS", "FitConfig", "StageConfig", "default_stages", "load_config"]
