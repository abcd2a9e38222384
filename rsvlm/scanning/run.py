"""`scan_rasters`: one question over many rasters, on this machine or on a Ray cluster.

    from rsvlm.scanning import scan_rasters, ModelAnswerer
    summary = scan_rasters("city_tiles/", "find all buildings", answerer=ModelAnswerer(),
                           engine="ray", out="buildings.parquet")

Steps: list the rasters (`sources`), read their headers and group them into areas (`plan`),
open or resume the run folder (`store`), scan the windows not yet finished with the chosen
engine (`local` / `ray_engine`), merge the committed boxes per area (`merge`) and write the
output (`output`). The summary (a dict, also ``RUN_DIR/summary.json``) counts rasters,
windows read / failed / retried / skipped as already done, raw boxes and detections written.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rsvlm.scan import ScanError
from rsvlm.scanning.job import ScanJob
from rsvlm.scanning.output import merge_raw, output_format, write_detections
from rsvlm.scanning.plan import Grid, RasterPlan, plan_rasters, seam_margin
from rsvlm.scanning.sources import RasterRef, list_rasters
from rsvlm.scanning.store import PartWriter, RunStore

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
ENGINES = ("local", "ray")
MAX_LISTED_FAILURES = 50


class RunProgress:
    """Windows done of the whole run, windows/s and ETA: a bar on a terminal, log lines else."""

    def __init__(self, total: int, done: int, enabled: bool, callback: Progress | None) -> None:
        self.total, self.done, self.callback = total, done, callback
        self.start, self.start_done = time.monotonic(), done
        self._last_log = 0.0
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="win", desc="scan", file=sys.stderr)
        self.log = enabled and self.bar is None

    def __call__(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.log and time.monotonic() - self._last_log >= 10:
            self._last_log = time.monotonic()
            rate = self.rate
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            print(
                f"scan: {self.done}/{self.total} windows, {rate:.2f} windows/s, "
                f"ETA {eta / 60:.1f} min",
                file=sys.stderr,
            )
        if self.callback is not None:
            self.callback(self.done, self.total)

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.start
        return (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _refs(inputs: str | Path | Sequence[str | Path | RasterRef], asset: str | None) -> list:
    if isinstance(inputs, str | Path):
        return list_rasters(inputs, asset=asset)
    refs: list[RasterRef] = []
    for item in inputs:
        refs += [item] if isinstance(item, RasterRef) else list_rasters(item, asset=asset)
    return refs


def scan_rasters(
    inputs: str | Path | Sequence[str | Path | RasterRef],
    question: str,
    *,
    answerer: Callable[[], Any],
    engine: str = "local",
    out: str | Path | None = None,
    out_format: str | None = None,
    run_dir: str | Path | None = None,
    asset: str | None = None,
    chip_size: int = 512,
    model_size: int | None = None,
    overlap: float = 0.125,
    batch_size: int = 4,
    iou_threshold: float = 0.5,
    border_px: float | None = None,
    restart: bool = False,
    ray_options: Any = None,
    flush_windows: int = 64,
    show_progress: bool = False,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    model_label: str = "",
) -> dict[str, Any]:
    """Scan every window of every raster in ``inputs``; returns the run summary.

    ``answerer``: a picklable factory returning an answer function (`rsvlm.scanning.models`).
    ``out``: the merged detections (format from the suffix, or ``out_format``); without it only
    the run folder's partitioned GeoParquet is written. ``run_dir`` defaults to ``OUT.scan``.
    A run folder of the same scan is resumed (``restart`` discards it).
    """
    t0 = time.perf_counter()
    question = _check(question, engine, batch_size, iou_threshold, out, run_dir)
    fmt = output_format(out, out_format == "gpkg") if out is not None else None
    run_dir = Path(run_dir) if run_dir is not None else Path(f"{out}.scan")
    grid = Grid(chip_size=int(chip_size), overlap=float(overlap))
    size = int(model_size or chip_size)
    margin_frac = seam_margin(grid.chip_size, size, border_px)
    plans, good, failed_rasters = _plan(inputs, asset, grid)
    params = {
        "question": question,
        "chip_size": grid.chip_size,
        "overlap": grid.overlap,
        "model_size": size,
        "border_px": border_px,
        "model": model_label or repr(answerer),
        "iou_threshold": iou_threshold,
    }
    with RunStore.open(run_dir, params, plans, restart=restart) as store:
        done = set(store.done)
        job = ScanJob(good, grid, size, question, margin_frac, batch_size, answerer, done)
        total = sum(p.windows for p in good)
        done_before = total - job.remaining()
        writer = PartWriter(store, plans, question, flush_windows=flush_windows)
        bar = RunProgress(total, done_before, show_progress, progress)
        if done_before:
            logger.info("resuming %s: %d of %d windows already done", run_dir, done_before, total)
        te = time.perf_counter()
        try:
            if done_before < total:
                facts = _run_engine(engine, job, writer, bar, cancel, ray_options)
            else:  # a finished run asked again: merge and write, no model to load
                facts = {"cancelled": False, "retried": 0, "actors": 0}
        finally:
            writer.flush()  # what was answered before a failure or Ctrl-C is kept
            bar.close()
        scan_s = time.perf_counter() - te
        written = None
        if out is not None and not facts.get("cancelled"):
            merged = merge_raw(store.read_parts(), plans, iou_threshold, margin_frac)
            write_detections(merged, out, fmt)
            written = len(merged)
        summary = _summary(
            engine, facts, plans, failed_rasters, writer, store, total, done_before, written,
            scan_s, time.perf_counter() - t0, out, run_dir, question,
        )  # fmt: skip
        store.write_summary(summary)
    return summary


def _plan(
    inputs: Any, asset: str | None, grid: Grid
) -> tuple[list[RasterPlan], list[RasterPlan], list[dict[str, str]]]:
    """All plans, the ones that opened, and what is wrong with the others."""
    plans = plan_rasters(_refs(inputs, asset), grid)
    good = [p for p in plans if not p.error]
    failed = [{"raster": p.uri, "name": p.name, "error": p.error} for p in plans if p.error]
    if not good:
        raise ScanError(
            f"None of the {len(plans)} raster(s) could be scanned: "
            + "; ".join(f"{f['name']}: {f['error']}" for f in failed[:5])
        )
    return plans, good, failed


def _check(
    question: str, engine: str, batch_size: int, iou: float, out: Any, run_dir: Any
) -> str:
    """The question, stripped; a `ScanError` naming the first bad argument."""
    question = (question or "").strip()
    if not question:
        raise ScanError('Say what to look for, e.g. "find all buildings".')
    if engine not in ENGINES:
        raise ScanError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if batch_size < 1:
        raise ScanError(f"batch size must be at least 1, got {batch_size!r}")
    if not 0 < iou <= 1:
        raise ScanError(f"iou_threshold must be in (0, 1], got {iou!r}")
    if out is None and run_dir is None:
        raise ScanError("Give an output file (--out) or a run folder (--run-dir).")
    return question


def _run_engine(
    engine: str,
    job: ScanJob,
    writer: PartWriter,
    tick: Callable[[int], None],
    cancel: threading.Event | None,
    ray_options: Any,
) -> dict[str, Any]:
    if engine == "ray":
        from rsvlm.scanning.ray_engine import run_ray

        return run_ray(job, writer, tick, cancel, ray_options)
    from rsvlm.scanning.local import run_local

    return {**run_local(job, writer, tick, cancel), "retried": 0, "actors": 1}


def _summary(
    engine: str,
    facts: dict[str, Any],
    plans: Sequence[RasterPlan],
    failed_rasters: list[dict[str, str]],
    writer: PartWriter,
    store: RunStore,
    total: int,
    done_before: int,
    written: int | None,
    scan_s: float,
    seconds: float,
    out: Any,
    run_dir: Path,
    question: str,
) -> dict[str, Any]:
    attempted = writer.read + len(writer.failed)
    finished = done_before + writer.read
    return {
        "engine": engine,
        "question": question,
        "complete": finished == total and not facts.get("cancelled"),
        "cancelled": bool(facts.get("cancelled")),
        "rasters": {
            "total": len(plans),
            "scanned": len(plans) - len(failed_rasters),
            "failed": failed_rasters,
        },
        "windows": {
            "total": total,
            "done_before": done_before,
            "read": writer.read,
            "failed": len(writer.failed),
            "retried": int(facts.get("retried", 0)),
            "duplicates_dropped": writer.duplicates,
            "remaining": total - finished,
        },
        "failures": [
            {"raster": plans[r].name, "window": w, "error": e}
            for (r, w), e in list(writer.failed.items())[:MAX_LISTED_FAILURES]
        ],
        "detections": {"raw_boxes": writer.raw_boxes, "written": written},
        "parts": len(store.parts),
        "seconds": round(seconds, 2),
        "windows_per_s": round(attempted / scan_s, 3) if scan_s > 0 else 0.0,
        "model_seconds_per_window": round(writer.model_seconds / writer.read, 3)
        if writer.read
        else None,
        "model_cpu_seconds_per_window": round(writer.model_cpu_seconds / writer.read, 3)
        if writer.read
        else None,
        "workers": {
            "actors": facts.get("actors"),
            "num_cpus": facts.get("num_cpus"),
            "num_gpus": facts.get("num_gpus"),
            "threads": facts.get("threads"),
            "peak_rss_mb": {str(pid): round(mb, 1) for pid, mb in sorted(writer.rss_mb.items())},
        },
        "out": str(out) if out is not None else None,
        "run_dir": str(run_dir),
    }
