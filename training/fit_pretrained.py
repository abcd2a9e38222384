"""LoRA / QLoRA fine-tuning of a pretrained vision-language backend on `build-data` output.

    rsvlm-train fit --base Qwen/Qwen2.5-VL-7B-Instruct --data data/kampala --out runs/qwen-kla \
        --qlora --max-steps 500
    rsvlm ask chip.tif "find all buildings" --model Qwen/Qwen2.5-VL-7B-Instruct --adapter runs/qwen-kla

Each conversation of ``train.jsonl`` (LLaVA layout, canonical boxes) is converted into the
family's own format: its chat template (`rsvlm.backends.base.Family.encode`, the same function
the engine prompts with), its box convention (`rsvlm.backends.conventions.canonical_to_family`:
Qwen2.5-VL pixels of the processor's resized image, Qwen3-VL 0-1000, Florence-2 location tokens,
GeoChat's 0-100 grid) and its region grammar. Only answer tokens carry labels. The LoRA adapter
goes on the language model's projections (`Family.lora_target`); ``--qlora`` trains it over the
NF4 model. accelerate places the model (one GPU; several through ``accelerate launch``).
The output folder is a peft adapter plus ``rsvlm_adapter.json`` naming the base.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
IGNORE = -100
ADAPTER_MANIFEST = "rsvlm_adapter.json"


@dataclass
class PretrainedFitConfig:
    base: str  # hub id, folder or pretrained preset name
    data: str  # a build-data folder
    output_dir: str
    qlora: bool = False  # train over the NF4 model (QLoRA)
    max_steps: int = 200
    lr: float = 1e-4
    grad_accum: int = 4
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    max_length: int = 2048
    tasks: tuple[str, ...] | None = None
    limit: int | None = None  # at most this many training examples
    seed: int = 0
    device: str | None = None  # None: accelerate's choice


def _region(question: str, family: Any, processor: Any, size: tuple[int, int]) -> str:
    """``In the region <box>[..]</box>: q`` -> the family's region grammar (engine's wording)."""
    from rsvlm.boxes import parse_boxes

    prefix = "In the region "
    if not question.startswith(prefix):
        return family.user_text(question, None)
    boxes = parse_boxes(question)
    if not boxes or boxes[0].span[0] != len(prefix):
        return family.user_text(question, None)
    rest = question[boxes[0].span[1]:].lstrip(": ").strip()
    return family.user_text(rest, family.region_text(processor, boxes[0].box_norm, size))


def encode_example(family: Any, processor: Any, image: Any, question: str, answer: str,
                   max_length: int) -> dict[str, torch.Tensor]:
    """Model inputs with labels on the answer only, in ``family``'s format."""
    from rsvlm.backends.conventions import canonical_to_family

    size = image.size
    user = _region(question, family, processor, size)
    encoded = family.encode(processor, image, [(user, None)], "")
    answer = canonical_to_family(answer, family.name, resized=encoded.frame.get("resized"))
    tokenizer = processor.tokenizer
    inputs = dict(encoded.inputs)
    if getattr(family, "conversational", True):
        end = "<|im_end|>" if family.name.startswith("qwen") else (tokenizer.eos_token or "")
        answer_ids = tokenizer(answer + end, add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = torch.cat([inputs["input_ids"], answer_ids], dim=1)[:, :max_length]
        labels = ids.clone()
        labels[:, : inputs["input_ids"].shape[1]] = IGNORE
        inputs.update(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        if "mm_token_type_ids" in inputs:  # Qwen: 0 for text, 1 for image tokens
            pad = ids.shape[1] - inputs["mm_token_type_ids"].shape[1]
            inputs["mm_token_type_ids"] = torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, pad))
    else:  # encoder-decoder (Florence-2): the answer is the decoder's target
        labels = tokenizer(answer, return_tensors="pt")["input_ids"][:, :max_length]
        inputs["labels"] = labels
    return inputs


def fit_pretrained(cfg: PretrainedFitConfig) -> Path:
    """Train the adapter; returns the output folder (loadable with ``--adapter``)."""
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from PIL import Image

    from rsvlm.backends.choice import PRETRAINED_PRESETS
    from rsvlm.backends.loader import load_pretrained
    from training.lm_data import read_examples

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum,
                              cpu=cfg.device == "cpu")
    base = PRETRAINED_PRESETS[cfg.base].repo if cfg.base in PRETRAINED_PRESETS else cfg.base
    examples = read_examples(cfg.data, "train", cfg.tasks)
    if cfg.limit:
        examples = examples[: cfg.limit]
    if not examples:
        raise ValueError(f"{cfg.data}/train.jsonl holds no examples of tasks {cfg.tasks}")
    device = str(accelerator.device)
    loaded = load_pretrained(base, device=device, quantize=cfg.qlora, merge_lora=False)
    family, processor, model = loaded.family, loaded.processor, loaded.model
    if cfg.qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                             lora_dropout=cfg.lora_dropout,
                                             target_modules=family.lora_target))
    model.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    root = Path(cfg.data)
    step, losses, t0 = 0, [], time.perf_counter()
    order = list(range(len(examples)))
    while step < cfg.max_steps:
        random.shuffle(order)
        for i in order:
            ex = examples[i]
            image = Image.open(root / ex.image).convert("RGB")
            batch = encode_example(family, processor, image, ex.question, ex.answer, cfg.max_length)
            batch = {k: v.to(accelerator.device) if hasattr(v, "to") else v for k, v in batch.items()}
            if "pixel_values" in batch and batch["pixel_values"].is_floating_point():
                batch["pixel_values"] = batch["pixel_values"].to(loaded.model.dtype)
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"the loss became {value} at step {step}")
            losses.append(value)
            if accelerator.sync_gradients:
                step += 1
                if step % 10 == 0 or step == cfg.max_steps:
                    log.info("step %d/%d loss %.4f", step, cfg.max_steps, sum(losses[-10:]) / len(losses[-10:]))
                if step >= cfg.max_steps:
                    break
    out = Path(cfg.output_dir)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(str(out))
        summary = {"base": base, "family": family.name, "qlora": cfg.qlora, "steps": step,
                   "examples": len(examples), "first_loss": losses[0], "last_loss": losses[-1],
                   "seconds": round(time.perf_counter() - t0, 1), "config": asdict(cfg)}
        (out / ADAPTER_MANIFEST).write_text(json.dumps(summary, indent=2, default=str))
    return out
