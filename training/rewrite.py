"""Optional caption rewriting with a local causal LM (LHRS-Align used Vicuna-13B for this).

The template captions are already correct; the LLM only adds linguistic variety. Its output is
rejected when it drops a number of the template (LLMs like to "round" counts), so the facts of a
caption survive the paraphrase.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROMPT = (
    "Rewrite this description of an aerial image in fluent English. Keep every number and every "
    "object; add nothing that is not stated.\n\nDescription: {caption}\n\nRewritten:"
)


def keeps_numbers(original: str, rewritten: str) -> bool:
    """True when every number of the original still appears in the rewrite."""
    nums = re.findall(r"\d+(?:\.\d+)?", original)
    return all(n in rewritten for n in nums)


class LLMRewriter:
    """`rewrite(caption, facts) -> str` backed by a local transformers causal LM (greedy)."""

    def __init__(self, model_dir: str | Path, max_new_tokens: int = 160,
                 device: str | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(model_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"rewrite model folder not found: {path}")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model: Any = AutoModelForCausalLM.from_pretrained(path)
        if device:
            self.model.to(device)
        self.model.eval()
        self.max_new_tokens = max_new_tokens

    def __call__(self, caption: str, facts: dict) -> str:
        import torch

        text = PROMPT.format(caption=caption)
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        enc = self.tokenizer(text, return_tensors="pt").to(self.model.device)
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = self.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        new = new.strip().split("\n\n")[0].strip()
        if not new or not keeps_numbers(caption, new):
            log.debug("rewrite rejected for %s", facts.get("chip_id"))
            return caption
        return new
