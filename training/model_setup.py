"""The model a run trains: build it, wrap it with LoRA, choose its trainable parts, save/load them.

Freezing is structural: parts are modules (``vision_tower``, ``connector``, the experts inside
the language model, ``retrieval_projection``, ``box_head``), never parameter-name patterns;
peft's adapters are left to peft. The model itself (`rsvlm.modeling`) knows nothing of training.

`build_model` makes a preset's model (`rsvlm.loading.load`); other names come from
`MODEL_BUILDERS` (`register_model_builder`), which is how the tests train tiny random models
without the production code importing test helpers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from training.fit_config import FitConfig

#: name -> builder(cfg, architecture) -> (model, processor): models that are not presets (tests,
#: experiments); ``architecture`` holds the RSVLMConfig fields to build with
ModelBuilder = Callable[["FitConfig", dict[str, Any]], tuple[Any, Any]]
MODEL_BUILDERS: dict[str, ModelBuilder] = {}


def register_model_builder(name: str, builder: ModelBuilder) -> None:
    """Make ``model: NAME`` in a fit config build its model with ``builder(cfg, architecture)``."""
    MODEL_BUILDERS[name] = builder


def base_model(model: Any) -> Any:
    """The RSVLM model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# ------------------------------------------------------------------------------ trainable parts


def adapter_parameter_ids(model: nn.Module) -> set[int]:
    """``id()`` of every peft adapter parameter (LoRA's A/B...) inside ``model``."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft is optional at inference time
        return set()
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for name in module.adapter_layer_names:
                sub = getattr(module, name, None)
                if isinstance(sub, nn.Module):
                    ids.update(id(p) for p in sub.parameters())
    return ids


def _own_parts(model: Any) -> dict[str, nn.Module | None]:
    return {
        "vision_tower": model.vision_tower,
        "connector": model.connector,
        "retrieval_projection": model.retrieval_projection,
        "box_head": model.box_head,
    }


def set_trainable(
    model: Any,
    *,
    vision_tower: bool | None = None,
    connector: bool | None = None,
    language_model: bool | None = None,
    experts: bool | None = None,
    retrieval_projection: bool | None = None,
    box_head: bool | None = None,
) -> dict[str, int]:
    """Set ``requires_grad`` per part of an RSVLM model (None leaves a part as it is); returns
    the trainable parameter counts per part.

    ``language_model`` covers the LM's own weights only: the semantic experts are their own
    part, and peft adapters (LoRA) are left to peft.
    """
    from rsvlm.experts import expert_parameter_ids

    flags = {"vision_tower": vision_tower, "connector": connector,
             "retrieval_projection": retrieval_projection, "box_head": box_head}
    for name, module in _own_parts(model).items():
        if module is not None and flags[name] is not None:
            module.requires_grad_(flags[name])
    expert_ids = expert_parameter_ids(model)
    adapter_ids = adapter_parameter_ids(model)
    for p in model.language_model.parameters():
        if id(p) in expert_ids:
            if experts is not None:
                p.requires_grad_(experts)
        elif id(p) not in adapter_ids and language_model is not None:
            p.requires_grad_(language_model)
    return trainable_parameter_counts(model, expert_ids)


def trainable_parameter_counts(model: Any, expert_ids: set[int] | None = None) -> dict[str, int]:
    """Trainable parameters per part (``experts`` apart from the rest of ``language_model``)."""
    if expert_ids is None:
        from rsvlm.experts import expert_parameter_ids

        expert_ids = expert_parameter_ids(model)
    counts = {name: 0 for name in _own_parts(model)}
    counts.update(experts=0, language_model=0)
    for name, module in _own_parts(model).items():
        if module is not None:
            counts[name] = sum(p.numel() for p in module.parameters() if p.requires_grad)
    for p in model.language_model.parameters():
        if p.requires_grad:
            counts["experts" if id(p) in expert_ids else "language_model"] += p.numel()
    return counts


def lora_target_modules(names: tuple[str, ...] = ("q_proj", "v_proj")) -> str:
    """A peft ``target_modules`` regex that matches `names` inside the language model only
    (SigLIP/CLIP vision towers also have ``q_proj``/``v_proj``)."""
    alternatives = "|".join(names)
    return rf"language_model\..*\.(?:{alternatives})"


def peft_modules_to_save(model: Any) -> list[str]:
    """peft ``modules_to_save`` for the parts a LoRA adapter should carry besides LoRA itself:
    the connector, the retrieval projection, the box head and the experts' linears (peft cannot
    wrap the experts' `ModuleList`, so their ``reduce``/``expand``/``router`` layers are named)."""
    names = ["connector"]
    if model.retrieval_projection is not None:
        names.append("retrieval_projection")
    if model.box_head is not None:
        names.append("box_head")
    if model.config.experts_enabled:
        names += ["router", "reduce", "expand"]
    return names


def configure_parts(model: Any, parts: list[str], cfg: FitConfig) -> Any:
    """Freeze everything but `parts`; wraps the model with LoRA the first time it is asked for."""
    if "lora" in parts and not hasattr(model, "peft_config"):
        import peft

        lora = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                               lora_dropout=cfg.lora_dropout,
                               target_modules=lora_target_modules(tuple(cfg.lora_targets)))
        model = peft.get_peft_model(model, lora)
    set_trainable(base_model(model), vision_tower=False, connector="connector" in parts,
                  language_model=False, experts="experts" in parts,
                  retrieval_projection="retrieval_projection" in parts,
                  box_head="box_head" in parts)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_("lora" in parts)
    return model


def reinit_retrieval_projection(model: Any) -> None:
    """Fresh weights (and CLIP's initial temperature) for the retrieval projection."""
    import torch

    proj = base_model(model).retrieval_projection
    if proj is None:
        raise ValueError("reinit: this model has no retrieval projection")
    for module in proj.modules():
        if module is not proj and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    with torch.no_grad():
        proj.logit_scale.fill_(proj.INITIAL_LOGIT_SCALE)


# ------------------------------------------------------------------------------ build, save, load


def build_model(cfg: FitConfig) -> tuple[Any, Any, str, dict[str, Any]]:
    """(model, processor, base preset name, architecture overrides)."""
    builder = MODEL_BUILDERS.get(cfg.model)
    if builder is not None:
        architecture = dict(cfg.model_overrides)
        model, processor = builder(cfg, architecture)
        if cfg.init not in {"base", "trained"}:
            model = load_parts(model, Path(cfg.init))
        return model, processor, cfg.model, architecture
    from rsvlm.loading import load

    trained: Any = cfg.init == "trained" or (cfg.init not in {"base", "trained"} and cfg.init)
    if isinstance(trained, str) and cfg.model_overrides:
        _check_overrides(Path(trained), cfg.model_overrides)
    # The shipped adapter stays an adapter (not merged), so further training continues it and
    # the exported adapter still applies to the stock LM.
    loaded = load(cfg.model, device="cpu", trained=trained, merge_lora=False,
                  architecture=dict(cfg.model_overrides) or None, allow_untrained=True)
    preset = loaded.info.get("preset", cfg.model)
    # The whole architecture goes into trained.json, so the parts keep loading into the shape
    # they were trained in even if the preset's defaults change later.
    return (loaded.model, loaded.processor, preset,
            {**_preset_architecture(preset), **cfg.model_overrides})


def _check_overrides(trained: Path, overrides: dict[str, Any]) -> None:
    """Parts load in the shape their trained.json records, whatever the overrides say; a
    disagreement would train one architecture and export another's description."""
    from rsvlm.loading import TRAINED_JSON

    manifest = trained / TRAINED_JSON
    arch = json.loads(manifest.read_text()).get("architecture", {}) if manifest.is_file() else {}
    clash = {k: (arch[k], v) for k, v in overrides.items() if k in arch and arch[k] != v}
    if clash:
        raise ValueError(f"model_overrides {clash} (init's value, override) disagree with "
                         f"init {trained}: start from parts of that shape (copy the folder "
                         "and edit its trained.json if the change keeps the weights' shapes)")


def _preset_architecture(name: str) -> dict[str, Any]:
    from rsvlm.presets import PresetError, load_preset

    try:
        return dict(load_preset(name).architecture)
    except PresetError:  # a saved model folder, not a preset: its config holds the shape
        return {}


def save_parts(model: Any, folder: Path, base_preset: str, architecture: dict[str, Any],
               database: Any = None) -> Path:
    """Every non-frozen-base part (connector, experts, retrieval projection, box head, LoRA
    adapter)."""
    from rsvlm.loading import save_trained_parts

    parts = ["connector", "experts"]
    if base_model(model).retrieval_projection is not None:
        parts.append("retrieval_projection")
    if base_model(model).box_head is not None:
        parts.append("box_head")
    return save_trained_parts(model, folder, base_preset=base_preset, architecture=architecture,
                              parts=parts, database=database)


def load_parts(model: Any, folder: Path) -> Any:
    """Load a stage's exported parts (LoRA stays a trainable adapter, not merged)."""
    from safetensors.torch import load_file

    from rsvlm.loading import ADAPTER_DIR, TRAINED_TENSORS

    state = load_file(str(folder / TRAINED_TENSORS))
    base_model(model).load_state_dict(state, strict=False)
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


__all__ = [
    "MODEL_BUILDERS",
    "ModelBuilder",
    "adapter_parameter_ids",
    "base_model",
    "build_model",
    "configure_parts",
    "load_parts",
    "lora_target_modules",
    "peft_modules_to_save",
    "register_model_builder",
    "reinit_retrieval_projection",
    "save_parts",
    "set_trainable",
    "trainable_parameter_counts",
]
