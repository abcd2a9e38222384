#!/usr/bin/env python
"""GPU benchmark of the large preset's shapes, with random weights (nothing is downloaded).

The model is `RSVLMForConditionalGeneration` built from the large preset's config (SigLIP2-so400m
vision tower + Qwen2.5-7B-Instruct decoder, seed 003 connector and experts) with random weights:
the same matrices, hence the same FLOPs and bytes as the real checkpoint, so every number below
holds for the real model up to the answer length (random weights never stop early: decoding
is forced to a fixed number of tokens).

Per precision (``nf4``: the language model's linear layers in bitsandbytes NF4 with double
quantization and bf16 compute, vision tower, connector, experts, embeddings and head in bf16, as
`rsvlm.loading` loads the large preset; ``bf16``: everything in bf16) it measures

* first-token latency (image + prompt prefill and one token, batch 1),
* decode tokens/s at batch 1 and 4 (every step of a fixed-length generation is timestamped;
  the rate is taken over the steps after the first),
* weight memory and peak GPU memory during generation,
* the decode rate as a fraction of the memory-bandwidth bound: every decode step reads all
  decoder weights plus the KV cache, so ``bound = bandwidth / bytes_per_step`` (bandwidth from a
  table of known GPUs, else a measured device-to-device copy),
* whole-scene throughput: `rsvlm.scan` over a generated ``--scene-size`` square GeoTIFF
  (chips/s, batch ``--scene-batch``, ``--scene-tokens`` tokens per chip).

    python scripts/bench_gpu.py                      # on a CUDA machine: the real shapes
    python scripts/bench_gpu.py --tiny               # tiny shapes on the CPU (the test suite runs this)
    python scripts/bench_gpu.py --json out.json --markdown out.md
    python scripts/bench_gpu.py --backends qwen2_5_vl,qwen3_vl,florence2   # + pretrained backends

The tokenizer is a small word-level stand-in (Qwen's is not available offline); prompt lengths
are dominated by the 1161 image tokens the connector emits, which are exact.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench_gpu")

# Peak memory bandwidth in GB/s (vendor data sheets), matched against the device name.
KNOWN_BANDWIDTH_GBS = {
    "H200": 4800,
    "H100 SXM": 3350,
    "H100 80GB HBM3": 3350,
    "H100 NVL": 3900,
    "H100 PCIE": 2000,
    "GH200": 4000,
    "A100-SXM4-80GB": 2039,
    "A100 80GB PCIE": 1935,
    "A100-SXM4-40GB": 1555,
    "A100-PCIE-40GB": 1555,
    "L40S": 864,
    "L40": 864,
    "L4": 300,
    "A10G": 600,
    "A10": 600,
    "T4": 320,
    "V100": 900,
    "RTX 4090": 1008,
    "RTX 3090": 936,
    "RTX A6000": 768,
    "RTX 6000 ADA": 960,
}
QUESTION = "find all buildings"


# ----------------------------------------------------------------------------------------------
# Model of the real shapes, random weights
# ----------------------------------------------------------------------------------------------


def bench_config(tiny: bool) -> Any:
    """The large preset's config (or a tiny one of the same architecture for ``--tiny``)."""
    from rsvlm.testing import (
        QUANTIZABLE_TEXT_WIDTHS,
        TINY_IMAGE_TOKEN_ID,
        tiny_config,
        tiny_text_config,
    )

    if tiny:
        return tiny_config(
            vision="siglip",
            text_config=tiny_text_config("qwen2", **QUANTIZABLE_TEXT_WIDTHS),
            connector_type="semantic_prompter",
            experts_every_k_layers=2,
        )
    from rsvlm.presets import load_preset

    # The stand-in tokenizer's image token; any id below the vocabulary costs the same.
    return load_preset("large").to_config(image_token_id=TINY_IMAGE_TOKEN_ID)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(config: Any, device: str, mode: str) -> Any:
    """Random-weight model in bf16 on ``device``; ``nf4`` then quantizes the decoder's linears.

    Built directly on the device (no 30 GB fp32 copy in host RAM). NF4 replaces each decoder
    linear layer by a bitsandbytes ``Linear4bit`` (NF4, double quantization, bf16 compute), which
    is what ``from_pretrained(quantization_config=...)`` does to the real checkpoint; experts,
    router, embeddings and the LM head stay bf16 as in `rsvlm.loading`.
    """
    from rsvlm.modeling import RSVLMForConditionalGeneration

    torch.manual_seed(0)
    with torch.device(device), _default_dtype(torch.bfloat16):
        model = RSVLMForConditionalGeneration(config)
    model.to(device=device, dtype=torch.bfloat16)
    if mode == "nf4":
        quantize_language_model(model, device)
    elif mode != "bf16":
        raise ValueError(f"unknown mode {mode!r} (nf4 or bf16)")
    return model.eval()


def quantize_language_model(model: Any, device: str) -> int:
    """Swap the decoder's ``nn.Linear`` layers for NF4 ``Linear4bit`` in place; returns how many."""
    import bitsandbytes as bnb

    lm = model.language_model
    skip = ("lm_head", "experts", "router")  # kept 16-bit, as the real 4-bit load keeps them
    targets = [
        (name, mod)
        for name, mod in lm.named_modules()
        if isinstance(mod, torch.nn.Linear) and not any(s in name for s in skip)
    ]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = lm.get_submodule(parent_name) if parent_name else lm
        q = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=torch.bfloat16,
            compress_statistics=True,
            quant_type="nf4",
        )
        q.weight = bnb.nn.Params4bit(
            linear.weight.data.to("cpu"),
            requires_grad=False,
            compress_statistics=True,
            quant_type="nf4",
        )
        if linear.bias is not None:
            q.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        setattr(parent, child, q.to(device))  # .to() quantizes
        del linear
    return len(targets)


def _tensor_bytes(module: torch.nn.Module) -> int:
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        total += t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)
        if state is not None:  # NF4 block scales (and their own scales with double quant)
            total += state.absmax.numel() * state.absmax.element_size()
            nested = getattr(state, "state2", None)
            if nested is not None:
                total += nested.absmax.numel() * nested.absmax.element_size()
    return total


def decode_bytes_per_step(model: Any, batch: int, seq_len: int) -> int:
    """Bytes one decode step must read: decoder weights (not the embedding table: one row per
    token) plus the KV cache of ``batch`` sequences of ``seq_len`` tokens."""
    lm = model.language_model
    embed = lm.get_input_embeddings()
    weights = _tensor_bytes(lm) - _tensor_bytes(embed)
    tc = model.config.text_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    kv = 2 * tc.num_hidden_layers * tc.num_key_value_heads * head_dim * seq_len * batch * 2
    return int(weights + kv)


# ----------------------------------------------------------------------------------------------
# Inputs, timing
# ----------------------------------------------------------------------------------------------


def build_processor(config: Any) -> Any:
    from transformers import SiglipImageProcessorPil

    from rsvlm.processing import RSVLMProcessor
    from rsvlm.testing import tiny_tokenizer

    size = config.vision_config.image_size
    return RSVLMProcessor(
        SiglipImageProcessorPil(size={"height": size, "width": size}),
        tiny_tokenizer(),
        num_image_tokens=config.num_image_tokens,
        image_token=config.image_token,
        max_semantic_tokens=config.max_semantic_tokens,
    )


def build_inputs(processor: Any, batch: int, device: str, chip_px: int) -> dict[str, Any]:
    from PIL import Image

    from rsvlm import prompting
    from rsvlm.testing import WORDS

    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 255, (chip_px, chip_px, 3), dtype=np.uint8))
        for _ in range(batch)
    ]
    # Three retrieved descriptions of ~40 words each, as the large preset's top-k = 3 gives.
    semantic = [[" ".join(rng.choice(WORDS[:80], 40)) for _ in range(3)] for _ in range(batch)]
    messages = prompting.build_messages([(QUESTION, None)], image_token=processor.image_token)
    prompt = prompting.render(processor, messages, add_generation_prompt=True)
    inputs = processor(
        text=[prompt] * batch,
        images=images,
        semantic_texts=semantic,
        queries=[QUESTION] * batch,
        padding_side="left",
    )
    out = {k: v.to(device) for k, v in inputs.items()}
    out["pixel_values"] = out["pixel_values"].to(torch.bfloat16)
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class _StepClock:
    """A logits processor that timestamps every generation step (after the device finished it).

    One ``generate`` call then gives both the first-token latency (prefill) and the decode rate
    (steps after the first), with no differencing of two noisy runs.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        _sync(self.device)
        self.times.append(time.perf_counter())
        return scores


def timed_generate(
    model: Any, inputs: dict[str, Any], new_tokens: int, device: str, repeats: int
) -> tuple[float, float]:
    """Median ``(first-token seconds, seconds per decode step)`` over ``repeats`` runs of
    ``generate`` producing exactly ``new_tokens`` tokens."""
    from transformers import LogitsProcessorList

    firsts, steps = [], []
    for _ in range(repeats):
        clock = _StepClock(device)
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                **inputs,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
                # random weights may pick the image placeholder, which needs pixels when fed back
                suppress_tokens=[model.config.image_token_id],
                logits_processor=LogitsProcessorList([clock]),
            )
        firsts.append(clock.times[0] - t0)
        if len(clock.times) > 1:
            steps.append((clock.times[-1] - clock.times[0]) / (len(clock.times) - 1))
    return statistics.median(firsts), statistics.median(steps) if steps else float("nan")


def gpu_bandwidth_gbs(device: str) -> tuple[float, str]:
    """Peak bandwidth from the table of known GPUs, else a measured copy (read + write)."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device).upper()
        for key, gbs in sorted(KNOWN_BANDWIDTH_GBS.items(), key=lambda kv: -len(kv[0])):
            if key.upper() in name:
                return float(gbs), f"data sheet ({key})"
    n = (1 << 28) if device.startswith("cuda") else (1 << 25)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    _sync(device)
    return 2 * n * 10 / (time.perf_counter() - t0) / 1e9, "measured copy"


# ----------------------------------------------------------------------------------------------
# Whole scene
# ----------------------------------------------------------------------------------------------


def make_scene(path: Path, size: int) -> Path:
    """A ``size`` x ``size`` RGB GeoTIFF (0.5 m pixels in UTM 36N), written in strips."""
    import rasterio
    from rasterio.transform import from_origin

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    profile = dict(
        driver="GTiff",
        width=size,
        height=size,
        count=3,
        dtype="uint8",
        crs="EPSG:32636",
        transform=from_origin(450_000, 40_000, 0.5, 0.5),
        tiled=True,
        blockxsize=512,
        blockysize=512,
    )
    with rasterio.open(path, "w", **profile) as ds:
        for row in range(0, size, 1024):
            h = min(1024, size - row)
            block = rng.integers(0, 255, (3, h, size), dtype=np.uint8)
            ds.write(block, window=rasterio.windows.Window(0, row, size, h))
    return path


def scene_throughput(
    model: Any,
    processor: Any,
    raster: Path,
    *,
    chip_size: int,
    batch: int,
    new_tokens: int,
    max_chips: int | None,
) -> dict[str, Any]:
    import tiles
    from rsvlm.engine import ChatEngine
    from rsvlm.loading import LoadedModel
    from rsvlm.scan import scan

    engine = ChatEngine(
        LoadedModel(model, processor, None, {"preset": "bench"}),
        generation={"min_new_tokens": new_tokens, "repetition_penalty": 1.0},
    )
    cancel = threading.Event()

    def progress(done: int, total: int) -> None:
        if max_chips is not None and done >= max_chips:
            cancel.set()

    with tiles.open_source(raster) as source:
        result = scan(
            source,
            QUESTION,
            engine=engine,
            chip_size=chip_size,
            batch_size=batch,
            max_new_tokens=new_tokens,
            progress=progress,
            cancel=cancel,
        )
    return {
        "chips_done": result.chips_done,
        "chips_total": result.chips_total,
        "seconds": round(result.seconds, 3),
        "chips_per_s": round(result.chips_per_s, 3),
        "scene_estimate_s": round(result.chips_total / result.chips_per_s, 1)
        if result.chips_per_s
        else None,
        **result.timing,
    }


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def bench_mode(
    config: Any,
    processor: Any,
    mode: str,
    args: argparse.Namespace,
    scene: Path | None,
    bandwidth: float,
) -> dict[str, Any]:
    device = args.device
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = build_model(config, device, mode)
    build_s = time.perf_counter() - t0
    weights_bytes = torch.cuda.memory_allocated() if cuda else _tensor_bytes(model)
    n4 = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    row: dict[str, Any] = {
        "mode": mode,
        "build_s": round(build_s, 1),
        "weights_gb": round(weights_bytes / 2**30, 3),
        "weights_bytes": int(weights_bytes),
        "nf4_linears": n4,
        "attention": model.config.text_config._attn_implementation,
    }
    one = build_inputs(processor, 1, device, args.chip_px)
    prompt_len = int(one["input_ids"].shape[1])
    row["prompt_tokens"] = prompt_len
    timed_generate(model, one, 2, device, 1)  # warm-up: kernels, allocator
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for batch in args.batches:
        inputs = one if batch == 1 else build_inputs(processor, batch, device, args.chip_px)
        first, step_s = timed_generate(model, inputs, args.new_tokens, device, args.repeats)
        if batch == 1:
            row["first_token_s"] = round(first, 4)
        row[f"decode_tok_s_b{batch}"] = round(batch / step_s, 2)
        seq = prompt_len + args.new_tokens // 2
        bytes_step = decode_bytes_per_step(model, batch, seq)
        bound_steps = bandwidth * 1e9 / bytes_step
        row[f"bw_fraction_b{batch}"] = round((1 / step_s) / bound_steps, 6)
        row[f"bytes_per_step_b{batch}"] = bytes_step
    if "first_token_s" not in row:
        row["first_token_s"] = round(timed_generate(model, one, 2, device, args.repeats)[0], 4)
    if cuda:
        row["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    if scene is not None and mode in args.scene_modes:
        row["scene"] = scene_throughput(
            model,
            processor,
            scene,
            chip_size=args.chip_size,
            batch=args.scene_batch,
            new_tokens=args.scene_tokens,
            max_chips=args.scene_max_chips,
        )
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    config = bench_config(args.tiny)
    processor = build_processor(config)
    device = args.device
    bandwidth, bw_source = gpu_bandwidth_gbs(device)
    env = {
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "bandwidth_gbs": round(bandwidth, 1),
        "bandwidth_source": bw_source,
        "shapes": "tiny" if args.tiny else "large preset (SigLIP2-so400m + Qwen2.5-7B)",
        "image_tokens": config.num_image_tokens,
        "new_tokens": args.new_tokens,
    }
    try:
        import bitsandbytes

        env["bitsandbytes"] = bitsandbytes.__version__
    except Exception as exc:  # nf4 rows will fail with this reason
        env["bitsandbytes"] = f"unavailable ({exc})"
    scene = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.scene_size:
            t0 = time.perf_counter()
            scene = make_scene(
                Path(args.scene_dir or tmp) / f"scene_{args.scene_size}.tif", args.scene_size
            )
            log.info("scene %s written in %.1f s", scene, time.perf_counter() - t0)
        rows = []
        for mode in [] if args.only_backends else args.modes:
            log.info("benchmarking %s ...", mode)
            try:
                rows.append(bench_mode(config, processor, mode, args, scene, bandwidth))
            except torch.OutOfMemoryError as exc:
                rows.append({"mode": mode, "error": f"out of GPU memory: {exc}"})
                gc.collect()
                torch.cuda.empty_cache()
        backend_rows = _backends_module().run_backends(
            args, scene, timed_generate, decode_bytes_per_step, bandwidth) if args.backends else []
    env["scene_size"] = args.scene_size
    env["chip_size"] = args.chip_size
    return {"env": env, "rows": rows, "backend_rows": backend_rows}


def _backends_module() -> Any:
    """`scripts/bench_backends.py` (the pretrained backends), loaded next to this script."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_backends", Path(__file__).with_name("bench_backends.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def to_markdown(result: dict[str, Any]) -> str:
    env, rows = result["env"], result["rows"]
    lines = [
        f"Device: {env['device']} (bandwidth {env['bandwidth_gbs']} GB/s, "
        f"{env['bandwidth_source']}); torch {env['torch']}, bitsandbytes {env['bitsandbytes']}; "
        f"{env['shapes']}; {env['image_tokens']} image tokens; {env['new_tokens']} new tokens.",
        "",
        "| mode | first token (s) | decode tok/s b1 | decode tok/s b4 | of bandwidth bound b1 "
        "| weights (GiB) | peak (GiB) | scene chips/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['mode']} | {r['error']} |  |  |  |  |  |  |")
            continue
        scene = r.get("scene", {}).get("chips_per_s", "")
        lines.append(
            f"| {r['mode']} | {r['first_token_s']} | {r.get('decode_tok_s_b1', '')} "
            f"| {r.get('decode_tok_s_b4', '')} | {round(r.get('bw_fraction_b1', 0), 3)} "
            f"| {r['weights_gb']} | {r.get('peak_gb', '')} | {scene} |"
        )
    if result.get("backend_rows"):
        lines += ["", "Pretrained backends (random weights of the real shapes):",
                  "", "| backend | mode | first token (s) | decode tok/s b1 | weights (GiB) "
                  "| peak (GiB) | scene chips/s |", "|---|---|---|---|---|---|---|"]
    for r in result.get("backend_rows", []):
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['mode']} | {r['error']} |  |  |  |  |")
            continue
        scene = r.get("scene", {}).get("chips_per_s", "")
        lines.append(f"| {r['repo']} | {r['mode']} | {r['first_token_s']} "
                     f"| {r['decode_tok_s_b1']} | {r['weights_gb']} | {r.get('peak_gb', '')} "
                     f"| {scene} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (smoke test)")
    p.add_argument("--device", default=None, help="cuda / cuda:N / cpu (default: cuda if present)")
    p.add_argument("--modes", default="nf4,bf16", help="comma list of nf4, bf16")
    p.add_argument("--batches", default="1,4", help="decode batch sizes")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens per decode run")
    p.add_argument("--repeats", type=int, default=3, help="median over this many runs")
    p.add_argument("--chip-px", type=int, default=512, help="chip pixels fed to the processor")
    p.add_argument("--scene-size", type=int, default=10000, help="scene side in px (0: skip)")
    p.add_argument("--scene-dir", default=None, help="keep the generated scene here")
    p.add_argument("--scene-modes", default="nf4", help="modes that also run the scene scan")
    p.add_argument("--chip-size", type=int, default=512, help="scan chip side in raster px")
    p.add_argument("--scene-batch", type=int, default=8, help="chips per generate in the scan")
    p.add_argument("--scene-tokens", type=int, default=32, help="tokens generated per chip")
    p.add_argument(
        "--scene-max-chips",
        type=int,
        default=None,
        help="stop the scan after this many chips (throughput from those)",
    )
    p.add_argument("--backends", default="",
                   help="pretrained backends too: comma list of qwen2_5_vl, qwen3_vl, florence2 "
                   "(random weights of Qwen2.5-VL-7B / Qwen3-VL-8B / Florence-2-large shapes)")
    p.add_argument("--only-backends", action="store_true",
                   help="skip the large preset's rows (only the pretrained backends)")
    p.add_argument("--json", default=None, help="write the results as JSON here")
    p.add_argument("--markdown", default=None, help="write the table as Markdown here")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if args.tiny:  # small everything, so the test suite can run it in seconds
        args.new_tokens = min(args.new_tokens, 6)
        args.repeats = 1
        args.chip_px = min(args.chip_px, 64)
        args.scene_size = min(args.scene_size, 300)
        args.chip_size = min(args.chip_size, 128)
        args.scene_tokens = min(args.scene_tokens, 4)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.scene_modes = [m.strip() for m in args.scene_modes.split(",") if m.strip()]
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2")
    return args


def main(argv: list[str] | None = None, *, out: Callable[[str], Any] = print) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.tiny:  # tiny matrices: one thread beats fighting over shared cores (~100x here)
        torch.set_num_threads(1)
    try:
        result = run(args)
    finally:
        torch.set_num_threads(threads)
    table = to_markdown(result)
    out(table)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(table)
    return result


if __name__ == "__main__":
    main()
