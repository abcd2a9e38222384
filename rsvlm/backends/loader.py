"""Load a pretrained vision-language model (hub id or local folder) for chat.

The family comes from ``config.json``'s ``model_type``; the model loads through its stock
transformers class (never remote code), optionally in 4-bit NF4 (double quantization, bf16
compute on CUDA; the vision tower and ``lm_head`` stay unquantized through
``llm_int8_skip_modules``, as 4-bit there is known to hurt boxes), optionally with a LoRA adapter
(`rsvlm-train fit --base`). A Florence-2 checkpoint in the original remote-code layout (Falcon) is
converted once into the cache first (`rsvlm.backends.florence2.convert_original`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rsvlm.backends import Family, FamilyError, family_for
from rsvlm.backends.florence2 import CONVERSION_MARK, convert_original, is_original_layout
from rsvlm.loading import LoadedModel

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")


@dataclass
class PretrainedModel(LoadedModel):
    family: Any = None  # rsvlm.backends.base.Family
    retriever: Any = None  # rsvlm.backends.retriever.EmbeddedRetriever | None


def converted_cache() -> Path:
    base = Path(os.environ.get("RSVLM_CACHE", Path.home() / ".cache" / "rsvlm")).expanduser()
    return base / "converted"


def read_config(location: str, revision: str | None = None) -> dict[str, Any]:
    """``config.json`` of a folder or hub id (from the hub cache, or downloaded when online)."""
    path = Path(location).expanduser()
    if path.is_dir():
        file = path / "config.json"
        if not file.is_file():
            raise FamilyError(f"{location} has no config.json: not a model folder")
        return json.loads(file.read_text())
    if not _HUB_ID.match(location):
        raise FamilyError(f"{location!r} is neither a model folder nor a hub id (org/name)")
    from transformers.utils import cached_file

    try:
        file = cached_file(location, "config.json", revision=revision)
    except OSError as exc:
        raise FamilyError(
            f"cannot read the config of {location} (not cached, and the Hugging Face hub is not "
            f"reachable or the repo does not exist): {str(exc).splitlines()[0]}") from exc
    return json.loads(Path(file).read_text())


def is_pretrained_location(location: str) -> bool:
    """Whether ``location`` names a pretrained family's checkpoint (a folder of one, or a hub id
    that is not a local path)."""
    path = Path(location).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            return False
        try:
            return json.loads(config.read_text()).get("model_type") != "rsvlm"
        except ValueError:
            return False
    return bool(_HUB_ID.match(location)) and not path.exists() and not location.endswith(".json")


def resolve(location: str, revision: str | None = None,
            say: Callable[[str], None] = logger.info) -> tuple[str, Family, bool]:
    """``(loadable folder or hub id, family, instruction_following)``; converts an original
    Florence-2 layout into the cache once."""
    config = read_config(location, revision)
    family = family_for(str(config.get("model_type")))
    folder = Path(location).expanduser()
    mark = folder / CONVERSION_MARK if folder.is_dir() else None
    following = bool(mark and mark.is_file() and json.loads(mark.read_text()).get(
        "instruction_following"))
    if family.name == "florence2" and is_original_layout(config):
        key = hashlib.sha256(f"{location}@{revision}".encode()).hexdigest()[:12]
        out = converted_cache() / f"{Path(location).name}-{key}"
        if not (out / "config.json").is_file():
            src = folder if folder.is_dir() else Path(_snapshot(location, revision))
            say(f"Converting {location} from Florence-2's original layout (once, into {out}) ...")
            convert_original(src, out, instruction_following="falcon" in location.lower())
        mark_data = json.loads((out / CONVERSION_MARK).read_text())
        return str(out), family, bool(mark_data.get("instruction_following"))
    return location, family, following


def _snapshot(repo: str, revision: str | None) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(repo, revision=revision,
                             allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"])


def bnb_config(family: Family, device: str) -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=list(family.skip_modules))


def load_pretrained(location: str, *, device: str = "cpu", quantize: bool | None = None,
                    adapter: str | Path | None = None, revision: str | None = None,
                    retriever: Any = None, progress: Callable[[str], None] | None = None,
                    merge_lora: bool = True) -> PretrainedModel:
    """Load ``location`` (hub id or folder of a supported family) on ``device``.

    ``quantize=None`` means NF4 on CUDA and full precision on the CPU; the 4-bit path also runs
    on a CPU (bitsandbytes), slowly. Raises `FamilyError` for an unsupported checkpoint and
    `RuntimeError` naming the cause when loading fails."""
    import torch

    say = progress or (lambda msg: logger.info("%s", msg))
    t0 = time.perf_counter()
    path, family, following = resolve(location, revision, say)
    if hasattr(family, "instruction_following"):
        family.instruction_following = following
    on_cuda = device.startswith("cuda")
    quantized = on_cuda if quantize is None else bool(quantize)
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if on_cuda else torch.float32}
    if revision:
        kwargs["revision"] = revision
    if on_cuda and family.name != "florence2":  # FlashAttention-2 when installed, else SDPA
        import importlib.util

        kwargs["attn_implementation"] = (
            "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa")
    if quantized:
        kwargs["quantization_config"] = bnb_config(family, device)
        kwargs["device_map"] = {"": device if ":" in device else (0 if on_cuda else "cpu")}
    say(f"Loading {location} ({family.name}{', 4-bit NF4' if quantized else ''}) on {device} ...")
    try:
        model = family.transformers_class().from_pretrained(path, **kwargs)
        if not quantized:
            model.to(device)
        processor = family.load_processor(path, revision=revision)
    except FamilyError:
        raise
    except Exception as exc:
        from rsvlm.loading import GPUMemoryError, is_cuda_oom

        if on_cuda and is_cuda_oom(exc):
            raise GPUMemoryError(
                f"The GPU ran out of memory loading {location}. Try a smaller model "
                f"(`rsvlm which` names one for this GPU) or --quantize 4bit.") from exc
        raise RuntimeError(f"Could not load {location} as {family.name}: {exc}") from exc
    if adapter:
        from peft import PeftModel

        say(f"Applying the LoRA adapter {adapter} ...")
        model = PeftModel.from_pretrained(model, str(adapter))
        if merge_lora and not quantized:
            model = model.merge_and_unload()
    model.eval()
    family.after_load(model, processor)
    info = {
        "preset": location, "family": family.name, "device": device,
        "precision": "4-bit NF4 (vision tower and lm_head 16-bit)" if quantized
        else str(kwargs["dtype"]).replace("torch.", ""),
        "attention": getattr(model.config, "_attn_implementation", None),
        "trained": True, "pretrained": True, "adapter": str(adapter) if adapter else None,
        "retrieval": retriever is not None, "load_s": round(time.perf_counter() - t0, 2),
    }
    return PretrainedModel(model, processor, None, info, family=family, retriever=retriever)
