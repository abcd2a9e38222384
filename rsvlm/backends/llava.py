"""LLaVA-1.5-format checkpoints (`LlavaForConditionalGeneration`), e.g. a converted GeoChat.

The conversation goes through the checkpoint's chat template. GeoChat's own conventions (its
model card and demo): task tags ``[refer]`` (where is ...), ``[identify]`` (what is in this
region) and boxes ``{<x1><y1><x2><y2>|<θ>}`` on a 0-100 grid with the angle in degrees, read by
`rsvlm.backends.conventions.geochat_boxes`. Plain LLaVA answers with canonical or bare boxes are
read too. Follow-up questions reuse the KV cache (LLaVA's positions are plain 1-D).
"""

from __future__ import annotations

import re
from typing import Any

from rsvlm.backends import conventions
from rsvlm.backends.base import Family
from rsvlm.boxes import ParsedBox, parse_boxes

_ASKS_WHERE = re.compile(r"\b(?:find|locate|detect|where|count|how many|outline|mark)\b", re.I)
_TAG = re.compile(r"^\s*\[(?:refer|identify|grounding)\]", re.I)


class Llava(Family):
    name = "llava"
    model_types = ("llava",)
    model_class = "LlavaForConditionalGeneration"
    skip_modules = (r"(?:model\.)?vision_tower", r"(?:model\.)?multi_modal_projector", "lm_head")

    def region_text(self, processor: Any, box_norm: tuple[float, ...],
                    image_size: tuple[int, int]) -> str:
        x1, y1, x2, y2 = (round(v / 10) for v in box_norm)
        return f"{{<{x1}><{y1}><{x2}><{y2}>|<0>}}"

    def user_text(self, question: str, region: str | None) -> str:
        q = question.strip()
        if _TAG.match(q):
            return q
        if region:
            return f"[identify] {q} {region}"
        if _ASKS_WHERE.search(q):
            return f"[refer] {q}"
        return q

    def boxes(self, text: str, frame: dict[str, Any], chip_size: tuple[int, int]) -> list[ParsedBox]:
        geochat = conventions.geochat_boxes(text)
        return geochat or parse_boxes(text)
