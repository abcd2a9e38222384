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
3. **Boxes to the map.** Boxes are grounded with `rsvlm.answer.ground` (parsed, turned into
   chip pixels and then, through the chip, into polygons) in a *metric* CRS: the raster's own
   when it is projected, otherwise the UTM zone of the scene's centre. All merging happens
   there, so IoU is measured on ground areas, not on degrees.
4. **Merging across chip borders** (`tiles.grid.merge_boxes`): a box near an inner chip edge is
   *cut*; boxes of neighbouring chips whose parts inside the shared strip agree are one object;
   a cut box no neighbour confirmed is down-weighted; class-aware NMS removes what is left over.

``progress(done, total)`` is called after each batch; ``cancel`` (a `threading.Event`) is
checked between batches, and a cancelled scan returns what it found so far with
`ScanResult.cancelled` set (the app shows partial results; the CLI writes them).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from rsvlm.answer import ground
from tiles.errors import ImageryError
from tiles.grid import ChipBox, Window, grid_windows, merge_detections, metric_crs

logger = logging.getLogger(__name__)

AnswerFn = Callable[[Sequence[Any], str], list[str]]
Progress = Callable[[int, int], None]


class ScanError(ValueError):
    """Bad scan input (no georeference, absurd chip size...); the message is for the user."""


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
# Answers
# ----------------------------------------------------------------------------------------------


def _perceived(engine: Any, chips: Sequence[Any], images: Sequence[Any], question: str
               ) -> list[str] | None:
    """The detector's answers (`rsvlm.perception`) when the engine has one and the question is
    about the objects it detects (as in a one-chip chat); None otherwise."""
    from rsvlm.answer import ground_sample_distance
    from rsvlm.perception import (
        PLACED_KINDS,
        area_question,
        asked_size,
        object_question,
        of_size,
        perception_answer,
    )

    perception = getattr(engine, "perception", None)
    if perception is None:
        return None
    labels = perception.config.answered
    counted = area_question(question, labels)
    # A scan merges boxes across borders: a count or presence question is answered by every
    # chip with its detections, and the scan's merged detections are the count.
    asked = ("find_all", counted[1]) if counted else object_question(question, labels)
    if asked is None:
        return None
    sized = asked_size(question) if asked[0] in PLACED_KINDS else None

    def found(chip: Any, im: Any) -> list[Any]:
        dets = perception.select(perception.detect(im, ground_sample_distance(chip, im.size)),
                                 asked[0], question)
        ground = getattr(chip, "ground_area_m2", None)
        if sized is not None and ground:  # "larger than 200 m²", as a one-chip chat reads it
            dets = of_size(dets, asked[1], sized, ground)
        return dets

    with engine.generation_lock:
        return [perception_answer(asked[0], asked[1], found(chip, im), im.size,
                                  ground_m2=getattr(chip, "ground_area_m2", None),
                                  question=question)
                for chip, im in zip(chips, images, strict=True)]


def engine_answer_fn(engine: Any, *, max_new_tokens: int = 256) -> AnswerFn:
    """Batched answers from a `rsvlm.engine.ChatEngine`'s model: one padded ``generate`` per batch.

    The prompt, retrieval and generation settings are the engine's, so a chip scanned here gets
    the answer a one-chip chat would (up to the numerics of padding).
    """
    if hasattr(engine, "answer_chips"):  # a pretrained family (rsvlm.backends.engine)
        return lambda chips, question: engine.answer_chips(chips, question,
                                                           max_new_tokens=max_new_tokens)
    import torch

    from rsvlm import prompting

    processor, model = engine.processor, engine.model
    tokenizer = processor.tokenizer
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )

    def answer(chips: Sequence[Any], question: str) -> list[str]:
        images = [c.to_image().convert("RGB") if hasattr(c, "to_image") else c for c in chips]
        perceived = _perceived(engine, chips, images, question)
        if perceived is not None:
            return perceived
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
            with engine.generation_lock, torch.inference_mode():  # one generation at a time on the model
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


def _check_inputs(source: Any, question: str, engine: Any, answer_fn: AnswerFn | None,
                  batch_size: int, iou_threshold: float) -> str:
    """The question, stripped; `ScanError` for what cannot be scanned."""
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
    return question


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
    from tiles.export import Detection

    question = _check_inputs(source, question, engine, answer_fn, batch_size, iou_threshold)
    answer = answer_fn or engine_answer_fn(engine, max_new_tokens=max_new_tokens)
    t0 = time.perf_counter()
    try:
        windows = grid_windows(source.bounds, _source_resolution(source), chip_size, overlap)
    except ImageryError as exc:
        raise ScanError(str(exc)) from None
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
    boxes, t_read, t_model = _answer_windows(source, windows, question, answer, result, metric,
                                             out_size, margin, batch_size, progress, cancel)
    result.raw_boxes = len(boxes)
    tc = time.perf_counter()
    name = getattr(source, "name", "")
    for label, polygon, score in merge_detections(boxes, windows, source.crs, metric,
                                                  iou_threshold):
        result.append(
            Detection(label=label, geometry=polygon, score=score, source=name, question=question)
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


def _answer_windows(source: Any, windows: list[Window], question: str, answer: AnswerFn,
                    result: ScanResult, metric: Any, out_size: int, margin: float,
                    batch_size: int, progress: Progress | None,
                    cancel: threading.Event | None) -> tuple[list[ChipBox], float, float]:
    """Read and answer the windows batch by batch; the boxes found, and the seconds spent
    reading and answering. Counts progress and cancellation on ``result``."""
    boxes: list[ChipBox] = []
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
            boxes += chip_boxes(window, chip, text, metric, margin)
        result.chips_done += len(batch)
        if progress is not None:
            progress(result.chips_done, len(windows))
    return boxes, t_read, t_model


def chip_boxes(window: Window, chip: Any, text: str, metric: Any, margin: float
               ) -> list[ChipBox]:
    """The boxes of one chip's answer as polygons in ``metric``, each marked cut or not.

    A box is cut when it comes within ``margin`` chip pixels of an edge that is not outer
    (``window.outer``); `rsvlm.scanning` calls this with map-wide outer edges (seams between
    rasters are not outer).
    """
    out = []
    w, h = chip.width, chip.height
    left, bottom, right, top = window.outer
    for box in ground(text, chip, crs=metric, unique=False):
        x1, y1, x2, y2 = box.box_px
        poly = box.geometry
        if x2 - x1 <= 0 or y2 - y1 <= 0 or poly is None or poly.is_empty:
            continue
        cut = (
            (x1 <= margin and not left)
            or (x2 >= w - margin and not right)
            or (y1 <= margin and not top)
            or (y2 >= h - margin and not bottom)
        )
        label = box.name.strip().lower() or "object"
        out.append(ChipBox(label, window.index, poly, cut))
    return out


__all__ = [
    "AnswerFn",
    "ScanError",
    "ScanResult",
    "Window",
    "chip_boxes",
    "engine_answer_fn",
    "grid_windows",  # re-exported from tiles.grid
    "metric_crs",
    "scan",
]
