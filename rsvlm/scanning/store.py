"""A scan's run folder: partitioned GeoParquet of raw boxes and the manifest that makes it resumable.

    RUN_DIR/
      run.json          what is scanned and how (question, grid, model, the raster plan)
      parts/part-000001.parquet ...   raw boxes, GeoParquet, EPSG:4326, one part per flush
      manifest.jsonl    one line per committed flush: {"part": name | null, "windows": [[r, w], ...]}
      summary.json      the last run's summary

**Exactly once.** A flush writes its part to a temporary name, renames it into place, and only
then appends the manifest line (flushed and fsynced). A window is *finished* when a manifest line
names it, never earlier. After a kill:

* a part on disk that no manifest line names (killed between the rename and the append) is an
  orphan: `RunStore.open` deletes it, and its windows are scanned again;
* a torn last manifest line (killed mid-append) is ignored the same way;
* every window a line names is skipped by the resumed run and its boxes are read from the part.

So a window is never lost and never counted twice, and the merged output of a resumed run
equals that of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rsvlm.scan import ScanError
from rsvlm.scanning.plan import RasterPlan
from tiles.atomic import atomic_path
from tiles.grid import CUT_SCORE

logger = logging.getLogger(__name__)

RUN_VERSION = 1
#: Raw box columns of a part (besides ``geometry``, EPSG:4326).
PART_COLUMNS = (
    "label", "score", "cut", "source", "raster", "window", "box", "area",
    "x0", "y0", "x1", "y1", "question",
)  # fmt: skip

Key = tuple[int, int]  # (raster id, window index)


def _fingerprint(params: dict[str, Any], plans: Sequence[RasterPlan]) -> str:
    """What must not change between a run and its resumption (the merge IoU may)."""
    body = {
        "params": {k: v for k, v in params.items() if k != "iou_threshold"},
        "rasters": [
            [p.uri, p.error == "", p.crs, list(p.bounds), p.area, [list(b) for b in p.neighbours]]
            for p in plans
        ],
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class RunStore:
    """The run folder; `open` it, then `commit` flushes and read back `parts`."""

    path: Path
    done: set[Key] = field(default_factory=set)
    parts: list[str] = field(default_factory=list)
    next_part: int = 1

    @property
    def manifest(self) -> Path:
        return self.path / "manifest.jsonl"

    @property
    def parts_dir(self) -> Path:
        return self.path / "parts"

    @classmethod
    def open(
        cls,
        path: str | Path,
        params: dict[str, Any],
        plans: Sequence[RasterPlan],
        *,
        restart: bool = False,
    ) -> RunStore:
        """Start a run in ``path``, or resume the one there when it scans the same thing."""
        store = cls(Path(path))
        store._lock()
        try:
            store._start(params, plans, restart)
        except BaseException:
            store.close()
            raise
        return store

    def _lock(self) -> None:
        """One writer per run folder: a second scan of it (a rerun while the first still runs)
        would interleave manifest lines. ``flock`` is released by the kernel when the holder
        dies, even by SIGKILL, so a killed run never leaves a stale lock."""
        import fcntl

        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.path / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise ScanError(
                f"Another scan is writing to {str(self.path)!r} right now; wait for it, stop "
                "it, or choose another --run-dir."
            ) from None

    def close(self) -> None:
        fd = getattr(self, "_lock_fd", None)
        if fd is not None:
            os.close(fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self, params: dict[str, Any], plans: Sequence[RasterPlan], restart: bool) -> None:
        store = self
        run_json = store.path / "run.json"
        fingerprint = _fingerprint(params, plans)
        if run_json.exists() and not restart:
            old = json.loads(run_json.read_text(encoding="utf-8"))
            if old.get("fingerprint") != fingerprint:
                raise ScanError(
                    f"{str(store.path)!r} holds a scan of other rasters or with other settings "
                    f"(question {old.get('params', {}).get('question')!r}); use --restart to "
                    "discard it, or another --run-dir."
                )
            store._load_manifest()
        else:
            store._clear()
            store.parts_dir.mkdir(parents=True, exist_ok=True)
            _atomic_text(
                run_json,
                json.dumps(
                    {
                        "version": RUN_VERSION,
                        "fingerprint": fingerprint,
                        "params": params,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "rasters": [p.to_dict() for p in plans],
                    },
                    indent=1,
                ),
            )

    def _clear(self) -> None:
        others = [p for p in self.path.iterdir() if p.name != ".lock"]
        if not (self.path / "run.json").exists() and others:
            raise ScanError(
                f"{str(self.path)!r} exists and is not a scan's run folder: choose another "
                "--run-dir (nothing there was touched)."
            )
        for part in self.parts_dir.glob("*.parquet") if self.parts_dir.exists() else []:
            part.unlink()
        for name in ("manifest.jsonl", "summary.json", "run.json"):
            (self.path / name).unlink(missing_ok=True)

    def _load_manifest(self) -> None:
        committed: set[str] = set()
        if self.manifest.exists():
            lines = self.manifest.read_text(encoding="utf-8").splitlines()
            for n, line in enumerate(lines):
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    if n == len(lines) - 1:  # torn by a kill mid-append: not committed
                        logger.warning("ignoring a torn last manifest line")
                        continue
                    raise ScanError(f"{self.manifest} line {n + 1} is damaged.") from None
                self.done.update((int(r), int(w)) for r, w in entry["windows"])
                if entry.get("part"):
                    committed.add(entry["part"])
                    self.parts.append(entry["part"])
            self._rewrite_manifest(lines)
        numbers = [0]
        for part in sorted(self.parts_dir.glob("part-*.parquet")):
            if part.name not in committed:  # renamed into place, killed before its manifest line
                logger.warning("removing %s: it was never committed", part.name)
                part.unlink()
            else:
                numbers.append(int(part.stem.split("-")[1]))
        for tmp in self.parts_dir.glob(".*"):
            tmp.unlink()
        self.next_part = max(numbers) + 1

    def _rewrite_manifest(self, lines: list[str]) -> None:
        """Drop a torn last line, so the next append starts on a line of its own."""
        good = []
        for line in lines:
            try:
                json.loads(line)
                good.append(line)
            except json.JSONDecodeError:
                pass
        if len(good) != len(lines):
            _atomic_text(self.manifest, "".join(f"{line}\n" for line in good))

    def commit(self, windows: Sequence[Key], rows: list[dict[str, Any]]) -> str | None:
        """Write one part (when there are boxes) and record ``windows`` as finished."""
        name = None
        if rows:
            name = f"part-{self.next_part:06d}.parquet"
            self.next_part += 1
            _write_part(rows, self.parts_dir / name)
            self.parts.append(name)
        line = json.dumps({"part": name, "windows": [list(k) for k in windows]})
        with open(self.manifest, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.done.update(windows)
        return name

    def read_parts(self) -> Any:
        """Every committed raw box as one GeoDataFrame (EPSG:4326), in a stable order."""
        import geopandas as gpd
        import pandas as pd

        frames = [gpd.read_parquet(self.parts_dir / name) for name in self.parts]
        if not frames:
            return gpd.GeoDataFrame(
                {c: [] for c in PART_COLUMNS}, geometry=gpd.GeoSeries([], crs="EPSG:4326")
            )
        frame = gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs="EPSG:4326")
        return frame.sort_values(["raster", "window", "box"], kind="stable", ignore_index=True)

    def write_summary(self, summary: dict[str, Any]) -> Path:
        return _atomic_text(self.path / "summary.json", json.dumps(summary, indent=1))


def _atomic_text(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def _write_part(rows: list[dict[str, Any]], path: Path) -> None:
    import geopandas as gpd
    import shapely

    geoms = shapely.from_wkb([r["wkb"] for r in rows])
    columns = {c: [r[c] for r in rows] for c in PART_COLUMNS}
    frame = gpd.GeoDataFrame(columns, geometry=gpd.GeoSeries(geoms, crs="EPSG:4326"))
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


class PartWriter:
    """Collects answered windows and commits them in parts of about ``flush_windows`` windows.

    It also keeps the run's counts: windows read, failed (with why), duplicates dropped (a
    window seen twice is written once), raw boxes, and per-process peak memory.
    """

    def __init__(
        self,
        store: RunStore,
        plans: Sequence[RasterPlan],
        question: str,
        *,
        flush_windows: int = 64,
        flush_seconds: float = 30.0,
    ) -> None:
        self.store = store
        self.plans = {p.id: p for p in plans}
        self.question = question
        self.flush_windows = max(1, flush_windows)
        self.flush_seconds = flush_seconds
        self.pending: list[Key] = []
        self.pending_set: set[Key] = set()
        self.rows: list[dict[str, Any]] = []
        self.failed: dict[Key, str] = {}
        self.read = self.duplicates = self.raw_boxes = 0
        self.model_seconds = self.model_cpu_seconds = 0.0
        self.rss_mb: dict[int, float] = {}
        self._last_flush = time.monotonic()

    def consume(self, batch: dict[str, Any]) -> int:
        """Take one answered batch; returns how many windows it finished or failed."""
        seen = 0
        for i in range(len(batch["raster"])):
            key = (int(batch["raster"][i]), int(batch["window"][i]))
            pid = int(batch["pid"][i])
            self.rss_mb[pid] = max(self.rss_mb.get(pid, 0.0), float(batch["rss_mb"][i]))
            if key in self.store.done or key in self.pending_set:
                self.duplicates += 1
                continue
            seen += 1
            error = str(batch["error"][i])
            if error:
                self.failed[key] = error
                continue
            self.failed.pop(key, None)
            self.read += 1
            self.model_seconds += float(batch["seconds"][i])
            self.model_cpu_seconds += float(batch["cpu_seconds"][i])
            self.pending.append(key)
            self.pending_set.add(key)
            bounds = {k: float(batch[k][i]) for k in ("x0", "y0", "x1", "y1")}
            self._add_boxes(key, bounds, json.loads(str(batch["boxes"][i])))
        if len(self.pending) >= self.flush_windows or (
            self.pending and time.monotonic() - self._last_flush >= self.flush_seconds
        ):
            self.flush()
        return seen

    def _add_boxes(
        self, key: Key, bounds: dict[str, float], boxes: Iterable[dict[str, Any]]
    ) -> None:
        plan = self.plans[key[0]]
        for n, b in enumerate(boxes):
            self.rows.append(
                {
                    "wkb": b["wkb"],
                    "label": b["label"],
                    "score": CUT_SCORE if b["cut"] else 1.0,
                    "cut": bool(b["cut"]),
                    "source": plan.name,
                    "raster": key[0],
                    "window": key[1],
                    "box": n,
                    "area": plan.area,
                    **bounds,
                    "question": self.question,
                }
            )
            self.raw_boxes += 1

    def flush(self) -> None:
        if self.pending:
            self.store.commit(self.pending, self.rows)
        self.pending, self.pending_set, self.rows = [], set(), []
        self._last_flush = time.monotonic()
