"""The two per-window stages both engines run: read chips, then answer and parse.

Both work on *batches*: dicts of equal-length columns (what Ray Data hands a ``map_batches``
function in its ``numpy`` format), so the local engine and the Ray engine run the very same
code and differ only in who calls it.

* `ChipReader` (a Ray task): opens each raster of the batch once through `tiles` and reads the
  windows (windowed reads: never a whole raster). A window that cannot be read gets an
  ``error`` and no pixels; the run counts it as failed.
* `WindowAnswerer` (one per Ray actor, so one model per actor): builds its model once from a
  picklable *answerer factory* (`rsvlm.scanning.models`), answers a batch of chips in one
  call, and turns each answer into boxes in EPSG:4326 with their *cut* flag (the rule of
  `rsvlm.scan`), as one JSON string per window.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from rsvlm.scanning.plan import RasterPlan, open_raster, outer_flags

logger = logging.getLogger(__name__)

Batch = dict[str, Any]
AnswererFactory = Callable[[], Callable[[list[Any], str], list[str]]]

WINDOW_COLUMNS = ("raster", "window", "x0", "y0", "x1", "y1", "outer")


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".strip(": ")


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class ChipReader:
    """Batch of window rows -> the same rows plus ``pixels``, ``transform`` and ``error``."""

    def __init__(self, uris: Mapping[int, str], model_size: int) -> None:
        self.uris = dict(uris)
        self.model_size = int(model_size)

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["raster"])
        pixels = np.empty(n, dtype=object)
        transforms = np.zeros((n, 6), dtype=np.float64)
        errors = np.full(n, "", dtype=object)
        sources: dict[int, Any] = {}
        try:
            for i in range(n):
                rid = int(batch["raster"][i])
                bounds = tuple(float(batch[k][i]) for k in ("x0", "y0", "x1", "y1"))
                try:
                    if rid not in sources:
                        sources[rid] = open_raster(self.uris[rid])
                    source = sources[rid]
                    chip = source.chip(bounds, crs=source.crs, size=self.model_size)
                    pixels[i] = chip.pixels
                    transforms[i] = tuple(chip.transform)[:6]
                except Exception as exc:  # a bad block or a vanished file fails this window only
                    errors[i] = _error_text(exc)
                    pixels[i] = np.zeros((0, 0, 3), dtype=np.uint8)
        finally:
            for source in sources.values():
                source.close()
        out = {k: np.asarray(batch[k]) for k in WINDOW_COLUMNS}
        out.update(pixels=pixels, transform=transforms, error=errors)
        return out


class WindowAnswerer:
    """One model (built once from ``factory``) answering batches of chips.

    ``ledger`` (optional, a Ray actor handle) is told which windows this actor starts before
    it answers them, so the run can count windows that were retried after an actor died.
    """

    def __init__(
        self,
        factory: AnswererFactory,
        rasters: Mapping[int, tuple[str, str]],
        question: str,
        margin_frac: float,
        ledger: Any = None,
        threads: int | None = None,
    ) -> None:
        if threads:
            import torch

            torch.set_num_threads(max(1, int(threads)))
        self.answer = factory()
        from tiles.geometry import as_crs

        self.rasters = {rid: (as_crs(crs), name) for rid, (crs, name) in rasters.items()}
        self.question = question
        self.margin_frac = float(margin_frac)
        self.ledger = ledger

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["raster"])
        keys = [(int(batch["raster"][i]), int(batch["window"][i])) for i in range(n)]
        if self.ledger is not None:
            import ray

            ray.get(self.ledger.record.remote(keys))
        errors = [str(e) for e in batch["error"]]
        boxes = ["[]"] * n
        answers = [""] * n
        todo = [i for i in range(n) if not errors[i]]
        t0, c0 = time.perf_counter(), time.process_time()
        chips = [self._chip(batch, i) for i in todo]
        if chips:
            try:
                texts = self.answer(chips, self.question)
                if len(texts) != len(chips):
                    raise ValueError(f"{len(texts)} answers for {len(chips)} chips")
            except Exception as exc:  # the model failed this batch: its windows fail, run goes on
                logger.warning("answering %d chips failed: %s", len(chips), exc)
                texts = None
                for i in todo:
                    errors[i] = f"model: {_error_text(exc)}"
            if texts is not None:
                for i, chip, text in zip(todo, chips, texts, strict=True):
                    answers[i] = text
                    boxes[i] = self._boxes(batch, i, chip, text)
        return {
            **{k: np.asarray(batch[k]) for k in WINDOW_COLUMNS},
            "error": np.asarray(errors, dtype=object),
            "boxes": np.asarray(boxes, dtype=object),
            "answer": np.asarray(answers, dtype=object),
            "seconds": np.full(n, (time.perf_counter() - t0) / max(1, n)),
            # CPU seconds of this process (all its threads): what a window costs, whatever
            # share of a busy machine the process got
            "cpu_seconds": np.full(n, (time.process_time() - c0) / max(1, n)),
            "pid": np.full(n, os.getpid(), dtype=np.int64),
            "rss_mb": np.full(n, peak_rss_mb()),
        }

    def _chip(self, batch: Batch, i: int) -> Any:
        from tiles import Chip

        crs, name = self.rasters[int(batch["raster"][i])]
        pixels = np.ascontiguousarray(batch["pixels"][i], dtype=np.uint8)
        return Chip.from_coefficients(pixels, crs, batch["transform"][i], source=name)

    def _boxes(self, batch: Batch, i: int, chip: Any, text: str) -> str:
        import shapely

        from rsvlm.scan import chip_boxes
        from tiles.geometry import LONLAT
        from tiles.grid import Window

        window = Window(
            index=int(batch["window"][i]),
            bounds=tuple(float(batch[k][i]) for k in ("x0", "y0", "x1", "y1")),
            outer=outer_flags(int(batch["outer"][i])),
        )
        margin = max(chip.width, chip.height) * self.margin_frac
        found = chip_boxes(window, chip, text, LONLAT, margin)
        return json.dumps(
            [{"label": b.label, "cut": bool(b.cut), "wkb": shapely.to_wkb(b.polygon, hex=True)}
             for b in found]
        )


def raster_lookup(plans: list[RasterPlan]) -> tuple[dict[int, str], dict[int, tuple[str, str]]]:
    """``(uris, (crs, name))`` by raster id, for the two stages' constructors."""
    good = [p for p in plans if not p.error]
    return {p.id: p.uri for p in good}, {p.id: (p.crs, p.name) for p in good}
