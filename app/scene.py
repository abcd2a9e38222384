"""Whole scenes: a find/count question about an area larger than the model's view at native
resolution runs the tiled scan (`rsvlm.scan.scan`) over that area instead of one downsampled look.

Any `Backend` answers the tiles: each tile is a chip handed to ``backend.new_session(chip).ask``,
so the scan needs nothing of a backend but the app's own seam. The scan merges boxes across tile
borders in a metric CRS; the model's own box scores, when it has them, are carried onto the merged
detections (see `carry_scores`).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.backend import Backend
    from rsvlm.answer import AnswerBox

#: An area is scanned when its longest side, in source pixels, exceeds the chip size by this much
#: (a little larger is read in one look: objects survive downsampling by up to 1.5).
SCAN_FACTOR = 1.5
#: Overlap of neighbouring tiles (objects cut by one tile's border lie whole in the next).
OVERLAP = 0.125
#: Most tiles one question may read (a 2048-px scene in 512-px tiles with overlap is 25).
MAX_TILES = 400
_FIND_OR_COUNT = re.compile(r"\b(?:find|count|how\s+many|detect|locate|where\s+are|number\s+of|"
                            r"all|every)\b|^\s*(?:please\s+)?(?:show|highlight|mark|outline)\b",
                            re.I)


def asks_to_find(question: str) -> bool:
    """Whether ``question`` asks for objects (find, count, every ...), not about the scene."""
    return bool(_FIND_OR_COUNT.search(question or ""))


def native_size(source: Any, bounds: Sequence[float]) -> tuple[int, int]:
    """Pixels of ``source`` (its own resolution) inside ``bounds`` (in the source's CRS)."""
    res = (source.info() or {}).get("resolution")
    if not res:
        return (0, 0)
    rx, ry = abs(float(res[0])), abs(float(res[1]))
    return (round((bounds[2] - bounds[0]) / rx), round((bounds[3] - bounds[1]) / ry))


def needs_scan(source: Any, bounds: Sequence[float], chip_size: int) -> bool:
    """Whether the area is larger than one chip at native resolution (by `SCAN_FACTOR`)."""
    if not getattr(source, "georeferenced", False):
        return False
    return max(native_size(source, bounds)) > chip_size * SCAN_FACTOR


@dataclass
class ScanAnswer:
    """What the app shows of a whole-scene scan."""

    detections: list[Any]  # tiles.export.Detection, EPSG:4326, best first
    tiles_read: int
    tiles_total: int
    cancelled: bool
    seconds: float
    raw: list[str] = field(default_factory=list)  # each tile's raw answer, in reading order
    retrieved: list[dict[str, Any]] = field(default_factory=list)  # every tile's hits
    prompt: str = ""  # the exact prompt of the first tile (the others differ only in pixels)
    # A count or presence question: (kind, label, the find-all question the tiles were asked),
    # `rsvlm.perception.area_question`; the answer counts the merged detections of the label.
    area: tuple[str, str, str] | None = None
    # The part of the area the question named ("in the top left": its top-left quarter), which
    # alone was read (`scan_bounds`); None: all of it.
    place: str | None = None

    def found(self, numbers: Sequence[int], where: str = "on the map") -> str:
        """What the scan found, as the start of the chat's answer."""
        from app.answers import count_phrase, number_range
        from rsvlm.perception import area_answer, asked_size, size_words

        numbered = f" (numbered {number_range(numbers)}{' ' + where if where else ''})"
        part = f"the {self.place} of this area" if self.place else "this area"
        if self.area is not None:
            kind, label, _ = self.area
            n = sum(d.label == label for d in self.detections)
            sized = asked_size(self.area[2])  # "3 buildings of more than 200 m² in this area"
            size = size_words(sized) if sized is not None else ""
            return area_answer(kind, label, n, part, size) + (numbered if self.detections else "")
        inside = f" in {part}" if self.place else ""
        if self.detections:
            return f"Found {count_phrase([d.label for d in self.detections])}{inside}{numbered}"
        return f"Found nothing to mark{inside}"

    def said(self, numbers: Sequence[int], where: str = "on the map") -> str:
        """The chat's whole answer: what was found, and how much of the area was read."""
        tiles = f"{self.tiles_read} tile{'s' if self.tiles_read != 1 else ''}"
        found = self.found(numbers, where)
        if self.cancelled:
            return f"Stopped after {tiles} of {self.tiles_total}. {found} so far."
        part = "that part of the area" if self.place else "the whole area"
        return f"{found}, reading {part} in {tiles}."


def session_answer_fn(backend: Backend, boxes_out: list[AnswerBox], raw_out: list[str],
                      retrieved_out: list[dict[str, Any]] | None = None,
                      prompt_out: list[str] | None = None
                      ) -> Callable[[Sequence[Any], str], list[str]]:
    """``answer_fn`` for `rsvlm.scan.scan` from any backend: one session per tile. The tiles'
    grounded boxes (with the model's scores), raw answers, retrieved descriptions and the first
    tile's prompt are collected into the ``*_out`` lists."""

    def answer(chips: Sequence[Any], question: str) -> list[str]:
        texts = []
        for chip in chips:
            session = backend.new_session(chip)
            for _ in session.ask(question):
                pass
            last = session.last
            text = last.text if last is not None else ""
            if last is not None:
                boxes_out.extend(b for b in last.boxes if b.geometry is not None)
                if retrieved_out is not None:
                    retrieved_out.extend(last.retrieved or [])
                if prompt_out is not None and not prompt_out:
                    prompt_out.append(str(last.prompt or ""))
            raw_out.append(text)
            texts.append(text)
        return texts

    return answer


def carry_scores(detections: list[Any], boxes: Sequence[AnswerBox], min_iou: float = 0.3
                 ) -> None:
    """Give each merged detection the model's score: the best-scored tile box that overlaps it
    (IoU >= ``min_iou`` in lon/lat, which is locally proportional at tile scale), times the
    scan's own confidence (1 for an object seen whole, 0.5 for one cut by a tile border).
    Detections of a model without scores keep the scan's confidence."""
    scored = [b for b in boxes if getattr(b, "score", None) is not None]
    if not scored:
        return
    import shapely
    from shapely.geometry import shape
    from shapely.geometry.base import BaseGeometry

    shapes = [b.geometry if isinstance(b.geometry, BaseGeometry) else shape(b.geometry)
              for b in scored]  # shapely, or a GeoJSON geometry from another backend
    tree = shapely.STRtree(shapes)
    for det in detections:
        best = None
        for j in tree.query(det.geometry, predicate="intersects").tolist():
            g = shapes[j]
            inter = det.geometry.intersection(g).area
            union = det.geometry.area + g.area - inter
            if union > 0 and inter / union >= min_iou:
                s = float(scored[j].score)
                best = s if best is None else max(best, s)
        if best is not None:
            det.score = round(best * (1.0 if det.score is None else float(det.score)), 4)


def tile_count(source: Any, bounds: Sequence[float], chip_size: int) -> int:
    """How many tiles `scan_area` reads for ``bounds`` (source CRS) of ``source``."""
    from tiles import AreaSource, grid_windows

    area = AreaSource(source, bounds)
    return len(grid_windows(area.bounds, source.info()["resolution"], chip_size, OVERLAP))


def _labels(backend: Backend) -> list[str]:
    """The detector's classes; buildings for a model that grounds what it is asked."""
    return (getattr(backend, "info", None) or {}).get("detector_labels") or ["building"]


def scan_bounds(backend: Backend, question: str, bounds: Sequence[float]
                ) -> tuple[tuple[float, ...], str | None, str]:
    """What a scan of ``bounds`` (source CRS, y up) for ``question`` reads: the part a count,
    presence or find question names ("in the top left": the top-left quarter), its name (None:
    all of it), and the question each tile is then asked (about the whole tile)."""
    from rsvlm.perception import (
        PLACED_KINDS,
        asked_place,
        asked_size,
        object_question,
        plural,
        size_words,
    )

    asked = object_question(question, _labels(backend))
    if not asked or asked[0] not in PLACED_KINDS:
        return tuple(bounds), None, question
    sized = asked_size(question)
    tile_question = (f"Find all {plural(asked[1])}"
                     f"{size_words(sized, ' than') if sized else ''} in the image.")
    place = asked_place(question)
    if place is None:  # a plain "find all" as asked; counts and sizes: each tile finds them
        return tuple(bounds), None, (question if asked[0] == "find_all" and not sized
                                     else tile_question)
    (px1, py1, px2, py2), name = place
    x1, y1, x2, y2 = bounds
    w, h = x2 - x1, y2 - y1
    part = (x1 + px1 * w, y2 - py2 * h, x1 + px2 * w, y2 - py1 * h)  # image rows run down
    return part, name, tile_question


def scan_area(backend: Backend, source_path: str, bounds: Sequence[float], question: str, *,
              chip_size: int, progress: Callable[[int, int], None] | None = None,
              cancel: threading.Event | None = None) -> ScanAnswer:
    """Scan ``bounds`` (source CRS) of the raster at ``source_path`` with ``question``; tiles of
    ``chip_size`` native pixels, read one at a time so progress and cancel act per tile."""
    from rsvlm.perception import area_question
    from rsvlm.scan import ScanError, scan
    from tiles import AreaSource, open_source

    # "How many buildings?" over an area: the tiles find them and the merged boxes are counted,
    # each once. The detector's classes; buildings for a model that grounds what it is asked.
    labels = _labels(backend)
    counted = area_question(question, labels)
    bounds, place, question = scan_bounds(backend, question, bounds)
    if counted is not None:  # the tiles' question, a size it asks about included
        counted = (*counted[:2], question)

    boxes: list[AnswerBox] = []
    raw: list[str] = []
    retrieved: list[dict[str, Any]] = []
    prompt: list[str] = []
    with open_source(source_path) as src:
        area = AreaSource(src, bounds)
        n = tile_count(src, bounds, chip_size)
        if n > MAX_TILES:
            raise ScanError(f"The area is {n} tiles of {chip_size} px; the app reads at most "
                            f"{MAX_TILES}. Draw a smaller area, or use `rsvlm scan` for the "
                            "whole raster.")
        result = scan(area, question,
                      answer_fn=session_answer_fn(backend, boxes, raw, retrieved, prompt),
                      chip_size=chip_size, overlap=OVERLAP, batch_size=1, progress=progress,
                      cancel=cancel)
    detections = list(result)
    carry_scores(detections, boxes)
    detections.sort(key=lambda d: -(d.score if d.score is not None else 0.0))
    return ScanAnswer(detections, result.chips_done, result.chips_total, result.cancelled,
                      result.seconds, raw, retrieved, prompt[0] if prompt else "", counted,
                      place)
