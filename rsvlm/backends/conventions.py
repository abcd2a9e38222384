"""Each pretrained family's box convention, turned into the canonical 0-1000 chip boxes.

The canonical boxes (`rsvlm.boxes`) are ``(x1, y1, x2, y2)`` floats in 0-1000 of the chip, with
an optional angle (degrees, clockwise on screen) for oriented boxes. What the families write:

* **Qwen2.5-VL**: ``{"bbox_2d": [x1, y1, x2, y2], "label": ...}`` in *pixels of the image the
  model saw*, i.e. after the processor's ``smart_resize`` (sides rounded to multiples of
  ``patch_size * merge_size``, area kept inside ``min_pixels``/``max_pixels``). The chip's own
  size is the wrong frame: a 500 x 300 chip is seen as 504 x 308.
* **Qwen3-VL**: the same JSON, on a relative 0-1000 grid of the image.
* **Florence-2** (and the Falcon remote-sensing fine-tunes): location tokens ``<loc_N>``,
  ``N`` a bin 0-999 of the image side (the bin's centre ``(N + 0.5) / 1000`` is the coordinate,
  as in `Florence2PostProcessor.dequantize`); 4 tokens make a box, 8 a quadrilateral
  (an oriented box).
* **GeoChat** (LLaVA-1.5 layout): ``{<x1><y1><x2><y2>|<θ>}`` on a 0-100 grid with the angle in
  degrees.

Coordinates outside the image are clipped to it; boxes of zero area are dropped (and logged),
and a text whose boxes do not parse stays as text.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence

from rsvlm.boxes import SCALE, ParsedBox, format_box, parse_boxes

logger = logging.getLogger(__name__)

FLORENCE_BINS = 1000
FLORENCE = "florence2_loc"
FLORENCE_QUAD = "florence2_quad"

# A label (any text without markup), then 4 or 8 location tokens. Falcon writes the same bins
# as ``<box><855><297><891><355></box>`` / ``<quad>...</quad>``; both spellings are read.
_LOC = r"<(?:loc_)?(\d{1,4})>"
_FLORENCE_RE = re.compile(
    rf"(?P<label>[^<>]{{0,200}}?)\s*(?:<(?P<wrap>box|quad|poly)>)?\s*"
    rf"(?P<locs>(?:{_LOC}\s*){{4}}(?:(?:{_LOC}\s*){{4}})?)\s*(?:</(?:box|quad|poly)>)?"
)
_LOC_RE = re.compile(_LOC)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int
                 ) -> tuple[int, int]:
    """``(height, width)`` the Qwen-VL image processors resize to (transformers' own function)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as _resize

    return _resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


def qwen_resized_size(image_grid_thw: Sequence[int], patch_size: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of the image a Qwen-VL model saw, from the processor's
    ``image_grid_thw`` row ``(t, h, w)`` (patches): the actual resize, not a guess."""
    _, grid_h, grid_w = (int(v) for v in image_grid_thw)
    return grid_w * int(patch_size), grid_h * int(patch_size)


def qwen25_boxes(text: str, resized_size: tuple[float, float]) -> list[ParsedBox]:
    """Qwen2.5-VL boxes (pixels of the resized image) as canonical boxes of the chip.

    The resized image covers the whole chip, so pixel / resized side is the chip fraction."""
    return parse_boxes(text, image_size=resized_size)


def qwen3_boxes(text: str) -> list[ParsedBox]:
    """Qwen3-VL boxes (JSON ``bbox_2d`` on the 0-1000 grid) as canonical boxes."""
    return parse_boxes(text, image_size=(SCALE, SCALE))


def geochat_boxes(text: str) -> list[ParsedBox]:
    """GeoChat's ``{<x1><y1><x2><y2>|<θ>}`` (0-100 grid, angle in degrees)."""
    return [b for b in parse_boxes(text) if b.format == "geochat"]


def florence_bin_to_norm(value: float) -> float:
    """A Florence-2 location bin (0-999) -> the canonical 0-1000 coordinate of its centre."""
    clipped = min(max(float(value), 0.0), FLORENCE_BINS - 1)
    return (clipped + 0.5) * SCALE / FLORENCE_BINS


def quad_to_obb(points_px: Sequence[tuple[float, float]]) -> tuple[float, float, float, float, float]:
    """Four corners in pixels (in drawing order) -> ``(cx, cy, w, h, angle_deg)``.

    The angle is that of the first edge (clockwise on screen, pixel y down), ``w`` its length
    and ``h`` the mean length of the edges next to it; the centre is the corners' mean. This is
    the inverse of `rsvlm.boxes.ParsedBox.corners_px` for a rectangle, and a fair rectangle for
    a slightly skewed quadrilateral. It works in pixels: on a non-square image an angle on the
    normalised grid would be wrong."""
    (x0, y0), (x1, y1), (x2, y2), (x3, y3) = points_px
    cx, cy = (x0 + x1 + x2 + x3) / 4, (y0 + y1 + y2 + y3) / 4
    w = (math.hypot(x1 - x0, y1 - y0) + math.hypot(x2 - x3, y2 - y3)) / 2
    h = (math.hypot(x2 - x1, y2 - y1) + math.hypot(x3 - x0, y3 - y0)) / 2
    angle = math.degrees(math.atan2(y1 - y0, x1 - x0))
    if angle > 90:  # the same rectangle, described from the opposite edge
        angle -= 180
    elif angle <= -90:
        angle += 180
    return cx, cy, w, h, angle


def florence_boxes(text: str, image_size: tuple[float, float]) -> list[ParsedBox]:
    """Florence-2 / Falcon location tokens -> canonical boxes (quads become oriented boxes).

    ``image_size`` = the chip's ``(width, height)``: a quad's angle is measured in pixels."""
    width, height = (float(v) for v in image_size)
    found: list[ParsedBox] = []
    last_label: str | None = None
    for match in _FLORENCE_RE.finditer(text or ""):
        bins = [int(v) for v in _LOC_RE.findall(match.group("locs"))]
        label = " ".join((match.group("label") or "").split()) or None
        label = label or last_label  # "<loc..><loc..>" right after a labelled box: same object kind
        last_label = label
        if len(bins) == 4:
            x1, y1, x2, y2 = (florence_bin_to_norm(v) for v in bins)
            x1, x2 = sorted((x1, x2))
            y1, y2 = sorted((y1, y2))
            if x2 - x1 <= 0 or y2 - y1 <= 0:
                logger.info("dropping a Florence-2 box of zero area: %s", match.group(0))
                continue
            found.append(ParsedBox(label, (x1, y1, x2, y2), None, match.span(), FLORENCE))
            continue
        pts = [(florence_bin_to_norm(bins[i]) * width / SCALE,
                florence_bin_to_norm(bins[i + 1]) * height / SCALE) for i in range(0, 8, 2)]
        cx, cy, w, h, angle = quad_to_obb(pts)
        if w <= 0 or h <= 0:
            logger.info("dropping a Florence-2 quad of zero area: %s", match.group(0))
            continue
        box = ((cx - w / 2) * SCALE / width, (cy - h / 2) * SCALE / height,
               (cx + w / 2) * SCALE / width, (cy + h / 2) * SCALE / height)
        found.append(ParsedBox(label, box, angle, match.span(), FLORENCE_QUAD))
    return found


_CANON = r"(?:<ref>[^<>]*</ref>)?<box>\[[^\]]*\]</box>"
# A JSON list (fenced or not) that held nothing but boxes: after rewriting, only its boxes stay.
_BOX_LIST = re.compile(rf"(?:```(?:json)?\s*)?\[\s*({_CANON}(?:\s*,\s*{_CANON})*)\s*\](?:\s*```)?")


def to_canonical_text(text: str, boxes: Sequence[ParsedBox]) -> str:
    """``text`` with each parsed box written in the canonical grammar (the rest unchanged; a
    JSON list of boxes, fenced or not, becomes the boxes one after the other)."""
    out = _rewrite(text, boxes)
    return _BOX_LIST.sub(lambda m: re.sub(r"\s*,\s*(?=<)", " ", m.group(1)), out)


def _rewrite(text: str, boxes: Sequence[ParsedBox]) -> str:
    pieces, last = [], 0
    for box in sorted(boxes, key=lambda b: b.span):
        start, end = box.span
        if start < last:
            continue
        pieces.append(text[last:start])
        lead = len(text[start:end]) - len(text[start:end].lstrip())
        pieces.append(text[start:start + lead] + format_box(box.label, box.box_norm, box.angle))
        last = end
    pieces.append(text[last:])
    return "".join(pieces)


__all__ = [
    "FLORENCE",
    "FLORENCE_BINS",
    "FLORENCE_QUAD",
    "florence_bin_to_norm",
    "florence_boxes",
    "geochat_boxes",
    "quad_to_obb",
    "qwen25_boxes",
    "qwen3_boxes",
    "qwen_resized_size",
    "smart_resize",
    "to_canonical_text",
]


# ----------------------------------------------------------------------------------------------
# Canonical -> family (training data in each family's own box format)
# ----------------------------------------------------------------------------------------------


def _qwen_json(items: list[tuple[str | None, tuple[float, ...]]]) -> str:
    import json

    records = []
    for label, box in items:
        record: dict[str, object] = {"bbox_2d": [int(round(v)) for v in box]}
        if label:
            record["label"] = label
        records.append(record)
    return "```json\n" + json.dumps(records) + "\n```"


def canonical_to_family(text: str, family: str, *, resized: tuple[int, int] | None = None) -> str:
    """``text`` with its canonical boxes written as ``family`` writes them (for training data).

    Consecutive boxes become one JSON list for the Qwen families (pixels of ``resized``, the
    processor's resized ``(w, h)``, for Qwen2.5-VL; 0-1000 for Qwen3-VL); Florence-2 gets
    ``label<loc_x1><loc_y1><loc_x2><loc_y2>`` (bins 0-999); LLaVA/GeoChat ``{<x1><y1><x2><y2>|<θ>}``
    on 0-100."""
    boxes = [b for b in parse_boxes(text) if b.format == "canonical"]
    if not boxes:
        return text
    groups: list[list[ParsedBox]] = []
    for box in boxes:
        gap = text[groups[-1][-1].span[1]:box.span[0]] if groups else None
        if groups and gap is not None and not gap.strip(" ,;and"):
            groups[-1].append(box)
        else:
            groups.append([box])
    pieces, last = [], 0
    for group in groups:
        pieces.append(text[last:group[0].span[0]])
        pieces.append(_family_boxes(group, family, resized))
        last = group[-1].span[1]
    pieces.append(text[last:])
    return "".join(pieces)


def _family_boxes(group: list[ParsedBox], family: str, resized: tuple[int, int] | None) -> str:
    if family == "qwen2_5_vl":
        if resized is None:
            raise ValueError("Qwen2.5-VL boxes need the resized image size")
        w, h = resized
        return _qwen_json([(b.label, (b.box_norm[0] * w / SCALE, b.box_norm[1] * h / SCALE,
                                      b.box_norm[2] * w / SCALE, b.box_norm[3] * h / SCALE))
                           for b in group])
    if family == "qwen3_vl":
        return _qwen_json([(b.label, b.box_norm) for b in group])
    if family == "florence2":
        out = []
        for b in group:
            bins = [min(max(int(v * FLORENCE_BINS / SCALE), 0), FLORENCE_BINS - 1)
                    for v in b.box_norm]
            out.append((b.label or "") + "".join(f"<loc_{v}>" for v in bins))
        return "".join(out)
    if family == "llava":
        out = []
        for b in group:
            x1, y1, x2, y2 = (int(round(v / 10)) for v in b.box_norm)
            out.append(f"{b.label + ' ' if b.label else ''}{{<{x1}><{y1}><{x2}><{y2}>|"
                       f"<{int(round(b.angle or 0))}>}}")
        return " ".join(out)
    raise ValueError(f"no box format for family {family!r}")
