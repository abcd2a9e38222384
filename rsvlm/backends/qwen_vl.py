"""Qwen2.5-VL and Qwen3-VL (`Qwen2_5_VLForConditionalGeneration`, `Qwen3VLForConditionalGeneration`).

Prompts go through the checkpoint's own chat template (``processor.apply_chat_template``). For
a question that asks where things are, the grounding request of the families' cookbooks is
appended ("... output the bbox coordinates in JSON format"), since that is how these models were
taught to write boxes: Qwen2.5-VL in pixels of the resized image it saw, Qwen3-VL on a 0-1000
grid (`rsvlm.backends.conventions`).

The pixel budget is pinned (``min_pixels``/``max_pixels``), so a chip is always resized the same
way and boxes stay comparable between runs and machines. Follow-up questions reuse the KV cache:
the multimodal RoPE offsets (``rope_deltas``) that the model keeps on itself between generate
calls are saved per conversation and restored before its next turn.
"""

from __future__ import annotations

import re
from typing import Any

from rsvlm.backends import conventions
from rsvlm.backends.base import Family
from rsvlm.boxes import SCALE, ParsedBox

# The pixel budget of the Qwen cookbooks' examples (256..1280 tokens of 28 x 28 pixels).
MIN_PIXELS = 256 * 28 * 28
MAX_PIXELS = 1280 * 28 * 28

_ASKS_WHERE = re.compile(
    r"\b(?:find|locate|detect|where|count|how many|outline|mark|box|boxes|bbox|ground)\b", re.I)


class _QwenVL(Family):
    skip_modules = (r"(?:model\.)?visual", "lm_head")
    grounding_request = ""

    def processor_kwargs(self) -> dict[str, Any]:
        return {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}

    def load_processor(self, location: str, *, revision: str | None = None) -> Any:
        processor = super().load_processor(location, revision=revision)
        # The pin must hold whichever loading path ran (AutoProcessor may not pass the budget on).
        ip = processor.image_processor
        size = ip.size
        current = (getattr(size, "shortest_edge", None), getattr(size, "longest_edge", None))
        if current != (MIN_PIXELS, MAX_PIXELS):
            from transformers.image_utils import SizeDict

            ip.size = SizeDict(shortest_edge=MIN_PIXELS, longest_edge=MAX_PIXELS)
        return processor

    def after_load(self, model: Any, processor: Any) -> None:
        # Stop at the end of the assistant turn even where generation_config lacks it.
        end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else list(eos) if isinstance(eos, list | tuple) else [eos]
        if isinstance(end, int) and end >= 0 and end not in eos:
            model.generation_config.eos_token_id = [*eos, end]

    def user_text(self, question: str, region: str | None) -> str:
        text = super().user_text(question, region)
        if _ASKS_WHERE.search(question) and self.grounding_request:
            text = f"{text} {self.grounding_request}"
        return text

    def frame(self, processor: Any, inputs: Any, image: Any, index: int = 0) -> dict[str, Any]:
        grid = inputs["image_grid_thw"][index].tolist()
        patch = int(processor.image_processor.patch_size)
        return {"grid_thw": grid, "resized": conventions.qwen_resized_size(grid, patch)}

    def save_state(self, model: Any) -> Any:
        inner = getattr(model, "model", model)
        deltas = getattr(inner, "rope_deltas", None)
        return None if deltas is None else deltas.clone()

    def restore_state(self, model: Any, state: Any) -> None:
        inner = getattr(model, "model", model)
        if hasattr(inner, "rope_deltas"):
            inner.rope_deltas = state


class Qwen25VL(_QwenVL):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    model_class = "Qwen2_5_VLForConditionalGeneration"
    grounding_request = "Output the bbox coordinates in JSON format."

    def region_text(self, processor: Any, box_norm: tuple[float, ...], image_size: tuple[int, int]
                    ) -> str:
        """The drawn region as Qwen2.5-VL reads boxes: pixels of the resized image."""
        ip = processor.image_processor
        factor = int(ip.patch_size) * int(ip.merge_size)
        h, w = conventions.smart_resize(image_size[1], image_size[0], factor,
                                        ip.size["shortest_edge"], ip.size["longest_edge"])
        x1, y1, x2, y2 = (round(v * s / SCALE) for v, s in zip(box_norm, (w, h, w, h), strict=True))
        return f'{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}]}}'

    def boxes(self, text: str, frame: dict[str, Any], chip_size: tuple[int, int]) -> list[ParsedBox]:
        return conventions.qwen25_boxes(text, frame["resized"])


class Qwen3VL(_QwenVL):
    name = "qwen3_vl"
    model_types = ("qwen3_vl",)
    model_class = "Qwen3VLForConditionalGeneration"
    grounding_request = "Report bbox coordinates in JSON format."

    def region_text(self, processor: Any, box_norm: tuple[float, ...], image_size: tuple[int, int]
                    ) -> str:
        x1, y1, x2, y2 = (round(v) for v in box_norm)
        return f'{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}]}}'

    def boxes(self, text: str, frame: dict[str, Any], chip_size: tuple[int, int]) -> list[ParsedBox]:
        return conventions.qwen3_boxes(text)
