"""The box grammar: how boxes are written in model output and training data, and read back.

Canonical form (what our models are trained to write)::

    <ref>building</ref><box>[x1,y1,x2,y2]</box>          axis-aligned box
    <ref>ship</ref><box>[x1,y1,x2,y2,angle]</box>        oriented box
    <box>[x1,y1,x2,y2]</box>                             a box without a label

* ``x1,y1,x2,y2`` are integers 0-1000 of the chip's width (x) and height (y), origin at the
  top-left corner, ``x1 < x2`` and ``y1 < y2``. 1000 is the right/bottom edge.
* Oriented boxes: ``x1,y1,x2,y2`` are the axis-aligned box of the *unrotated* rectangle, centred
  at the object's centre, i.e. centre ``((x1+x2)/2, (y1+y2)/2)`` and side lengths ``x2-x1`` (the
  side that starts horizontal) and ``y2-y1``. The object is that rectangle turned by ``angle``
  degrees clockwise on screen (pixel y points down) about its centre, in *pixel* space (so a
  non-square chip does not shear it): see :meth:`ParsedBox.to_obb_pixels` and
  ``tiles.geometry.obb_corners``, which use the same convention. Angles are integers in
  (-180, 180].
* Several boxes after one ``<ref>`` (``<ref>cars</ref><box>[..]</box><box>[..]</box>``) all
  carry that label.

:func:`parse_boxes` also reads the formats of peer models, so their checkpoints and datasets can
be used: GeoChat ``{<x1><y1><x2><y2>|θ}`` (0-100, θ in degrees), LHRS-Bot ``[x1, y1, x2, y2]``
(floats 0-1), Qwen-VL ``<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)
<|box_end|>`` and ``<ref>label</ref><box>(x1,y1),(x2,y2)</box>`` (0-1000), Qwen2.5-VL JSON
``{"bbox_2d": [x1, y1, x2, y2], "label": ...}`` (absolute pixels: needs the image size) and a bare
integer list ``[x1, y1, x2, y2]`` in 0-1000. It never raises: malformed boxes are skipped,
coordinates are clamped and ordered, and zero-area boxes are dropped.

Evaluation uses :func:`box_iou` in pixels. It is the plain ratio of areas, *without* the ``+1``
pixel term of old detection code: applied to 0-1 coordinates (as LHRS-Bot's published grounding
numbers were), ``+1`` inflates every box to more than the whole image and nearly every prediction
passes IoU 0.5.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

SCALE = 1000  # canonical coordinates are integers 0..SCALE of the chip

# Format names recorded on ParsedBox.format
CANONICAL = "canonical"
QWEN_VL = "qwen_vl"
GEOCHAT = "geochat"
QWEN25_JSON = "qwen2.5_vl_json"
LHRS_BOT = "lhrs_bot"
PLAIN_1000 = "plain_1000"

# Bounded quantifiers everywhere: parse_boxes runs on untrusted model output, and a pattern with
# unbounded lazy groups can go quadratic on text full of unclosed tags.
_NUM = r"[-+]?(?:\d{1,12}(?:\.\d{0,12})?|\.\d{1,12})"
_S = r"\s{0,8}"
_SEP = rf"{_S},{_S}"
_LABEL = r"(?P<label>[^<>\n]{0,200}?)"
_PAIR = rf"\({_S}({_NUM}){_SEP}({_NUM}){_S}\)"

_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    (
        CANONICAL,
        re.compile(
            rf"(?:<ref>{_LABEL}</ref>{_S})?<box>{_S}\[{_S}"
            rf"(?P<nums>{_NUM}(?:{_SEP}{_NUM}){{3,4}}){_S}\]{_S}</box>"
        ),
    ),
    (
        QWEN_VL,
        re.compile(
            rf"(?:(?:<\|object_ref_start\|>|<ref>){_LABEL}(?:<\|object_ref_end\|>|</ref>){_S})?"
            rf"(?:<\|box_start\|>|<box>){_S}{_PAIR}{_S},?{_S}{_PAIR}{_S}(?:<\|box_end\|>|</box>)"
        ),
    ),
    (
        GEOCHAT,
        re.compile(
            rf"\{{{_S}<({_NUM})>{_S}<({_NUM})>{_S}<({_NUM})>{_S}<({_NUM})>{_S}"
            rf"(?:\|{_S}<?{_S}({_NUM}){_S}>?{_S})?\}}"
        ),
    ),
    (QWEN25_JSON, re.compile(r"\{[^{}]{0,400}?[\"']bbox_2d[\"'][^{}]{0,400}\}")),
    (
        LHRS_BOT,  # also PLAIN_1000, decided by the values
        re.compile(rf"\[{_S}({_NUM}){_SEP}({_NUM}){_SEP}({_NUM}){_SEP}({_NUM}){_S}\]"),
    ),
]
_NUM_RE = re.compile(_NUM)
_JSON_LABEL_RE = re.compile(r"[\"']label[\"']\s{0,8}:\s{0,8}[\"']([^\"'\n]{0,200})[\"']")
_JSON_BOX_RE = re.compile(rf"[\"']bbox_2d[\"']{_S}:{_S}\[{_S}({_NUM}(?:{_SEP}{_NUM}){{3}}){_S}\]")
# Grammars with a <ref> that may cover several following boxes, and what may sit between them.
_REF_FORMATS = (CANONICAL, QWEN_VL)
_SAME_LABEL_GAP = re.compile(r"^[\s,;]*(?:and)?[\s,;]*$", re.IGNORECASE)


@dataclass(frozen=True)
class ParsedBox:
    """A box found in text.

    ``box_norm`` is ``(x1, y1, x2, y2)`` as floats in 0-1000 of the image, ordered and clamped;
    ``angle`` (degrees, clockwise on screen) is set for oriented boxes, in which case ``box_norm``
    is the unrotated rectangle around the same centre. ``span`` is ``(start, end)`` of the match
    in the text and ``format`` names the grammar that matched.
    """

    label: str | None
    box_norm: tuple[float, float, float, float]
    angle: float | None = None
    span: tuple[int, int] = (0, 0)
    format: str = CANONICAL

    def to_pixels(self, width: float, height: float) -> tuple[float, float, float, float]:
        """``(x1, y1, x2, y2)`` in pixels of a ``width`` x ``height`` image (the unrotated box)."""
        x1, y1, x2, y2 = self.box_norm
        return (x1 * width / SCALE, y1 * height / SCALE, x2 * width / SCALE, y2 * height / SCALE)

    def to_obb_pixels(
        self, width: float, height: float
    ) -> tuple[float, float, float, float, float]:
        """``(cx, cy, w, h, angle_deg)`` in pixels (angle 0 for axis-aligned boxes)."""
        x1, y1, x2, y2 = self.to_pixels(width, height)
        return ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, float(self.angle or 0.0))

    def corners_px(self, width: float, height: float) -> list[tuple[float, float]]:
        """The four corners in pixels, clockwise on screen from the (unrotated) top-left."""
        cx, cy, w, h, angle = self.to_obb_pixels(width, height)
        t = math.radians(angle)
        cos, sin = math.cos(t), math.sin(t)
        corners = []
        for dx, dy in ((-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)):
            corners.append((cx + dx * cos - dy * sin, cy + dx * sin + dy * cos))
        return corners

    @property
    def oriented(self) -> bool:
        return self.angle is not None and self.angle != 0

    def format_canonical(self) -> str:
        return format_box(self.label, self.box_norm, self.angle)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def _clean_label(label: str) -> str:
    # Angle brackets and newlines would break the grammar (and the bounded label pattern).
    return " ".join(re.sub(r"[<>]", "", str(label)).split())[:200]


def _canonical_ints(box_norm: Sequence[float]) -> tuple[int, int, int, int]:
    if len(box_norm) != 4:
        raise ValueError(f"a box needs 4 coordinates (x1, y1, x2, y2), got {len(box_norm)}")
    values = [float(v) for v in box_norm]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"box coordinates must be finite numbers, got {list(box_norm)}")
    x1, y1, x2, y2 = (int(round(min(max(v, 0.0), SCALE))) for v in values)
    x1, x2 = sorted((x1, x2))
    y1, y2 = sorted((y1, y2))
    return x1, y1, x2, y2


def _wrap_angle(angle: float) -> float:
    """Degrees into (-180, 180]."""
    wrapped = math.fmod(angle, 360.0)
    if wrapped <= -180:
        wrapped += 360
    elif wrapped > 180:
        wrapped -= 360
    return wrapped


def format_box(label: str | None, box_norm: Sequence[float], angle: float | None = None) -> str:
    """The canonical text of one box; ``box_norm`` in 0-1000 (rounded, clamped, ordered).

    >>> format_box("building", (100.4, 200, 300, 400.6))
    '<ref>building</ref><box>[100,200,300,401]</box>'
    >>> format_box(None, (10, 10, 50, 30), angle=-30)
    '<box>[10,10,50,30,-30]</box>'
    """
    x1, y1, x2, y2 = _canonical_ints(box_norm)
    coords = f"{x1},{y1},{x2},{y2}"
    if angle is not None:
        angle = float(angle)
        if not math.isfinite(angle):
            raise ValueError(f"the angle must be a finite number of degrees, got {angle}")
        a = int(round(_wrap_angle(angle)))
        coords += f",{180 if a == -180 else a}"
    box = f"<box>[{coords}]</box>"
    if label is None or not _clean_label(label):
        return box
    return f"<ref>{_clean_label(label)}</ref>{box}"


def format_region_box(box_px: Sequence[float], width: float, height: float) -> str:
    """The analyst's drawn rectangle (chip pixels) as model input: ``<box>[x1,y1,x2,y2]</box>``."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width} x {height}")
    if len(box_px) != 4:
        raise ValueError(f"a region needs 4 pixel coordinates (x1, y1, x2, y2), got {len(box_px)}")
    x1, y1, x2, y2 = (float(v) for v in box_px)
    return format_box(
        None, (x1 * SCALE / width, y1 * SCALE / height, x2 * SCALE / width, y2 * SCALE / height)
    )


def pixels_to_norm(box_px: Sequence[float], width: float, height: float) -> tuple[float, ...]:
    """Pixel ``(x1, y1, x2, y2)`` -> 0-1000 floats (no rounding)."""
    x1, y1, x2, y2 = (float(v) for v in box_px)
    return (x1 * SCALE / width, y1 * SCALE / height, x2 * SCALE / width, y2 * SCALE / height)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def _to_floats(values: Sequence[str]) -> list[float] | None:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    return out if all(math.isfinite(v) for v in out) else None


def _normalised(
    coords: Sequence[float], scale_x: float, scale_y: float
) -> tuple[float, ...] | None:
    """Scale to 0-1000, clamp, order; None for zero-area boxes."""
    x1, y1, x2, y2 = coords
    x1, x2 = sorted((x1 * SCALE / scale_x, x2 * SCALE / scale_x))
    y1, y2 = sorted((y1 * SCALE / scale_y, y2 * SCALE / scale_y))
    x1, x2 = (min(max(v, 0.0), float(SCALE)) for v in (x1, x2))
    y1, y2 = (min(max(v, 0.0), float(SCALE)) for v in (y1, y2))
    if x2 - x1 <= 1e-9 or y2 - y1 <= 1e-9:
        return None
    return (x1, y1, x2, y2)


def _label(raw: str | None) -> str | None:
    if raw is None:
        return None
    cleaned = " ".join(raw.split())
    return cleaned or None


def _from_match(
    fmt: str, match: re.Match[str], image_size: tuple[float, float] | None
) -> ParsedBox | None:
    label = match.groupdict().get("label")
    angle: float | None = None
    if fmt == CANONICAL:
        numbers = _to_floats(_NUM_RE.findall(match.group("nums")))
        if numbers is None:
            return None
        if len(numbers) == 5:
            angle = _wrap_angle(numbers.pop())
        scale = (SCALE, SCALE)
    elif fmt == QWEN_VL:
        numbers = _to_floats([g for g in match.groups()[1:] if g is not None])
        scale = (SCALE, SCALE)
    elif fmt == GEOCHAT:
        groups = match.groups()
        numbers = _to_floats(groups[:4])
        if groups[4] is not None:
            theta = _to_floats([groups[4]])
            if theta is None:
                return None
            angle = _wrap_angle(theta[0])
        scale = (100, 100)
    elif fmt == QWEN25_JSON:
        if image_size is None:
            logger.debug("skipping a Qwen2.5-VL pixel box: the image size is unknown")
            return None
        numbers, label = _parse_qwen25_json(match.group(0))
        scale = (float(image_size[0]), float(image_size[1]))
    else:  # a bare [a, b, c, d]: LHRS-Bot floats 0-1, or integers 0-1000
        raw = match.groups()
        numbers = _to_floats(raw)
        if numbers is None:
            return None
        if all(0.0 <= v <= 1.0 for v in numbers):
            scale = (1.0, 1.0)
        elif all(re.fullmatch(r"[-+]?\d+", v) for v in raw) and all(
            0 <= v <= SCALE for v in numbers
        ):
            fmt, scale = PLAIN_1000, (SCALE, SCALE)
        else:
            return None
    if numbers is None or len(numbers) != 4 or scale[0] <= 0 or scale[1] <= 0:
        return None
    box = _normalised(numbers, *scale)
    if box is None:
        return None
    return ParsedBox(_label(label), box, angle, match.span(), fmt)


def _parse_qwen25_json(text: str) -> tuple[list[float] | None, str | None]:
    try:
        record = json.loads(text)
        coords = [float(v) for v in record["bbox_2d"]]
        label = record.get("label")
        return (coords if all(math.isfinite(v) for v in coords) else None), (
            str(label) if label is not None else None
        )
    except (ValueError, TypeError, KeyError, AttributeError):
        pass
    # Not strict JSON (single quotes, trailing commas): read the two fields with patterns.
    box = _JSON_BOX_RE.search(text)
    if box is None:
        return None, None
    label = _JSON_LABEL_RE.search(text)
    return _to_floats(_NUM_RE.findall(box.group(1))), (label.group(1) if label else None)


def parse_boxes(text: str, image_size: tuple[float, float] | None = None) -> list[ParsedBox]:
    """All boxes in ``text``, in order of appearance. Never raises.

    ``image_size`` = ``(width, height)`` in pixels is needed only for Qwen2.5-VL's absolute pixel
    boxes (skipped without it). Formats are tried in priority order and a span claimed by one is
    not re-read by another (the ``[..]`` inside ``<box>[..]</box>`` is not also an LHRS-Bot box).
    """
    try:
        if not isinstance(text, str) or not text:
            return []
        if image_size is not None:
            w, h = (float(v) for v in image_size)
            image_size = (
                (w, h) if w > 0 and h > 0 and math.isfinite(w) and math.isfinite(h) else None
            )
        taken: list[tuple[int, int]] = []
        found: list[ParsedBox] = []
        for fmt, pattern in _PATTERNS:
            for match in pattern.finditer(text):
                start, end = match.span()
                if any(start < t_end and t_start < end for t_start, t_end in taken):
                    continue
                box = _from_match(fmt, match, image_size)
                # A matched-but-invalid box still claims its span, so its inner list is not
                # re-read as a different format.
                taken.append((start, end))
                if box is not None:
                    found.append(box)
        found.sort(key=lambda b: b.span)
        return _inherit_labels(text, found)
    except Exception:  # pragma: no cover - the contract is "never raises"; log and move on
        logger.exception(
            "parse_boxes failed on a %d-character text", len(text) if isinstance(text, str) else -1
        )
        return []


def _inherit_labels(text: str, boxes: list[ParsedBox]) -> list[ParsedBox]:
    """``<ref>cars</ref><box>..</box><box>..</box>``: unlabelled boxes right after a labelled
    one (only separators between) share its label."""
    out: list[ParsedBox] = []
    for box in boxes:
        prev = out[-1] if out else None
        if (
            box.label is None
            and box.format in _REF_FORMATS
            and prev is not None
            and prev.format in _REF_FORMATS
            and prev.label is not None
            and _SAME_LABEL_GAP.match(text[prev.span[1] : box.span[0]])
        ):
            box = ParsedBox(prev.label, box.box_norm, box.angle, box.span, box.format)
        out.append(box)
    return out


def strip_boxes(text: str, image_size: tuple[float, float] | None = None) -> str:
    """``text`` with box markup replaced by the labels (for display next to the map)."""
    boxes = parse_boxes(text, image_size)
    pieces, last = [], 0
    for box in boxes:
        pieces.append(text[last : box.span[0]])
        if box.label and box.format in (CANONICAL, QWEN_VL):
            pieces.append(box.label)
        last = box.span[1]
    pieces.append(text[last:])
    return "".join(pieces)


# A box the model began but did not finish before its token budget ran out.
_UNFINISHED_TAIL = re.compile(r"(?:<ref>[^<]*(?:</ref>)?)?(?:<box>[^<]*)?$")


def replace_boxes(text: str, boxes: Sequence[tuple[str | None, Sequence[float]]],
                  image_size: tuple[float, float] | None = None) -> str:
    """``text`` with its boxes replaced by ``boxes`` (``(label, box_norm 0-1000)``, canonical
    form): they take the place of the first box, the other boxes and an unfinished box at the
    end go. Text between boxes stays. A text without boxes comes back unchanged."""
    found = parse_boxes(text, image_size)
    if not found:
        return text
    pieces = [text[: found[0].span[0]], "".join(format_box(lb, b) for lb, b in boxes)]
    for box, following in zip(found, [*found[1:], None], strict=True):
        between = text[box.span[1] : following.span[0] if following else len(text)]
        pieces.append(between if following else _UNFINISHED_TAIL.sub("", between, count=1))
    return "".join(pieces)


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two pixel boxes ``(x1, y1, x2, y2)`` (plain areas, no +1)."""
    ax1, ay1, ax2, ay2 = (float(v) for v in a)
    bx1, by1, bx2, by2 = (float(v) for v in b)
    ax1, ax2 = sorted((ax1, ax2))
    ay1, ay2 = sorted((ay1, ay2))
    bx1, bx2 = sorted((bx1, bx2))
    by1, by2 = sorted((by1, by2))
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def obb_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two oriented pixel boxes ``(cx, cy, w, h, angle_deg)`` (polygon areas, shapely)."""
    from shapely.geometry import Polygon

    def polygon(box: Sequence[float]) -> Polygon:
        cx, cy, w, h, angle = (float(v) for v in box)
        t = math.radians(angle)
        cos, sin = math.cos(t), math.sin(t)
        pts = [(-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)]
        return Polygon([(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in pts])

    pa, pb = polygon(a), polygon(b)
    union = pa.union(pb).area
    return float(pa.intersection(pb).area / union) if union > 0 else 0.0


__all__ = [
    "CANONICAL",
    "GEOCHAT",
    "LHRS_BOT",
    "PLAIN_1000",
    "QWEN25_JSON",
    "QWEN_VL",
    "SCALE",
    "ParsedBox",
    "box_iou",
    "format_box",
    "format_region_box",
    "obb_iou",
    "parse_boxes",
    "replace_boxes",
    "pixels_to_norm",
    "strip_boxes",
]
