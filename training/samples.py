"""Shared pieces of the task generators: the sample record, positions, boxes, numbers."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any

IMAGE_TOKEN = "<image>"

_POSITIONS = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)


@dataclass
class Sample:
    """One single-turn instruction: question (without the image token) and answer."""

    task: str  # caption | vqa | grounding | region | classification
    question: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)

    def conversation(self) -> list[dict[str, str]]:
        return [
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{self.question}"},
            {"from": "gpt", "value": self.answer},
        ]


def rng_for(seed: int, *parts: object) -> random.Random:
    """A random generator that depends only on the seed and the parts (chip id, task).

    Per-chip generators make the output independent of processing order.
    """
    key = ":".join(str(p) for p in (seed, *parts))
    return random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))


def position_name(x: float, y: float, width: float, height: float) -> str:
    """The 3 x 3 cell of a point: 'top left', 'center', 'bottom'..."""
    col = min(max(int(3 * x / max(width, 1e-9)), 0), 2)
    row = min(max(int(3 * y / max(height, 1e-9)), 0), 2)
    return _POSITIONS[row][col]


def position_phrase(name: str) -> str:
    """'in the top left', 'at the top', 'on the left', 'in the center'."""
    if name in {"top", "bottom"}:
        return f"at the {name}"
    if name in {"left", "right"}:
        return f"on the {name}"
    return f"in the {name}"


def format_box(label: str, box: tuple[float, float, float, float], width: int, height: int) -> str:
    """Canonical `<ref>label</ref><box>[x1,y1,x2,y2]</box>` (rsvlm.boxes) of a pixel box."""
    from rsvlm.boxes import format_box as _format
    from rsvlm.boxes import pixels_to_norm

    return _format(label, pixels_to_norm(box, width, height))


def with_region(question: str, box: tuple[float, float, float, float], width: int,
                height: int) -> str:
    """A question about a box given as input, worded exactly as the chat engine words it."""
    from rsvlm.boxes import format_region_box
    from rsvlm.prompting import region_prefix

    return region_prefix(format_region_box(box, width, height)) + question


def area_phrase(m2: float) -> str:
    """'about 120 m²', rounded to two significant figures so text stays readable."""
    if m2 >= 10000:
        return f"about {m2 / 10000:.1f} ha"
    if m2 < 10:
        return f"about {m2:.0f} m²"
    digits = len(str(int(m2))) - 2
    return f"about {int(round(m2, -digits))} m²"


def length_phrase(m: float) -> str:
    if m >= 1000:
        return f"about {m / 1000:.1f} km"
    if m < 10:
        return f"about {m:.0f} m"
    return f"about {int(round(m, -1))} m"


def size_word(area_m2: float) -> str:
    """Rough size class of a building-scale object."""
    if area_m2 < 60:
        return "small"
    if area_m2 < 250:
        return "medium-sized"
    if area_m2 < 1000:
        return "large"
    return "very large"
