"""Answers a person reads: the model's box grammar becomes "Found 8 buildings (numbered 1-8 on
the map)." and references like "#3" that match the numbers on the map, the chip and the table.

The model's raw output is never lost: the app shows it in the "exact prompt" panel and the API
returns it next to the readable text.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

# What is left of a box the model is still writing (streaming) or never finished.
_OPEN_MARKUP = re.compile(r"<(?:ref|box)>.*$|<[^>]*$|\{<[^}]*$", re.S)
_STRAY_TAGS = re.compile(r"</?(?:ref|box|quad|point)>")
# Separators between boxes of one list: "a, b and c", "a; b", bullets.
_JOINERS = re.compile(r"^[\s,;:.\-*•]*(?:and|&)?[\s,;:.\-*•]*$", re.I)
# Prose that only announces the list that follows ("I found 3 building(s):", "Here they are:").
_ANNOUNCES = re.compile(r"^\s*(?:i\s+)?(?:found|there\s+(?:are|is)|here\s+(?:are|is)|detected|"
                        r"located|these\s+are)\b[^.!?]*[:.]?\s*$", re.I)


def plural(label: str, n: int) -> str:
    """``building``, 3 -> ``buildings``; labels already plural or uncountable stay."""
    label = (label or "object").strip() or "object"
    if n == 1 or label.endswith("s"):
        return label
    if label.endswith("y") and label[-2:-1] not in "aeiou":
        return label[:-1] + "ies"
    if label.endswith(("ch", "sh", "x")):
        return label + "es"
    return label + "s"


def count_phrase(labels: Sequence[str]) -> str:
    """``["building"] * 8`` -> ``8 buildings``; mixed labels -> ``3 buildings and 2 pools``."""
    counts = Counter((lb or "object").strip().lower() or "object" for lb in labels)
    parts = [f"{n} {plural(lb, n)}" for lb, n in counts.most_common()]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def number_range(numbers: Sequence[int]) -> str:
    """``[4, 5, 6]`` -> ``4–6``; ``[2]`` -> ``2``; gaps -> ``1, 3, 5``."""
    nums = list(numbers)
    if not nums:
        return ""
    if len(nums) == 1:
        return str(nums[0])
    if nums == list(range(nums[0], nums[0] + len(nums))):
        return f"{nums[0]}–{nums[-1]}"
    return ", ".join(str(n) for n in nums)


def streaming_text(text: str) -> str:
    """A partial answer for the chat while it streams: finished boxes become ``[box n]``
    placeholders, an unfinished one is hidden, and a count says how many have arrived."""
    from rsvlm.boxes import parse_boxes

    boxes = parse_boxes(text)
    pieces, last = [], 0
    for box in boxes:
        pieces.append(text[last:box.span[0]])
        last = box.span[1]
    tail = _OPEN_MARKUP.sub("", text[last:])
    prose = _STRAY_TAGS.sub("", "".join(pieces) + tail).strip()
    if not boxes:
        return prose or "…"
    arrived = f"{len(boxes)} box{'es' if len(boxes) != 1 else ''} so far…"
    return f"{prose} ({arrived})" if prose and not _JOINERS.match(prose) else arrived


def readable_answer(text: str, labels: Sequence[str], numbers: Sequence[int], *,
                    where: str = "on the map", asks_for_all: bool = False) -> str:
    """The model's answer ``text`` with its boxes (``labels[i]`` numbered ``numbers[i]``, in the
    order of the text) turned into words.

    Several boxes, or a question for every instance, read "Found 8 buildings (numbered 1–8 on the
    map)." followed by any prose that says more than the count. One box in a sentence becomes
    "#n" in place ("The largest building is #3 (on the map)."). Without boxes the text is the
    model's, less any unfinished markup.
    """
    from rsvlm.boxes import parse_boxes

    parsed = parse_boxes(text)
    if not labels:
        return _STRAY_TAGS.sub("", _OPEN_MARKUP.sub("", text)).strip() or text.strip()
    pieces, last = [], 0
    refs = [f"#{n}" for n in numbers]
    for i, box in enumerate(parsed):
        pieces.append(text[last:box.span[0]])
        pieces.append(f"\0{i}\0")
        last = box.span[1]
    pieces.append(_OPEN_MARKUP.sub("", text[last:]))
    prose = _STRAY_TAGS.sub("", "".join(pieces))
    without = re.sub(r"\0\d+\0", " ", prose)
    only_list = _JOINERS.match(without) or _ANNOUNCES.match(without)
    if len(labels) > 1 or asks_for_all or only_list or len(parsed) != len(labels):
        summary = (f"Found {count_phrase(labels)} (numbered {number_range(numbers)} {where}).")
        extra = "" if only_list else re.sub(r"\s+", " ", without).strip()
        # Prose that counts differently from the boxes (a small LM's count) is dropped: the
        # numbered boxes are what the analyst can check.
        if extra and not re.search(r"\d", extra):
            return f"{summary} {extra}"
        return summary
    out = re.sub(r"[ \t]+", " ", re.sub(r"\0(\d+)\0", lambda m: refs[int(m.group(1))], prose))
    return f"{out.strip().rstrip('.')} (numbered {where})."
