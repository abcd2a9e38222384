"""Which model runs when the user names none, and the named pretrained presets.

On a CUDA GPU the default is a pretrained Qwen-VL-class model in 4-bit NF4: a 7-8 B one when
the GPU has the memory, a 3-4 B one below that; without a GPU, or when neither can be loaded
(hub switched off and nothing cached, bitsandbytes missing, GPU too small), the embedded model.
The `large` research preset (untrained connector) is never a default.

Memory figures are for NF4 with double quantization and the 16-bit parts this project keeps
(vision tower, embeddings, lm_head), plus about 2 GiB for activations and the KV cache of one
chip's conversation: ``0.53 bytes x decoder linear weights + 2 bytes x (vision tower +
embeddings + lm_head) + 2 GiB``, from the public configs (e.g. Qwen2.5-VL-7B: 6.5 B decoder
linear weights, 0.67 B vision, 2 x 0.55 B embeddings/head -> about 9 GiB).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

EMBEDDED = "embedded"


@dataclass(frozen=True)
class PretrainedPreset:
    name: str
    repo: str
    family: str
    params_b: float
    min_gpu_memory_gb: float  # NF4 (see module docstring)
    notes: str = ""


PRETRAINED_PRESETS: dict[str, PretrainedPreset] = {p.name: p for p in (
    PretrainedPreset("qwen2.5-vl-7b", "Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl", 8.3, 10,
                     "default on GPUs with 10 GiB or more"),
    PretrainedPreset("qwen2.5-vl-3b", "Qwen/Qwen2.5-VL-3B-Instruct", "qwen2_5_vl", 3.8, 6,
                     "default on GPUs with 6-10 GiB"),
    PretrainedPreset("qwen3-vl-8b", "Qwen/Qwen3-VL-8B-Instruct", "qwen3_vl", 8.8, 10,
                     "boxes on a 0-1000 grid"),
    PretrainedPreset("qwen3-vl-4b", "Qwen/Qwen3-VL-4B-Instruct", "qwen3_vl", 4.4, 6),
    PretrainedPreset("florence-2-large", "florence-community/Florence-2-large", "florence2", 0.77,
                     2, "task prompts; small enough for a CPU"),
    PretrainedPreset("florence-2-base", "florence-community/Florence-2-base", "florence2", 0.23,
                     1, "task prompts; small enough for a CPU"),
    PretrainedPreset("falcon-large", "TianHuiLab/Falcon-Single-Instruction-Large", "florence2",
                     0.7, 2, "remote-sensing Florence-2; original layout, converted once"),
    PretrainedPreset("falcon-base", "TianHuiLab/Falcon-Single-Instruction-Base", "florence2",
                     0.3, 1, "remote-sensing Florence-2; original layout, converted once"),
)}

# Tiers of the GPU default, best first: a 7-8 B model, then a 3-4 B one. Within a tier a cached
# model wins, then the first (downloaded on first use).
GPU_TIERS: tuple[tuple[str, ...], ...] = (("qwen2.5-vl-7b", "qwen3-vl-8b"),
                                          ("qwen2.5-vl-3b", "qwen3-vl-4b"))


def hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"}
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def repo_cached(repo: str) -> bool:
    from rsvlm.presets import hub_repo_cached

    return hub_repo_cached(repo)


def _bitsandbytes_usable() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


def default_choice(*, cuda_memory_gb: float | None, offline: bool | None = None,
                   cached: dict[str, bool] | bool | None = None) -> tuple[str, str]:
    """``(model name, reason)`` for a machine with ``cuda_memory_gb`` of GPU memory (None: no
    CUDA GPU). ``cached`` overrides the hub-cache lookup (per repo, or one answer for all)."""
    if cuda_memory_gb is None:
        return EMBEDDED, "no CUDA GPU found, so the embedded model runs on the CPU"
    if not _bitsandbytes_usable():
        return EMBEDDED, ("bitsandbytes is not usable here, so no pretrained model can load in "
                          "4-bit; the embedded model runs")
    offline = hub_offline() if offline is None else offline

    def is_cached(name: str) -> bool:
        repo = PRETRAINED_PRESETS[name].repo
        if isinstance(cached, dict):
            return bool(cached.get(repo, cached.get(name, False)))
        return repo_cached(repo) if cached is None else bool(cached)

    fits = [t for t in GPU_TIERS if cuda_memory_gb >= PRETRAINED_PRESETS[t[0]].min_gpu_memory_gb]
    if not fits:
        small = PRETRAINED_PRESETS[GPU_TIERS[-1][0]]
        return EMBEDDED, (
            f"the GPU has {cuda_memory_gb:.0f} GiB; the smallest pretrained model, {small.name} "
            f"({small.repo}), needs about {small.min_gpu_memory_gb:.0f} GiB in 4-bit; the "
            "embedded model runs")
    for tier in fits:
        for name in tier:
            if is_cached(name):
                p = PRETRAINED_PRESETS[name]
                return name, (f"CUDA GPU with {cuda_memory_gb:.0f} GiB (a {p.params_b:.0f} B model "
                              f"needs about {p.min_gpu_memory_gb:.0f} GiB in 4-bit) and {p.repo} is "
                              "cached; it runs in 4-bit NF4")
    if offline:
        names = ", ".join(PRETRAINED_PRESETS[n].repo for t in fits for n in t)
        return EMBEDDED, (f"CUDA GPU found, but no pretrained model that fits it is cached ({names}) "
                          "and the Hugging Face hub is switched off (HF_HUB_OFFLINE); the embedded "
                          "model runs")
    p = PRETRAINED_PRESETS[fits[0][0]]
    smaller = "" if fits[0] is GPU_TIERS[0] else (
        f" (a 7-8 B model needs about {PRETRAINED_PRESETS[GPU_TIERS[0][0]].min_gpu_memory_gb:.0f} GiB)")
    return p.name, (f"CUDA GPU with {cuda_memory_gb:.0f} GiB{smaller}: {p.repo} will be downloaded "
                    f"from the Hugging Face hub on first use (about {p.params_b * 2:.0f} GB) and run "
                    "in 4-bit NF4")


def memory_check(name: str, free_gb: float | None, *, quantized: bool) -> str | None:
    """A message naming a smaller model when ``free_gb`` is below what preset ``name`` needs
    (None when it fits or cannot be told)."""
    preset = PRETRAINED_PRESETS.get(name)
    if preset is None or free_gb is None:
        return None
    need = preset.min_gpu_memory_gb if quantized else preset.params_b * 2 + 2
    if free_gb >= need:
        return None
    smaller = [p for p in PRETRAINED_PRESETS.values()
               if p.family.startswith("qwen") and p.min_gpu_memory_gb <= free_gb
               and p.params_b < preset.params_b]
    options = [f"--model {smaller[0].name} ({smaller[0].repo}, about "
               f"{smaller[0].min_gpu_memory_gb:.0f} GiB in 4-bit)"] if smaller else []
    if not quantized:
        options.append("--quantize 4bit (about a quarter of the memory)")
    options.append("--model embedded (the small model, runs on the CPU)")
    return (f"The GPU has {free_gb:.1f} GiB free; {preset.name} ({preset.repo}) needs about "
            f"{need:.0f} GiB{' in 4-bit' if quantized else ' in bf16'}. Options: "
            + "; ".join(options) + ".")


def explain(*, cuda_memory_gb: float | None, offline: bool | None = None) -> str:
    """What `rsvlm which` prints: the choice, why, and the named presets."""
    name, why = default_choice(cuda_memory_gb=cuda_memory_gb, offline=offline)
    lines = [f"{name}: {why}", "", "pretrained presets (--model NAME, or any hub id/folder of "
             "these families):"]
    for p in PRETRAINED_PRESETS.values():
        lines.append(f"  {p.name:<17} {p.repo:<45} ~{p.min_gpu_memory_gb:>4.0f} GiB NF4  {p.notes}")
    lines.append("  embedded          the shipped model (DINOv2-S + SmolLM2-135M), CPU, offline")
    lines.append("  large             research preset: connector UNTRAINED, needs --allow-untrained")
    return "\n".join(lines)
