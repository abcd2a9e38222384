"""The pretrained backends in `scripts/bench_gpu.py`: random weights of the real shapes.

Qwen2.5-VL-7B, Qwen3-VL-8B and Florence-2-large are built from their public configs (shapes
below) with random weights, so FLOPs and bytes are the real ones; the processor is the family's
own (pinned pixel budget for Qwen, 768 x 768 for Florence-2) with the tiny checkpoint's
tokenizer, whose special-token ids the configs take over. Per backend and precision (``nf4``:
the language model's linears in NF4 with double quantization and bf16 compute, vision tower and
lm_head bf16, as `rsvlm.backends.loader` loads them; ``bf16``) it measures first-token latency,
decode tokens/s, weights and peak GPU memory, and scan chips/s (chips of one size in padded
batches of ``--scene-batch``, as `rsvlm.backends.engine.PretrainedEngine.answer_chips` scans).

``--tiny`` uses the tiny hub-layout checkpoints of `rsvlm.backends.tiny` on the CPU instead.
"""

from __future__ import annotations

import gc
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

QUESTION = "Find all buildings in this image."

# Public configs (config.json of the hub repos), the fields that set the shapes.
REAL_SHAPES: dict[str, dict[str, Any]] = {
    "qwen2_5_vl": {
        "repo": "Qwen/Qwen2.5-VL-7B-Instruct",
        "text_config": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                            num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                            max_position_embeddings=128000,
                            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                             "mrope_section": [16, 24, 24]}),
        "vision_config": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                              out_hidden_size=3584, window_size=112, patch_size=14,
                              fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
    },
    "qwen3_vl": {
        "repo": "Qwen/Qwen3-VL-8B-Instruct",
        "text_config": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                            num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                            vocab_size=151936, max_position_embeddings=262144,
                            rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                             "mrope_section": [24, 20, 20],
                                             "mrope_interleaved": True}),
        "vision_config": dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                              out_hidden_size=4096, patch_size=16, num_position_embeddings=2304,
                              deepstack_visual_indexes=[8, 16, 24]),
    },
    "florence2": {
        "repo": "florence-community/Florence-2-large",
        "text_config": dict(model_type="bart", d_model=1024, encoder_layers=12, decoder_layers=12,
                            encoder_attention_heads=16, decoder_attention_heads=16,
                            encoder_ffn_dim=4096, decoder_ffn_dim=4096, vocab_size=51328,
                            max_position_embeddings=1024),
        "vision_config": dict(embed_dim=[256, 512, 1024, 2048], depths=[1, 1, 9, 1],
                              num_heads=[8, 16, 32, 64], num_groups=[8, 16, 32, 64],
                              window_size=12, projection_dim=1024, patch_size=[7, 3, 3, 3],
                              patch_stride=[4, 2, 2, 2], patch_padding=[3, 1, 1, 1],
                              patch_prenorm=[False, True, True, True]),
        "image_size": 768,
        "image_seq_length": 577,
    },
}


class _LanguageModelView:
    """``.language_model`` and ``.config`` of a family's model, as bench_gpu's helpers expect."""

    def __init__(self, model: Any) -> None:
        inner = getattr(model, "model", model)
        self.language_model = getattr(inner, "language_model", None) or model.language_model
        self.config = model.config


def real_config(family: str, tiny_dir: Path) -> Any:
    """The family's real-shape config, with the special-token ids of ``tiny_dir``'s tokenizer."""
    from transformers import AutoConfig

    tiny = AutoConfig.from_pretrained(str(tiny_dir))
    shapes = REAL_SHAPES[family]
    data = tiny.to_dict()
    keep = ("model_type", "eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id",
            "forced_bos_token_id")  # the tokenizer's ids; every shape field is the real one
    text = {**{k: v for k, v in data["text_config"].items() if k in keep}, **shapes["text_config"]}
    vision = {**{k: v for k, v in data["vision_config"].items() if k == "model_type"},
              **shapes["vision_config"]}
    data.update(text_config=text, vision_config=vision)
    for key in ("architectures", "transformers_version", "_name_or_path"):
        data.pop(key, None)
    return type(tiny).from_dict(data)


def load_backend(family: str, device: str, mode: str, *, tiny: bool, folder: Path) -> Any:
    """A `PretrainedModel` of random weights (real shapes unless ``tiny``) in ``mode``."""
    from rsvlm.backends.loader import load_pretrained

    if tiny:
        return load_pretrained(str(folder), device=device, quantize=mode == "nf4")
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("bench_gpu", Path(__file__).with_name("bench_gpu.py"))
    bench = sys.modules.get("bench_gpu") or importlib.util.module_from_spec(spec)
    if "bench_gpu" not in sys.modules:
        spec.loader.exec_module(bench)
    loaded = load_pretrained(str(folder), device="cpu", quantize=False)  # processor + family
    config = real_config(family, folder)
    torch.manual_seed(0)
    with torch.device(device), bench._default_dtype(torch.bfloat16):
        model = loaded.family.transformers_class()(config)
    model.to(device=device, dtype=torch.bfloat16).eval()
    if mode == "nf4":
        bench.quantize_language_model(_LanguageModelView(model), device)
    model.generation_config = loaded.model.generation_config
    if family == "florence2":
        ip = loaded.processor.image_processor
        ip.size = {"height": REAL_SHAPES[family]["image_size"],
                   "width": REAL_SHAPES[family]["image_size"]}
        loaded.processor.num_image_tokens = REAL_SHAPES[family]["image_seq_length"]
    loaded.model = model
    loaded.info["precision"] = mode
    return loaded


def bench_backend(family: str, mode: str, args: Any, scene: Path | None, folder: Path,
                  timed_generate: Any, decode_bytes: Any, bandwidth: float) -> dict[str, Any]:
    import numpy as np
    from PIL import Image

    device = args.device
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    loaded = load_backend(family, device, mode, tiny=args.tiny, folder=folder)
    row: dict[str, Any] = {"backend": family, "mode": mode, "build_s": round(time.perf_counter() - t0, 1),
                           "repo": f"tiny {family}" if args.tiny else REAL_SHAPES[family]["repo"]}
    model, processor, fam = loaded.model, loaded.processor, loaded.family
    row["weights_gb"] = round((torch.cuda.memory_allocated() if cuda else
                               sum(p.numel() * p.element_size() for p in model.parameters())) / 2**30, 3)
    row["nf4_linears"] = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (args.chip_px, args.chip_px, 3),
                                                               dtype=np.uint8))
    user = fam.user_text(QUESTION, None)
    encoded = fam.encode(processor, image, [(user, None)], "")
    inputs = {k: v.to(device) for k, v in encoded.inputs.items() if hasattr(v, "to")}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16 if not args.tiny
                                                           else loaded.model.dtype)
    row["prompt_tokens"] = int(inputs["input_ids"].shape[1])
    timed_generate(model, inputs, 2, device, 1)  # warm-up
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    first, step_s = timed_generate(model, inputs, args.new_tokens, device, args.repeats)
    row["first_token_s"] = round(first, 4)
    row["decode_tok_s_b1"] = round(1 / step_s, 2)
    if not getattr(model.config, "is_encoder_decoder", False):
        bytes_step = decode_bytes(_LanguageModelView(model), 1,
                                  row["prompt_tokens"] + args.new_tokens // 2)
        row["bw_fraction_b1"] = round((1 / step_s) / (bandwidth * 1e9 / bytes_step), 6)
    if cuda:
        row["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    if scene is not None and mode in args.scene_modes:
        row["scene"] = scene_chips(loaded, scene, args)
    del model, loaded
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def scene_chips(loaded: Any, scene: Path, args: Any) -> dict[str, Any]:
    import tiles
    from rsvlm.engine import ChatEngine
    from rsvlm.scan import scan

    generation = {"min_new_tokens": args.scene_tokens}
    engine = ChatEngine(loaded, generation=generation, max_new_tokens=args.scene_tokens)
    cancel = threading.Event()

    def progress(done: int, total: int) -> None:
        if args.scene_max_chips is not None and done >= args.scene_max_chips:
            cancel.set()

    with tiles.open_source(scene) as source:
        result = scan(source, QUESTION, engine=engine, chip_size=args.chip_size,
                      batch_size=args.scene_batch, max_new_tokens=args.scene_tokens,
                      progress=progress, cancel=cancel)
    return {"chips_done": result.chips_done, "chips_total": result.chips_total,
            "seconds": round(result.seconds, 3), "chips_per_s": round(result.chips_per_s, 3)}


def run_backends(args: Any, scene: Path | None, timed_generate: Any, decode_bytes: Any,
                 bandwidth: float) -> list[dict[str, Any]]:
    from rsvlm.backends.tiny import write_tiny_checkpoint

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.backends:
            folder = write_tiny_checkpoint(family, Path(tmp) / family)
            for mode in args.modes:
                try:
                    rows.append(bench_backend(family, mode, args, scene, folder, timed_generate,
                                              decode_bytes, bandwidth))
                except torch.OutOfMemoryError as exc:
                    rows.append({"backend": family, "mode": mode, "error": f"out of GPU memory: {exc}"})
                    gc.collect()
                    torch.cuda.empty_cache()
    return rows
