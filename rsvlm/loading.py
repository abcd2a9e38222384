"""Load a ready-to-chat model: a preset (embedded / large / a preset JSON) or a saved model dir.

    loaded = load()                 # the default choice for this machine, with the reason
    loaded = load("embedded")       # DINOv2-S + SmolLM2-135M, offline, CPU
    loaded = load("large")          # SigLIP2 + Qwen2.5-7B, 4-bit NF4 on CUDA
    loaded = load("runs/my-region") # a folder written by `save_pretrained` or by training

Trained parts of a preset live in a folder (``assets/models/<preset>/`` for the shipped embedded
model, or a training run's output) with this layout, written by `save_trained_parts`:

* ``trained.json``: ``{"base_preset", "architecture": {RSVLMConfig overrides}, "parts": [...]}``
* ``trained.safetensors``: the trained non-LoRA tensors (connector, experts, retrieval
  projection), named as in ``RSVLMForConditionalGeneration.state_dict()``
* ``adapter/``: a peft LoRA adapter of the whole model (merged on load unless 4-bit)
* ``semantic_db/``: a `SemanticDatabase` (`save_pretrained` folder)
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
# bitsandbytes 0.50 warns on import, on any CPU, that its optional CPU 4-bit kernel (fetched from
# the Hugging Face hub by the `kernels` package) is missing. Here 4-bit runs on CUDA only, so the
# advice only misleads an analyst reading the log.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

TRAINED_JSON = "trained.json"
TRAINED_TENSORS = "trained.safetensors"
ADAPTER_DIR = "adapter"
SEMANTIC_DB_DIR = "semantic_db"


@dataclass
class LoadedModel:
    model: Any
    processor: Any
    database: Any = None  # rsvlm.retrieval.SemanticDatabase | None
    info: dict[str, Any] = field(default_factory=dict)
    perception: Any = None  # rsvlm.perception.Perception | None (a trained detector)
    scene: Any = None  # rsvlm.scene.SceneReader | None (a trained scene classifier)
    answer_forms: bool = True  # yes/no, either/or: one of its words (prompting.answer_options)


class GPUMemoryError(RuntimeError):
    """The GPU has too little free memory for the chosen model; the message says what to do."""


def _cuda_free_gb(device: str) -> float | None:
    """Free memory of ``device`` in GiB (None when it cannot be asked)."""
    try:
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0] / 2**30
    except Exception:  # no driver / no device: the load itself will say what is wrong
        return None


def _oom_message(preset: str, device: str, *, quantized: bool, doing: str) -> str:
    """What a user can do when ``preset`` does not fit on ``device``."""
    options = ["`--model embedded` (the small model, runs on the CPU)"]
    if not quantized:
        options.append("`--quantize 4bit` (4-bit NF4 language model, about a quarter of the memory)")
    options.append("closing other programs that hold GPU memory (see `nvidia-smi`)")
    return (
        f"The GPU ({device}) ran out of memory while {doing} the '{preset}' model. "
        f"Options: {'; '.join(options)}."
    )


def is_cuda_oom(exc: BaseException) -> bool:
    """True for CUDA out-of-memory errors (torch's own type, or the text bitsandbytes raises)."""
    import torch

    oom_type = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(exc, oom_type) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def _attention(device: str) -> str:
    """FlashAttention-2 when installed on CUDA, else PyTorch SDPA (fused kernels on GPUs)."""
    if device.startswith("cuda"):
        import importlib.util

        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
    return "sdpa"


def _device(device: str | None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load(
    model: str | Path | None = None,
    *,
    device: str | None = None,
    quantize: bool | None = None,
    trained: str | Path | None | bool = True,
    progress: Callable[[str], None] | None = None,
    fallback: str | None = None,
    architecture: dict[str, Any] | None = None,
    merge_lora: bool = True,
    adapter: str | Path | None = None,
    allow_untrained: bool = False,
    retriever: Any = None,
) -> LoadedModel:
    """Load a model for chat.

    Args:
        model: preset name, preset JSON path, a model folder (``save_pretrained``), or a folder
            of trained parts (``trained.json``: a `rsvlm-train fit` output such as
            ``runs/x/final``, loaded on its base preset); None picks the default for this
            machine (`rsvlm.presets.default_preset_choice`).
        device: ``cpu`` / ``cuda`` / ``cuda:N``; default CUDA when available.
        quantize: 4-bit NF4 for the language model (None: as the preset says on this device).
        trained: True loads the preset's shipped trained parts when present, a path loads those,
            False/None loads the bare assembled model (connector untrained).
        progress: called with human-readable progress messages (the app shows them).
        fallback: a preset to load instead when the GPU lacks memory for ``model`` (e.g.
            ``"embedded"``); without it a `GPUMemoryError` says what the user can do.
        architecture: `RSVLMConfig` fields replacing the preset's (e.g. ``{"connector_type":
            "mlp"}`` for an ablation); the trained parts' own ``trained.json`` wins over both.
        merge_lora: merge the trained LoRA adapter into the LM (faster answers); False keeps a
            `peft.PeftModel` (to train the adapter further). 4-bit models never merge.
        adapter: a LoRA adapter folder for a pretrained family (`rsvlm-train fit --base`).
        allow_untrained: load a preset whose connector has never been trained (the `large`
            research preset); without it such a load is refused, as its answers are noise.
        retriever: for a pretrained family, the retriever of its semantic context
            (`rsvlm.backends.retriever.EmbeddedRetriever`, or ``"embedded"`` to load that one).

    A hub id or folder of a pretrained family (Qwen2.5-VL, Qwen3-VL, Florence-2, LLaVA), or the
    name of one of `rsvlm.backends.choice.PRETRAINED_PRESETS`, loads through
    `rsvlm.backends.loader.load_pretrained`.
    """
    say = progress or (lambda msg: logger.info("%s", msg))
    t0 = time.perf_counter()
    from rsvlm.presets import default_preset_choice, load_preset

    if model is None:
        name, why = default_preset_choice()
    else:
        name, why = str(model), "chosen by the user"
    from rsvlm.backends.choice import PRETRAINED_PRESETS
    from rsvlm.backends.loader import is_pretrained_location, load_pretrained

    if name in PRETRAINED_PRESETS or is_pretrained_location(name):
        location = PRETRAINED_PRESETS[name].repo if name in PRETRAINED_PRESETS else name
        if _device(device).startswith("cuda"):  # say so before a 16 GB download, not after
            from rsvlm.backends.choice import memory_check

            problem = memory_check(name, _cuda_free_gb(_device(device)),
                                   quantized=quantize is not False)
            if problem:
                raise GPUMemoryError(problem)
        if retriever == "embedded":
            retriever = _embedded_retriever(say)
        loaded = load_pretrained(location, device=_device(device), quantize=quantize,
                                 adapter=adapter, retriever=retriever, progress=say,
                                 merge_lora=merge_lora)
        loaded.info.update(preset=name, why=why, load_s=round(time.perf_counter() - t0, 2))
        loaded.info["summary"] = (f"{name} ({loaded.info['family']}) on {loaded.info['device']} "
                                  f"({loaded.info['precision']}), loaded in "
                                  f"{loaded.info['load_s']:.1f} s")
        say(f"Model ready: {loaded.info['summary']}. Why this model: {why}")
        return loaded
    path = Path(name).expanduser()
    parts_manifest = _read_manifest(path) if path.is_dir() else None
    if parts_manifest is not None:
        name, trained = parts_manifest["base_preset"], path
    if path.is_dir() and (path / "config.json").exists():
        loaded = _load_model_dir(path, device=_device(device), quantize=quantize, say=say)
    else:
        preset = load_preset(name)
        if device is None and "cuda" not in preset.devices:
            device = "cpu"
        trained_dir = preset.trained_weights_dir if trained is True else (Path(trained) if trained else None)
        if trained is True and trained_dir is None and not allow_untrained:
            from rsvlm.presets import PresetError

            raise PresetError(
                f"the '{preset.name}' preset has no trained connector, so its answers are noise; "
                "load it only to train it (--allow-untrained), or run a pretrained model "
                "(`rsvlm which` names one)")
        try:
            loaded = _load_preset(preset, device=_device(device), quantize=quantize,
                                  trained_dir=trained_dir, say=say, architecture=architecture,
                                  merge_lora=merge_lora)
        except GPUMemoryError as exc:
            if not fallback or fallback == name:
                raise
            say(f"{exc} Loading the '{fallback}' model instead, as asked.")
            _release_cuda()
            loaded = load(fallback, trained=trained, progress=progress)
            loaded.info["why"] = f"fallback: {exc}"
            return loaded
    loaded.info["why"] = why
    loaded.info["load_s"] = round(time.perf_counter() - t0, 2)
    loaded.info["summary"] = (
        f"{loaded.info['preset']} on {loaded.info['device']} ({loaded.info['precision']}), "
        f"loaded in {loaded.info['load_s']:.1f} s"
        + ("" if loaded.info.get("trained") else " — connector UNTRAINED: answers are noise")
    )
    say(f"Model ready: {loaded.info['summary']}. Why this model: {why}")
    return loaded


def _embedded_retriever(say: Callable[[str], None]) -> Any:
    """The embedded model's retriever for a pretrained backend's context, or None (said why)."""
    from rsvlm.backends.retriever import EmbeddedRetriever

    try:
        say("Loading the embedded model's retriever (semantic context for the prompt) ...")
        return EmbeddedRetriever.embedded()
    except Exception as exc:  # the model answers without retrieved context
        say(f"No retriever: {exc}")
        return None


def _load_preset(preset: Any, *, device: str, quantize: bool | None, trained_dir: Path | None,
                 say: Callable[[str], None],
                 architecture: dict[str, Any] | None = None,
                 merge_lora: bool = True) -> LoadedModel:
    on_cuda = device.startswith("cuda")
    # The preset's memory figure is for its 4-bit form; unquantized loads rely on the OOM check.
    quantized = quantize is not False and preset.quantization is not None
    need = float(getattr(preset, "min_gpu_memory_gb", None) or 0) if quantized else 0.0
    free = _cuda_free_gb(device) if on_cuda and need else None
    if free is not None and free < need:  # say so before a 17 GB download, not after
        raise GPUMemoryError(
            f"{_oom_message(preset.name, device, quantized=quantized, doing='loading')} "
            f"It needs about {need:.0f} GiB in 4-bit; {free:.1f} GiB are free."
        )
    say(f"Preparing the weights of the '{preset.name}' preset (converted once into the cache) ...")
    plan = with_attention(preset.plan(device, quantize=quantize), device)
    say(f"Loading {plan.describe()} ...")
    try:
        return _assemble(plan, preset, device, trained_dir, say, architecture, merge_lora)
    except Exception as exc:
        if on_cuda and is_cuda_oom(exc):
            _release_cuda()
            raise GPUMemoryError(
                _oom_message(preset.name, device, quantized=plan.quantized, doing="loading")
            ) from exc
        raise


def with_attention(plan: Any, device: str) -> Any:
    """``plan`` with an attention kernel for the vision tower and language model (see `_attention`)."""
    from dataclasses import replace

    attn = _attention(device)
    components = dict(plan.components)
    for role in ("vision", "language"):
        if role in components:
            comp = components[role]
            components[role] = replace(comp, kwargs={**comp.kwargs, "attn_implementation": attn})
    return replace(plan, components=components)


def _release_cuda() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _assemble(plan: Any, preset: Any, device: str, trained_dir: Path | None,
              say: Callable[[str], None],
              architecture: dict[str, Any] | None = None,
              merge_lora: bool = True) -> LoadedModel:
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer

    from rsvlm.modeling import RSVLMForConditionalGeneration
    from rsvlm.processing import RSVLMProcessor

    vision = plan.components["vision"].load()
    language = plan.components["language"].load()
    tokenizer = AutoTokenizer.from_pretrained(plan.components["language"].location)
    image_processor = AutoImageProcessor.from_pretrained(plan.components["vision"].location)
    overrides: dict[str, Any] = dict(architecture or {})
    manifest = _read_manifest(trained_dir)
    if manifest:
        overrides.update(manifest.get("architecture", {}))
    config = preset.to_config(vision_config=vision.config, text_config=language.config, **overrides)
    model = RSVLMForConditionalGeneration.from_parts(vision, language, config, tokenizer=tokenizer)
    dtype = getattr(torch, plan.dtype)
    if plan.quantized:
        # The 4-bit LM is already placed; the 16-bit parts follow it.
        for part in _unquantized_parts(model):
            part.to(device=device, dtype=dtype)
    else:
        model.to(device=device, dtype=dtype)
    database = None
    is_trained = False
    if manifest:
        say(f"Loading trained parts from {trained_dir} ...")
        model = apply_trained_parts(model, trained_dir,
                                    merge_lora=merge_lora and not plan.quantized)
        database = _load_database(trained_dir)
        is_trained = True
    perception = scene = None
    if manifest:
        from rsvlm.perception import Perception
        from rsvlm.scene import SceneReader

        perception = Perception.load(trained_dir, model.vision_tower.model, image_processor)
        scene = SceneReader.load(trained_dir, model.vision_tower.model, image_processor)
    model.eval()
    processor = RSVLMProcessor.from_config(model.config, image_processor, tokenizer)
    info = {
        "preset": preset.name,
        "device": device,
        "precision": "4-bit NF4 LM" if plan.quantized else plan.dtype,
        "attention": plan.components["language"].kwargs.get("attn_implementation"),
        "trained": is_trained,
        "trained_dir": str(trained_dir) if trained_dir else None,
        "connector": model.config.connector_type,
        "experts": model.config.experts_enabled,
        "retrieval": database is not None,
        "detector": perception is not None,
        "detector_labels": list(perception.config.answered) if perception is not None else [],
        "scene_classifier": scene is not None,
    }
    return LoadedModel(model, processor, database, info, perception, scene)


def _load_model_dir(path: Path, *, device: str, quantize: bool | None,
                    say: Callable[[str], None]) -> LoadedModel:
    import torch

    from rsvlm.modeling import RSVLMForConditionalGeneration
    from rsvlm.processing import RSVLMProcessor

    say(f"Loading the model saved in {path} ...")
    kwargs: dict[str, Any] = {}
    if quantize:
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if device.startswith("cuda") else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
        kwargs["device_map"] = {"": 0 if device == "cuda" else device}
    model = RSVLMForConditionalGeneration.from_pretrained(path, **kwargs)
    if not quantize:
        model.to(device)
    model.eval()
    processor = RSVLMProcessor.from_pretrained(path)
    database = _load_database(path)
    info = {
        "preset": path.name,
        "device": device,
        "precision": "4-bit NF4 LM" if quantize else str(model.dtype).replace("torch.", ""),
        "trained": True,
        "connector": model.config.connector_type,
        "experts": model.config.experts_enabled,
        "retrieval": database is not None,
    }
    return LoadedModel(model, processor, database, info)


def _unquantized_parts(model: Any) -> list[Any]:
    parts = [model.vision_tower, model.connector]
    if model.retrieval_projection is not None:
        parts.append(model.retrieval_projection)
    if model.box_head is not None:
        parts.append(model.box_head)
    for wrapper in model.semantic_experts():
        parts += [wrapper.experts, wrapper.router]
    return parts


def _read_manifest(folder: Path | None) -> dict[str, Any] | None:
    if folder is None or not (folder / TRAINED_JSON).is_file():
        return None
    return json.loads((folder / TRAINED_JSON).read_text())


def _load_database(folder: Path) -> Any:
    db_dir = folder / SEMANTIC_DB_DIR
    if not db_dir.is_dir():
        return None
    from rsvlm.retrieval import SemanticDatabase

    return SemanticDatabase.from_pretrained(db_dir)


def apply_trained_parts(model: Any, folder: Path, *, merge_lora: bool = True) -> Any:
    """Load ``trained.safetensors`` (strictly: every tensor must land) and the LoRA adapter."""
    from safetensors.torch import load_file

    tensors_path = folder / TRAINED_TENSORS
    if tensors_path.is_file():
        state = load_file(str(tensors_path))
        own = model.state_dict()
        unknown = sorted(set(state) - set(own))
        if unknown:
            raise ValueError(
                f"{tensors_path} holds {len(unknown)} tensors this model does not have "
                f"(e.g. {unknown[:3]}); was it trained with another architecture?"
            )
        for name, tensor in state.items():
            if own[name].shape != tensor.shape:
                raise ValueError(f"{tensors_path}: {name} is {tuple(tensor.shape)}, the model "
                                 f"expects {tuple(own[name].shape)}")
        parts = (_read_manifest(folder) or {}).get("parts", [])
        missing = sorted(name for name in own if name not in state and _in_parts(name, parts))
        if missing:
            # Left out, they would keep their random init and answer noise without a word.
            raise ValueError(f"{tensors_path} lacks {len(missing)} tensors of its parts "
                             f"{parts} (e.g. {missing[:3]})")
        model.load_state_dict(state, strict=False)
    adapter = folder / ADAPTER_DIR
    if adapter.is_dir():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
        if merge_lora:
            model = model.merge_and_unload()
    return model


def _in_parts(name: str, parts: list[str]) -> bool:
    """Whether a state-dict key belongs to one of a trained.json's parts."""
    if "experts" in parts and (".experts." in name or ".router." in name):
        return True
    return any(name.startswith(p + ".") for p in parts if p != "experts")


def save_trained_parts(model: Any, folder: str | Path, *, base_preset: str,
                       architecture: dict[str, Any], parts: list[str],
                       database: Any = None) -> Path:
    """Write the trained parts of ``model`` (see module docstring) into ``folder``.

    ``parts`` name the module prefixes to keep (e.g. ``["connector", "retrieval_projection",
    "experts"]``); a peft-wrapped model also saves its adapter.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    keep = {}
    for name, tensor in base.state_dict().items():
        if "lora_" in name:
            continue
        if _in_parts(name, parts):
            keep[name] = tensor.detach().to("cpu").contiguous()
    save_file(keep, str(folder / TRAINED_TENSORS))
    if hasattr(model, "peft_config"):
        model.save_pretrained(str(folder / ADAPTER_DIR))
    if database is not None:
        database.save_pretrained(folder / SEMANTIC_DB_DIR)
    (folder / TRAINED_JSON).write_text(json.dumps(
        {"base_preset": base_preset, "architecture": architecture, "parts": parts}, indent=2
    ))
    return folder
