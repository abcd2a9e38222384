"""What a question gets back: the one result type that the CLI, the app, scan and evaluation read.

`Answer` holds the text, the grounded boxes, the retrieved semantics and the timing of one turn;
`AnswerBox` one grounded object. `ground` is the one path from boxes written in an answer to
map geometry: every box grammar `rsvlm.boxes` knows -> chip pixels -> the chip's transform
(`tiles.Chip`) -> a shapely polygon in the wanted CRS (EPSG:4326 unless told otherwise).

Any model family produces this type: a backend's session parses its own box convention into
canonical text (or calls `ground` on its answer) and fills an `Answer`; nothing downstream knows
which model answered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rsvlm.boxes import parse_boxes


@dataclass
class AnswerBox:
    """A grounded object: chip pixels and, for a georeferenced chip, its polygon on the map."""

    label: str | None
    box_px: tuple[float, float, float, float]
    angle: float | None = None
    geometry: Any = None  # a shapely geometry (EPSG:4326 unless `ground` was given a crs)
    score: float | None = None  # the model's confidence in this box, where it has one

    @property
    def name(self) -> str:
        """The label to show (``object`` when the model named none)."""
        return self.label or "object"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the geometry as a GeoJSON geometry (RFC 7946), or None in pixel space."""
        geometry = None
        if self.geometry is not None:
            from shapely.geometry import mapping

            geometry = mapping(self.geometry)
        return {
            "label": self.label,
            "box_px": [round(v, 2) for v in self.box_px],
            "angle": self.angle,
            "geometry": geometry,
            "score": None if self.score is None else round(float(self.score), 4),
        }


@dataclass
class Answer:
    """One answered question. ``retrieved`` rows are ``{"text", "score", ...metadata}``."""

    text: str
    boxes: list[AnswerBox] = field(default_factory=list)
    retrieved: list[dict[str, Any]] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)
    prompt: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The ``rsvlm ask --json`` document."""
        return {
            "answer": self.text,
            "boxes": [b.to_dict() for b in self.boxes],
            "retrieved": self.retrieved,
            "timing": self.timing,
        }


class OnChip:
    """What a chat session (the embedded and the pretrained backends' alike) looks at: a
    `tiles.Chip` or a plain PIL image, its RGB image, and its pixel frame (the chip's size when
    it has one, else the image's)."""

    def __init__(self, chip: Any) -> None:
        self.chip = chip
        self.image = chip.to_image().convert("RGB") if hasattr(chip, "to_image") else chip

    @property
    def chip_width(self) -> int:
        return int(getattr(self.chip, "width", None) or self.image.width)

    @property
    def chip_height(self) -> int:
        return int(getattr(self.chip, "height", None) or self.image.height)

    @property
    def gsd(self) -> float | None:
        """Metres on the ground a pixel of the image (None when not georeferenced)."""
        return ground_sample_distance(self.chip, self.image.size)


def ground_sample_distance(chip: Any, size: Sequence[int]) -> float | None:
    """Metres a pixel of an image of ``size`` showing ``chip`` (a `tiles.Chip`'s geodesic area;
    None for a plain image or one in pixel space)."""
    area = getattr(chip, "ground_area_m2", None)
    if not area:
        return None
    return float((area / max(size[0] * size[1], 1)) ** 0.5)


def ground(
    text: str,
    chip: Any,
    size: Sequence[int] | None = None,
    *,
    crs: Any = None,
    unique: bool = True,
    scores: Sequence[float] | None = None,
) -> list[AnswerBox]:
    """Boxes in ``text`` -> chip pixels -> polygons in ``crs`` (EPSG:4326 by default).

    ``chip`` is a `tiles.Chip` (or anything with ``width``/``height``; a chip that is not
    georeferenced gives pixel boxes without geometry); ``size`` overrides its pixel size. With
    ``unique``, a box repeated verbatim (same label, coordinates and angle: a small model looping)
    is kept once; it would otherwise become several identical detections on the map.
    ``scores[i]`` is the model's confidence of the i-th box of ``text`` (a box head's), if any.
    """
    width, height = (int(v) for v in (size or (chip.width, chip.height)))
    georeferenced = bool(getattr(chip, "georeferenced", False))
    to_crs = {} if crs is None else {"crs": crs}
    boxes: list[AnswerBox] = []
    seen: set[tuple[Any, ...]] = set()
    for i, parsed in enumerate(parse_boxes(text, image_size=(width, height))):
        x1, y1, x2, y2 = (float(v) for v in parsed.to_pixels(width, height)[:4])
        key = (parsed.label, round(x1, 3), round(y1, 3), round(x2, 3), round(y2, 3), parsed.angle)
        if unique and key in seen:
            continue
        seen.add(key)
        geometry = None
        if georeferenced:
            if parsed.angle:
                geometry = chip.obb_to_polygon(
                    (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, parsed.angle, **to_crs
                )
            else:
                geometry = chip.box_to_polygon((x1, y1, x2, y2), **to_crs)
        score = float(scores[i]) if scores is not None and i < len(scores) else None
        boxes.append(AnswerBox(parsed.label, (x1, y1, x2, y2), parsed.angle, geometry, score))
    return boxes


__all__ = ["Answer", "AnswerBox", "ground"]
