"""Instruction data for the language-model stages: JSONL conversations -> padded tensors.

Prompts are rendered with `rsvlm.prompting` (the chat engine's own format), so the model is
trained on exactly what it sees when an analyst asks. Only the answer tokens carry labels.
Images enter as feature-cache row indices (see `training.features`) or as pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training.samples import IMAGE_TOKEN

log = logging.getLogger(__name__)
IGNORE = -100


@dataclass(frozen=True)
class Example:
    id: str
    image: str  # relative to the dataset folder
    question: str  # user text without the image token
    answer: str
    task: str


def read_examples(data_dir: str | Path, split: str, tasks: Sequence[str] | None) -> list[Example]:
    from training.dataset_files import read_split

    out = []
    for r in read_split(Path(data_dir), split):
        if tasks and r["task"] not in tasks:
            continue
        conv = r["conversations"]
        question = conv[0]["value"].replace(f"{IMAGE_TOKEN}\n", "", 1).replace(IMAGE_TOKEN, "")
        out.append(Example(r["id"], r["image"], question.strip(), conv[1]["value"], r["task"]))
    return out


class LMCollator:
    """Examples -> input_ids, attention_mask, labels, pixel_values (rows or pixels), query and
    semantic token ids.

    Args:
        processor: `RSVLMProcessor` (tokenizer, chat template, image token expansion).
        max_length: longer sequences are cut from the end of the answer; an example whose prompt
            alone is longer is an error (raise the limit).
        rows: image -> feature-cache row (pixels are computed when None).
        image_root: the dataset folder (for pixels).
        semantic: image -> retrieved descriptions (the semantic prompter's input), optional.
    """

    def __init__(self, processor: Any, max_length: int = 1024, *,
                 rows: dict[str, int] | None = None, image_root: Path | None = None,
                 semantic: dict[str, list[str]] | None = None) -> None:
        from rsvlm import prompting

        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_length = max_length
        self.rows = rows
        self.image_root = image_root
        self.semantic = semantic
        self._prompting = prompting

    def _encode(self, text: str) -> list[int]:
        expanded = self.processor.expand_image_tokens(text)
        return self.tokenizer(expanded, add_special_tokens=False)["input_ids"]

    def encode_example(self, ex: Example) -> tuple[list[int], list[int]]:
        msgs = self._prompting.build_messages([(ex.question, None)],
                                              image_token=self.processor.image_token)
        prefix = self._encode(self.processor.build_prompt(msgs, add_generation_prompt=True))
        full_msgs = self._prompting.build_messages([(ex.question, ex.answer)],
                                                   image_token=self.processor.image_token)
        full = self._encode(self.processor.build_prompt(full_msgs, add_generation_prompt=False))
        if full[:len(prefix)] != prefix:
            # A template whose tokens merge across the prompt/answer border: label the answer by
            # encoding it alone and taking that many tokens from the end of the turn.
            n_answer = len(self.tokenizer(ex.answer, add_special_tokens=False)["input_ids"])
            n_prefix = max(len(full) - n_answer - 2, 0)
        else:
            n_prefix = len(prefix)
        if n_prefix >= self.max_length:
            raise ValueError(f"example {ex.id}: the prompt has {n_prefix} tokens, more than "
                             f"max_length={self.max_length}")
        ids = full[:self.max_length]
        labels = [IGNORE] * n_prefix + ids[n_prefix:]
        return ids, labels[:len(ids)]

    def _plain(self, texts: list[str], max_len: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        image_id = self.processor.image_token_id
        for t in texts:
            ids = self.tokenizer(t, add_special_tokens=False)["input_ids"] if t else []
            ids = [i for i in ids if i != image_id]
            rows.append(ids[:max_len] if max_len else ids)
        width = max(max((len(r) for r in rows), default=0), 1)
        pad = self.tokenizer.pad_token_id or 0
        out = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                out[i, :len(r)] = torch.tensor(r)
                mask[i, :len(r)] = 1
        return out, mask

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        encoded = [self.encode_example(ex) for ex in examples]
        width = max(len(ids) for ids, _ in encoded)
        pad = self.tokenizer.pad_token_id
        pad = 0 if pad is None else pad
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        attention = torch.zeros((len(encoded), width), dtype=torch.long)
        labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
        for i, (ids, lab) in enumerate(encoded):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            attention[i, :len(ids)] = 1
            labels[i, :len(lab)] = torch.tensor(lab)
        batch: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention,
                                          "labels": labels}
        batch["pixel_values"] = self._images(examples)
        q_ids, q_mask = self._plain([ex.question for ex in examples], None)
        batch["query_input_ids"], batch["query_attention_mask"] = q_ids, q_mask
        if self.semantic is not None:
            texts = ["\n".join(self.semantic.get(ex.image, [])) for ex in examples]
            s_ids, s_mask = self._plain(texts, self.processor.max_semantic_tokens)
            batch["semantic_input_ids"], batch["semantic_attention_mask"] = s_ids, s_mask
        return batch

    def _images(self, examples: list[Example]) -> torch.Tensor:
        if self.rows is not None:
            return torch.tensor([self.rows[ex.image] for ex in examples], dtype=torch.long)
        from PIL import Image

        if self.image_root is None:
            raise ValueError("LMCollator needs image_root to read pixels")
        images = []
        for ex in examples:
            with Image.open(self.image_root / ex.image) as im:
                images.append(im.convert("RGB"))
        return self.processor.image_processor(images, return_tensors="pt")["pixel_values"]


class EpochSampler(torch.utils.data.Sampler[int]):
    """A permutation that depends only on (seed, epoch), so a resumed run sees the same order.

    The epoch is set with `use_epoch`, deliberately not `set_epoch`: accelerate's data loaders
    call `set_epoch` with their own iteration counter, which restarts at 0 in the loader that
    `skip_first_batches` makes.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.seed = seed
        self.epoch = 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n
