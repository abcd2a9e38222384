"""The local engine: the same stages as the Ray pipeline, run one after the other in this process."""

from __future__ import annotations

import threading
from itertools import chain, islice
from typing import Any

import numpy as np

from rsvlm.scanning.job import ScanJob, Tick
from rsvlm.scanning.store import PartWriter
from rsvlm.scanning.windows import WINDOW_COLUMNS, ChipReader, WindowAnswerer, raster_lookup


def _columns(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    return {k: np.asarray([r[k] for r in rows]) for k in WINDOW_COLUMNS}


def run_local(
    job: ScanJob, writer: PartWriter, tick: Tick, cancel: threading.Event | None = None
) -> dict[str, Any]:
    """Scan ``job``'s remaining windows in batches; returns engine facts for the summary."""
    uris, rasters = raster_lookup(job.plans)
    reader = ChipReader(uris, job.model_size)
    answerer = WindowAnswerer(job.answerer, rasters, job.question, job.margin_frac)
    # Batches run across raster boundaries (as the Ray pipeline's do): small rasters still fill
    # a batch, and every batch is the size the user chose.
    windows = chain.from_iterable(job.todo(plan) for plan in job.plans)
    while chunk := list(islice(windows, job.batch_size)):
        if cancel is not None and cancel.is_set():
            return {"cancelled": True}
        tick(writer.consume(answerer(reader(_columns(chunk)))))
    return {"cancelled": False}
