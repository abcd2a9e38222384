"""Model presets: which pretrained parts make a model, and the architecture around them.

A preset is a small JSON file (``assets/models/<name>.json``) with

* ``components``: ``vision``, ``language`` and ``text_encoder``, each ``{"source": "embedded" |
  "hub" | "path", "id": ..., "model_class": ...}``. ``embedded`` names a component converted by
  :mod:`rsvlm.weights` (offline), ``hub`` a Hugging Face repo id, ``path`` a local folder.
* ``architecture``: :class:`~rsvlm.configuration.RSVLMConfig` fields (levels, connector, experts,
  retrieval), and ``vision_config`` / ``text_config``: the parts' shapes, so a config can be
  built without downloading anything (the loader prefers the real configs of the loaded parts).
* ``dtype`` per device, ``quantization`` (bitsandbytes 4-bit settings, CUDA only) and
  ``trained_weights``: the folder under ``assets/models/`` holding the trained connector, experts,
  LoRA and retrieval projection, when it has been shipped.

:func:`load_preset` reads one, :meth:`Preset.to_config` turns it into an ``RSVLMConfig``,
:meth:`Preset.plan` into per-component load instructions for a device, and
:func:`default_preset_choice` says which preset to run when the user names none, and why.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PRESETS_DIR = Path(__file__).resolve().parent.parent / "assets" / "models"
PRESETS_ENV = "RSVLM_PRESETS"  # an extra folder of preset JSON files
DEFAULT_PRESET = "embedded"
LARGE_PRESET = "large"

ROLES = ("vision", "language", "text_encoder")
SOURCES = ("embedded", "hub", "path")


class PresetError(ValueError):
    """An unknown or malformed preset; the message is meant for the user."""


@dataclass(frozen=True)
class ComponentSpec:
    """Where one pretrained part comes from."""

    role: str
    source: str
    id: str
    model_class: str
    revision: str | None = None

    @classmethod
    def from_dict(cls, role: str, data: Mapping[str, Any]) -> ComponentSpec:
        try:
            spec = cls(
                role=role,
                source=str(data["source"]),
                id=str(data["id"]),
                model_class=str(data["model_class"]),
                revision=data.get("revision"),
            )
        except (KeyError, TypeError) as exc:
            raise PresetError(
                f"component '{role}' needs source, id and model_class: {data!r}"
            ) from exc
        if spec.source not in SOURCES:
            raise PresetError(
                f"component '{role}': unknown source {spec.source!r} (use one of {SOURCES})"
            )
        return spec

    def to_dict(self) -> dict[str, Any]:
        data = {"source": self.source, "id": self.id, "model_class": self.model_class}
        if self.revision:
            data["revision"] = self.revision
        return data

    def location(
        self, cache_dir: str | os.PathLike[str] | None = None, *, convert: bool = True
    ) -> str:
        """A local folder or hub id for ``from_pretrained``.

        ``embedded`` components are converted into the weights cache first (once) when
        ``convert`` is true; otherwise their expected folder is returned as is.
        """
        if self.source == "hub":
            return self.id
        if self.source == "path":
            return str(Path(self.id).expanduser())
        from rsvlm import weights

        if convert:
            return str(weights.ensure_embedded_weights(cache_dir, components=[self.id])[self.id])
        return str(weights.embedded_weight_paths(cache_dir)[self.id])


@dataclass(frozen=True)
class ComponentLoad:
    """Instructions to load one part: ``getattr(transformers, model_class).from_pretrained(
    location, **kwargs)`` (or ``SentenceTransformer(location)`` for the text encoder)."""

    role: str
    model_class: str
    location: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def load(self) -> Any:
        if self.model_class == "SentenceTransformer":
            from rsvlm.text_encoder import TextEncoder

            return TextEncoder.from_path(self.location, device=self.kwargs.get("device"))
        import transformers

        cls = getattr(transformers, self.model_class, None)
        if cls is None:
            raise PresetError(
                f"transformers has no class {self.model_class!r} (component '{self.role}')"
            )
        return cls.from_pretrained(self.location, **self.kwargs)


@dataclass(frozen=True)
class LoadPlan:
    """What :meth:`Preset.plan` decided for one device: per-part loads plus the model config."""

    preset: str
    device: str
    dtype: str
    quantized: bool
    components: dict[str, ComponentLoad]
    trained_weights: Path | None

    def describe(self) -> str:
        precision = "4-bit NF4 language model" if self.quantized else self.dtype
        return f"{self.preset} on {self.device} ({precision})"


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    components: dict[str, ComponentSpec]
    architecture: dict[str, Any]
    vision_config: dict[str, Any]
    text_config: dict[str, Any]
    devices: tuple[str, ...] = ("cpu", "cuda")
    dtype: dict[str, str] = field(default_factory=lambda: {"cpu": "float32", "cuda": "bfloat16"})
    quantization: dict[str, Any] | None = None
    min_gpu_memory_gb: float | None = None
    trained_weights: str | None = None
    notes: str = ""
    path: Path | None = None

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: Path | None = None) -> Preset:
        where = f" in {path}" if path else ""
        try:
            components = {
                role: ComponentSpec.from_dict(role, spec)
                for role, spec in data["components"].items()
            }
            preset = cls(
                name=str(data["name"]),
                description=str(data.get("description", "")),
                components=components,
                architecture=dict(data.get("architecture", {})),
                vision_config=dict(data["vision_config"]),
                text_config=dict(data["text_config"]),
                devices=tuple(data.get("devices", ("cpu", "cuda"))),
                dtype=dict(data.get("dtype", {"cpu": "float32", "cuda": "bfloat16"})),
                quantization=dict(data["quantization"]) if data.get("quantization") else None,
                min_gpu_memory_gb=data.get("min_gpu_memory_gb"),
                trained_weights=data.get("trained_weights"),
                notes=str(data.get("notes", "")),
                path=path,
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise PresetError(f"malformed preset{where}: missing or invalid {exc}") from exc
        missing = [role for role in ROLES if role not in preset.components]
        if missing:
            raise PresetError(f"preset '{preset.name}'{where} lacks components {missing}")
        return preset

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "components": {role: spec.to_dict() for role, spec in self.components.items()},
            "architecture": self.architecture,
            "vision_config": self.vision_config,
            "text_config": self.text_config,
            "devices": list(self.devices),
            "dtype": self.dtype,
            "quantization": self.quantization,
            "min_gpu_memory_gb": self.min_gpu_memory_gb,
            "trained_weights": self.trained_weights,
            "notes": self.notes,
        }

    # ------------------------------------------------------------------ config
    def to_config(
        self, vision_config: Any = None, text_config: Any = None, **overrides: Any
    ) -> Any:
        """An ``RSVLMConfig`` from this preset.

        ``vision_config`` / ``text_config`` (configs of the loaded parts) replace the preset's
        offline copies; ``overrides`` replace architecture fields (e.g. ``connector_type``).
        """
        from rsvlm.configuration import RSVLMConfig

        kwargs = {**self.architecture, **overrides}
        try:
            return RSVLMConfig(
                vision_config=vision_config
                if vision_config is not None
                else dict(self.vision_config),
                text_config=text_config if text_config is not None else dict(self.text_config),
                **kwargs,
            )
        except (TypeError, ValueError) as exc:
            raise PresetError(
                f"preset '{self.name}' does not make a valid model config: {exc}"
            ) from exc

    # ------------------------------------------------------------------ loading
    @property
    def trained_weights_dir(self) -> Path | None:
        """The shipped trained weights (connector, experts, LoRA, projection), if present."""
        if not self.trained_weights:
            return None
        base = self.path.parent if self.path else PRESETS_DIR
        folder = (base / self.trained_weights).resolve()
        return folder if folder.is_dir() else None

    def plan(
        self,
        device: str = "cpu",
        *,
        quantize: bool | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        convert: bool = True,
    ) -> LoadPlan:
        """Load instructions for ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).

        ``quantize=None`` follows the preset (4-bit where it says so and the device is CUDA);
        ``True`` forces 4-bit NF4 on the language model (CPU works too, slowly), ``False``
        disables it.
        """
        kind = device.split(":")[0]
        if kind not in self.devices:
            raise PresetError(
                f"preset '{self.name}' runs on {', '.join(self.devices)}, not {device}"
                + (" (it needs a CUDA GPU)" if self.devices == ("cuda",) else "")
            )
        dtype = self.dtype.get(kind, "float32")
        if quantize is None:
            quantize = self.quantization is not None and kind == "cuda"
        lm_kwargs: dict[str, Any] = {"dtype": dtype}
        if quantize:
            lm_kwargs["quantization_config"] = self.bnb_config(dtype)
            lm_kwargs["device_map"] = {
                "": device if ":" in device else (0 if kind == "cuda" else "cpu")
            }
        loads = {}
        for role, spec in self.components.items():
            location = spec.location(cache_dir, convert=convert)
            if role == "language":
                kwargs = dict(lm_kwargs)
            elif role == "vision":
                kwargs = {"dtype": dtype}
            else:
                kwargs = {"device": device}
            if spec.revision and spec.source == "hub":
                kwargs["revision"] = spec.revision
            loads[role] = ComponentLoad(role, spec.model_class, location, kwargs)
        return LoadPlan(self.name, device, dtype, bool(quantize), loads, self.trained_weights_dir)

    def bnb_config(self, compute_dtype: str = "bfloat16") -> Any:
        """The bitsandbytes config of the language model (NF4, double quant by default)."""
        import torch
        from transformers import BitsAndBytesConfig

        settings = dict(self.quantization or {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"})
        dtype_name = settings.pop("bnb_4bit_compute_dtype", compute_dtype)
        settings.setdefault("load_in_4bit", True)
        settings.setdefault("bnb_4bit_quant_type", "nf4")
        settings.setdefault("bnb_4bit_use_double_quant", True)
        return BitsAndBytesConfig(bnb_4bit_compute_dtype=getattr(torch, dtype_name), **settings)


# ----------------------------------------------------------------------------------------------
# Finding presets
# ----------------------------------------------------------------------------------------------


def _preset_dirs() -> list[Path]:
    dirs = []
    if os.environ.get(PRESETS_ENV):
        dirs.append(Path(os.environ[PRESETS_ENV]).expanduser())
    dirs.append(PRESETS_DIR)
    return dirs


def available_presets() -> list[str]:
    names: list[str] = []
    for folder in _preset_dirs():
        for path in sorted(folder.glob("*.json")):
            if path.stem not in names:
                names.append(path.stem)
    return names


def load_preset(name_or_path: str | os.PathLike[str]) -> Preset:
    """A preset by name (``embedded``, ``large``) or by the path of its JSON file."""
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix == ".json" or candidate.is_file():
        path = candidate
    else:
        path = next(
            (
                d / f"{name_or_path}.json"
                for d in _preset_dirs()
                if (d / f"{name_or_path}.json").is_file()
            ),
            None,
        )
        if path is None:
            raise PresetError(
                f"unknown preset {str(name_or_path)!r}; available: {', '.join(available_presets()) or 'none'} "
                f"(or give the path of a preset JSON file)"
            )
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise PresetError(f"preset file {path} does not exist") from exc
    except (OSError, ValueError) as exc:
        raise PresetError(f"cannot read preset {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise PresetError(f"preset {path} must hold a JSON object")
    return Preset.from_dict(data, path=path.resolve())


# ----------------------------------------------------------------------------------------------
# Default choice
# ----------------------------------------------------------------------------------------------


def hub_repo_cached(repo_id: str, revision: str | None = None) -> bool:
    """True when config and weights of ``repo_id`` are in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on it
        return False

    def cached(filename: str) -> str | None:
        hit = try_to_load_from_cache(repo_id, filename, revision=revision)
        return hit if isinstance(hit, str) else None

    if cached("config.json") is None:
        return False
    if cached("model.safetensors") is not None:
        return True
    index = cached("model.safetensors.index.json")
    if index is None:
        return False
    try:
        shards = set(json.loads(Path(index).read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError):
        return False
    return all(cached(shard) is not None for shard in shards)


def _hub_offline() -> bool:
    return any(
        os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _cuda_memory_gb() -> float | None:
    """Total memory of CUDA device 0, or None without a usable CUDA device."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        return torch.cuda.get_device_properties(0).total_memory / 2**30
    except Exception:  # a broken driver must not stop the app from choosing the CPU model
        return None


def default_preset_choice(
    *,
    cuda_memory_gb: float | None | str = "auto",
    offline: bool | None = None,
    cached: bool | dict[str, bool] | None = None,
) -> tuple[str, str]:
    """``(model name, human-readable reason)`` when the user names none.

    On a CUDA machine a pretrained Qwen-VL-class model in 4-bit (7-8 B when the GPU has the
    memory, else 3-4 B) whose weights are cached or downloadable, otherwise the embedded preset
    (`rsvlm.backends.choice.default_choice`). The untrained `large` preset is never chosen.
    Whether the hub is reachable cannot be checked without the network, so "downloadable" means
    not offline (``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` unset). The keyword arguments
    override the detection (tests, ``rsvlm which --gpu-memory-gb``).
    """
    from rsvlm.backends.choice import default_choice

    memory = _cuda_memory_gb() if cuda_memory_gb == "auto" else cuda_memory_gb
    return default_choice(cuda_memory_gb=memory, offline=offline, cached=cached)


__all__ = [
    "DEFAULT_PRESET",
    "LARGE_PRESET",
    "PRESETS_DIR",
    "ComponentLoad",
    "ComponentSpec",
    "LoadPlan",
    "Preset",
    "PresetError",
    "available_presets",
    "default_preset_choice",
    "hub_repo_cached",
    "load_preset",
]
