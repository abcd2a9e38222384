"""Whole-scene analysis: ask one question of every chip of a large raster and merge the boxes.

    from rsvlm.scan import scan
    with tiles.open_source("scene.tif") as source:
        detections = scan(source, "find all buildings", engine=engine, batch_size=8)
    tiles.export.write_geojson(detections, "detections.geojson")

How it works:

1. **Grid.** Square windows of ``chip_size`` *source* pixels (ground pixels, not model pixels)
   step over the raster in its own CRS with ``overlap`` between neighbours; the last row and
   column are shifted back to end at the raster's edge, so every chip is full size. Each window
   is read through `tiles` (windowed reads, the whole file is never loaded).
2. **Answers.** Chips go to the model in batches (one padded ``generate`` call per batch, left
   padding, as decoder-only batching needs); the same prompt the chat engine builds is used.
   Any ``answer_fn(chips, question) -> list[str]`` can stand in for the model (tests, other
   detectors).
3. **Boxes to the map.** Boxes are parsed with `rsvlm.boxes`, turned into chip pixels and then,
   through the chip, into polygons in a *metric* CRS: the raster's own when it is projected,
   otherwise the UTM zone of the scene's centre. All merging happens there, so IoU is measured
   on ground areas, not on degrees.
4. **Merging across chip borders.** The rule, in order:

   * A box is *cut* when it comes within ``border_px`` of a chip edge that is not the raster's
     edge: the object probably continues in the neighbour chip.
   * Two boxes (same label, different chips) whose chips overlap are the *same object* when
     their parts inside the shared strip agree: IoU of ``box_a ∩ strip`` and ``box_b ∩ strip``
     >= ``iou_threshold``. Both chips saw exactly those pixels, so a whole box and the cut
     remainder of the same object agree there even though the whole boxes do not. Same objects
     are merged (union-find) into the envelope of their union.
   * Score: 1.0 for a merged object or an uncut box; 0.5 (down-weighted) for a cut box that no
     neighbour confirmed.
   * Finally class-aware NMS (highest score, then largest area first) removes remaining
     duplicates whose IoU >= ``iou_threshold``, e.g. a model repeating a box in one chip.

``progress(done, total)`` is called after each batch; ``cancel`` (a `threading.Event`) is
checked between batches, and a cancelled scan returns what it found so far with
`ScanResult.cancelled` set (the app shows partial results; the CLI writes them).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

AnswerFn = Callable[[Sequence[Any], str], list[str]]
Progress = Callable[[int, int], None]

CUT_SCORE = 0.5  # a box cut by an inner chip border that no neighbour confirmed


class ScanError(ValueError):
    """Bad scan input (no georeference, absurd chip size...); the message is for the user."""


@dataclass(frozen=True)
class Window:
    """One chip of the grid: source-CRS bounds and which of its edges are the raster's edges."""

    index: int
    bounds: tuple[float, float, float, float]  # minx, miny, maxx, maxy in the source CRS
    outer: tuple[bool, bool, bool, bool]  # left, bottom, right, top edge lies on the raster edge


@dataclass
class _Box:
    label: str
    window: int
    polygon: Any  # shapely Polygon in the metric CRS
    cut: bool


class ScanResult(list):
    """The detections (a list of `tiles.export.Detection`, best first) plus how the scan went."""

    def __init__(self, chips_total: int = 0, metric_crs: str = "") -> None:
        super().__init__()
        self.chips_total = chips_total
        self.chips_done = 0
        self.raw_boxes = 0
        self.cancelled = False
        self.seconds = 0.0
        self.metric_crs = metric_crs
        self.timing: dict[str, float] = {}

    @property
    def chips_per_s(self) -> float:
        return self.chips_done / self.seconds if self.seconds > 0 else 0.0


# ----------------------------------------------------------------------------------------------
# Grid
# ----------------------------------------------------------------------------------------------


def _starts(length: int, size: int, step: int) -> list[int]:
    if length <= size:
        return [0]
    starts = list(range(0, length - size, step))
    starts.append(length - size)  # the last chip ends at the raster's edge
    return starts


def grid_windows(
    bounds: Sequence[float], resolution: tuple[float, float], chip_size: int, overlap: float
) -> list[Window]:
    """Square windows of ``chip_size`` source pixels over ``bounds`` (row-major, top first)."""
    if not 0 <= overlap < 0.9:
        raise ScanError(f"overlap must be in [0, 0.9), got {overlap!r}")
    if chip_size < 16:
        raise ScanError(f"chip size must be at least 16 pixels, got {chip_size!r}")
    minx, miny, maxx, maxy = (float(v) for v in bounds)
    rx, ry = abs(float(resolution[0])), abs(float(resolution[1]))
    width, height = round((maxx - minx) / rx), round((maxy - miny) / ry)
    if width < 1 or height < 1:
        raise ScanError(f"The raster has no area to scan ({width}x{height} pixels).")
    step = max(1, int(round(chip_size * (1.0 - overlap))))
    cols, rows = _starts(width, chip_size, step), _starts(height, chip_size, step)
    windows = []
    for row in rows:
        for col in cols:
            w_px, h_px = min(chip_size, width - col), min(chip_size, height - row)
            x0, y1 = minx + col * rx, maxy - row * ry
            x1, y0 = x0 + w_px * rx, y1 - h_px * ry
            outer = (col == 0, row + h_px >= height, col + w_px >= width, row == 0)
            windows.append(Window(len(windows), (x0, y0, x1, y1), outer))
    return windows


def metric_crs(source_crs: Any, bounds_lonlat: Sequence[float]) -> Any:
    """The source CRS when projected (metres or feet), else the UTM zone of the scene centre."""
    from pyproj import CRS

    crs = CRS.from_user_input(source_crs)
    if crs.is_projected:
        return crs
    lon = (bounds_lonlat[0] + bounds_lonlat[2]) / 2
    lat = (bounds_lonlat[1] + bounds_lonlat[3]) / 2
    zone = min(60, max(1, int(math.floor((lon + 180) / 6)) + 1))
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)


# ----------------------------------------------------------------------------------------------
# Answers
# ----------------------------------------------------------------------------------------------


def engine_answer_fn(engine: Any, *, max_new_tokens: int = 256) -> AnswerFn:
    """Batched answers from a `rsvlm.engine.ChatEngine`'s model: one padded ``generate`` per batch.

    The prompt, retrieval and generation settings are the engine's, so a chip scanned here gets
    the answer a one-chip chat would (up to the numerics of padding).
    """
    import torch

    from rsvlm import prompting

    processor, model = engine.processor, engine.model
    tokenizer = processor.tokenizer
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )

    def answer(chips: Sequence[Any], question: str) -> list[str]:
        images = [c.to_image().convert("RGB") if hasattr(c, "to_image") else c for c in chips]
        device = engine.device
        user = prompting.user_turn(question, image_token=None)
        messages = prompting.build_messages([(user, None)], image_token=processor.image_token)
        prompt = prompting.render(processor, messages, add_generation_prompt=True)
        semantic = [[] for _ in images]
        if engine.use_retrieval:
            pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
            semantic = [
                [h["text"] for h in engine.retrieve(pixel_values[i : i + 1])]
                for i in range(len(images))
            ]
        inputs = processor(
            text=[prompt] * len(images),
            images=images,
            semantic_texts=semantic,
            queries=[question] * len(images),
            padding_side="left",  # decoder-only batching: every row ends where generation starts
        )
        kwargs = {k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()}
        if "pixel_values" in kwargs:
            kwargs["pixel_values"] = kwargs["pixel_values"].to(model.dtype)
        try:
            with engine._lock, torch.inference_mode():  # one generation at a time on the model
                out = model.generate(
                    **kwargs,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad_id,
                    **engine.generate_kwargs(kwargs["input_ids"].shape[1]),
                )
        except Exception as exc:
            from rsvlm.loading import is_cuda_oom

            if is_cuda_oom(exc):
                raise ScanError(
                    f"The GPU ran out of memory answering {len(images)} chips at once: use a "
                    "smaller --batch-size (or --model embedded to run on the CPU)."
                ) from exc
            raise
        new = out[:, kwargs["input_ids"].shape[1] :]
        return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]

    return answer


# ----------------------------------------------------------------------------------------------
# Scan
# ----------------------------------------------------------------------------------------------


def _batches(items: Sequence[Window], n: int) -> Iterator[Sequence[Window]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _source_resolution(source: Any) -> tuple[float, float]:
    res = None
    try:
        res = source.info().get("resolution")
    except Exception:  # info() of an exotic source must not hide the real message below
        res = None
    if not res or len(res) != 2 or not all(float(r) > 0 for r in res):
        raise ScanError(
            f"{getattr(source, 'name', source)!r} has no pixel size; scanning needs a raster file "
            "(GeoTIFF/COG) with a georeference."
        )
    return float(res[0]), float(res[1])


def scan(
    source: Any,
    question: str,
    *,
    engine: Any = None,
    answer_fn: AnswerFn | None = None,
    chip_size: int = 512,
    model_size: int | None = None,
    overlap: float = 0.125,
    batch_size: int = 4,
    iou_threshold: float = 0.5,
    border_px: float | None = None,
    max_new_tokens: int = 256,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> ScanResult:
    """Detections for ``question`` over the whole of ``source`` (a georeferenced `tiles` source).

    Args:
        engine: a `ChatEngine` (its model answers); or give ``answer_fn`` instead.
        chip_size: chip side in source (ground) pixels.
        model_size: pixels of the chip handed to the model (default ``chip_size``; the image
            processor resizes to the vision tower's input anyway).
        overlap: fraction of a chip shared with its neighbour (objects cut by one chip's border
            lie whole in the next one when they are smaller than the overlap).
        batch_size: chips per ``generate`` call.
        iou_threshold: for both the cross-border match and the final NMS (see module docstring).
        border_px: how close to an inner chip edge (chip pixels) a box counts as cut; default 1 %
            of the chip, at least 2 px.
        progress: ``progress(done, total)`` after each batch.
        cancel: set it to stop between batches; the partial result is returned.
    """
    from rsvlm.boxes import parse_boxes
    from tiles.export import Detection
    from tiles.geometry import LONLAT, transform_geometry

    question = (question or "").strip()
    if not question:
        raise ScanError('Say what to look for, e.g. "find all buildings".')
    if (engine is None) == (answer_fn is None):
        raise ScanError("scan() needs exactly one of engine= or answer_fn=.")
    if batch_size < 1:
        raise ScanError(f"batch size must be at least 1, got {batch_size!r}")
    if not 0 < iou_threshold <= 1:
        raise ScanError(f"iou_threshold must be in (0, 1], got {iou_threshold!r}")
    if not getattr(source, "georeferenced", False):
        raise ScanError(
            f"{getattr(source, 'name', source)!r} has no georeference: a scan writes map "
            "coordinates, so it needs a GeoTIFF/COG with a CRS."
        )
    answer = answer_fn or engine_answer_fn(engine, max_new_tokens=max_new_tokens)
    t0 = time.perf_counter()
    windows = grid_windows(source.bounds, _source_resolution(source), chip_size, overlap)
    metric = metric_crs(source.crs, source.bounds_lonlat)
    result = ScanResult(chips_total=len(windows), metric_crs=metric.to_string())
    logger.info(
        "scan: %d chips of %d px over %s (%s)",
        len(windows),
        chip_size,
        getattr(source, "name", ""),
        result.metric_crs,
    )
    out_size = model_size or chip_size
    margin = border_px if border_px is not None else max(2.0, 0.01 * out_size)
    boxes: list[_Box] = []
    t_read = t_model = 0.0
    for batch in _batches(windows, batch_size):
        if cancel is not None and cancel.is_set():
            result.cancelled = True
            logger.info("scan cancelled after %d of %d chips", result.chips_done, len(windows))
            break
        ta = time.perf_counter()
        chips = [source.chip(w.bounds, crs=source.crs, size=out_size) for w in batch]
        tb = time.perf_counter()
        texts = answer(chips, question)
        t_read += tb - ta
        t_model += time.perf_counter() - tb
        if len(texts) != len(chips):
            raise ScanError(
                f"The answer function gave {len(texts)} answers for {len(chips)} chips."
            )
        for window, chip, text in zip(batch, chips, texts, strict=True):
            boxes += chip_boxes(window, chip, text, metric, margin, parse_boxes)
        result.chips_done += len(batch)
        if progress is not None:
            progress(result.chips_done, len(windows))
    result.raw_boxes = len(boxes)
    tc = time.perf_counter()
    from shapely.geometry import box as shapely_box

    footprints = {  # only chips that reported something need their area in the metric CRS
        i: transform_geometry(shapely_box(*windows[i].bounds), source.crs, metric)
        for i in {b.window for b in boxes}
    }
    merged = merge_boxes(boxes, footprints, iou_threshold)
    name = getattr(source, "name", "")
    for label, polygon, score in merged:
        result.append(
            Detection(
                label=label,
                geometry=transform_geometry(polygon, metric, LONLAT),
                score=score,
                source=name,
                question=question,
            )
        )
    result.seconds = time.perf_counter() - t0
    result.timing = {
        "read_s": round(t_read, 3),
        "model_s": round(t_model, 3),
        "merge_s": round(time.perf_counter() - tc, 3),
    }
    logger.info(
        "scan: %d boxes -> %d detections in %.1f s", result.raw_boxes, len(result), result.seconds
    )
    return result


def chip_boxes(
    window: Window,
    chip: Any,
    text: str,
    metric: Any,
    margin: float,
    parse_boxes: Callable[..., Any],
) -> list[_Box]:
    """The boxes of one chip's answer as polygons in ``metric``, each marked cut or not.

    A box is cut when it comes within ``margin`` chip pixels of an edge that is not outer
    (``window.outer``); `rsvlm.scanning` calls this with map-wide outer edges.
    """
    out = []
    w, h = chip.width, chip.height
    left, bottom, right, top = window.outer
    for parsed in parse_boxes(text, image_size=(w, h)):
        x1, y1, x2, y2 = parsed.to_pixels(w, h)
        if x2 - x1 <= 0 or y2 - y1 <= 0:
            continue
        if parsed.angle:
            poly = chip.obb_to_polygon(
                (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, parsed.angle, crs=metric
            )
        else:
            poly = chip.box_to_polygon((x1, y1, x2, y2), crs=metric)
        if poly is None or poly.is_empty:
            continue
        cut = (
            (x1 <= margin and not left)
            or (x2 >= w - margin and not right)
            or (y1 <= margin and not top)
            or (y2 >= h - margin and not bottom)
        )
        label = (parsed.label or "object").strip().lower() or "object"
        out.append(_Box(label, window.index, poly, cut))
    return out


def merge_boxes(
    boxes: list[_Box], footprints: dict[int, Any], iou_threshold: float
) -> list[tuple[str, Any, float]]:
    """Cross-border merge, then NMS (module docstring); ``(label, polygon, score)`` best first.

    ``footprints[window]`` is each chip's area in the boxes' (metric) CRS.
    """
    if not boxes:
        return []
    import shapely

    polys = [b.polygon for b in boxes]
    parent = list(range(len(boxes)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    left, right = shapely.STRtree(polys).query(polys, predicate="intersects")
    for i, j in zip(left.tolist(), right.tolist(), strict=True):
        a, b = boxes[i], boxes[j]
        if i >= j or a.window == b.window or a.label != b.label:
            continue
        strip = footprints[a.window].intersection(footprints[b.window])
        if strip.is_empty:
            continue
        if _iou(a.polygon.intersection(strip), b.polygon.intersection(strip)) >= iou_threshold:
            parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(boxes)):
        groups.setdefault(find(i), []).append(i)
    candidates = []
    for members in groups.values():
        first = boxes[members[0]]
        if len(members) == 1:  # seen by one chip only: down-weighted when cut by its border
            candidates.append((first.label, first.polygon, CUT_SCORE if first.cut else 1.0))
        else:  # confirmed by neighbouring chips: one whole object
            union = shapely.union_all([boxes[m].polygon for m in members]).envelope
            candidates.append((first.label, union, 1.0))
    return _nms(candidates, iou_threshold)


def _iou(a: Any, b: Any) -> float:
    if a.is_empty or b.is_empty:
        return 0.0
    inter = a.intersection(b).area
    union = a.area + b.area - inter
    return float(inter / union) if union > 0 else 0.0


def _nms(
    candidates: list[tuple[str, Any, float]], iou_threshold: float
) -> list[tuple[str, Any, float]]:
    """Class-aware NMS; an R-tree limits the IoU tests to boxes that touch."""
    import shapely

    order = sorted(candidates, key=lambda c: (-c[2], -c[1].area))
    tree = shapely.STRtree([c[1] for c in order])
    suppressed = [False] * len(order)
    kept = []
    for i, (label, poly, score) in enumerate(order):
        if suppressed[i]:
            continue
        kept.append((label, poly, score))
        for j in tree.query(poly, predicate="intersects").tolist():
            same = j > i and not suppressed[j] and order[j][0] == label
            if same and _iou(poly, order[j][1]) >= iou_threshold:
                suppressed[j] = True
    return kept


__all__ = [
    "AnswerFn",
    "ScanError",
    "ScanResult",
    "Window",
    "chip_boxes",
    "engine_answer_fn",
    "grid_windows",
    "merge_boxes",
    "metric_crs",
    "scan",
]
