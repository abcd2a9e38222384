"""The Ray engine: a Ray Data pipeline from rasters to answered windows.

    rasters ──flat_map──> windows ──map_batches (tasks)──> chips ──map_batches (actor pool)──> boxes
    (one row each)        (listed per raster,              (read through `tiles`,     (one model per
                          lazily, as the pipeline runs)     window by window)          actor)

The driver iterates the pipeline's output and commits it to the run folder
(`rsvlm.scanning.store`): the output is small (boxes as text), the chips never leave the
cluster's object store. Ray Data streams: reading runs ahead of the model only as far as its
backpressure allows, so memory stays flat however many windows there are.

**Resources.** Model actors take ``num_gpus=1`` each when the cluster has GPUs (one actor per
GPU by default), CPU actors otherwise. Chip reading and window listing are light tasks
(`READ_CPUS` each); CPU actors leave that much room on their node, or the pipeline would wait
forever for a CPU to read with.

**Faults.** Actors run with ``max_restarts=-1`` and ``max_task_retries=-1``: an actor that
dies (killed, out of memory, node lost) is restarted, its model rebuilt, and the batch it was
answering is retried there. Every batch is first recorded in a small ledger actor, so the run
can say how many windows were retried. An exception inside the model fails only that batch's
windows (reported; a resumed run tries them again), not the run.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from functools import partial
from typing import Any

from rsvlm.scan import ScanError
from rsvlm.scanning.job import ScanJob, Tick
from rsvlm.scanning.plan import Grid, RasterPlan, list_windows
from rsvlm.scanning.store import PartWriter
from rsvlm.scanning.windows import ChipReader, WindowAnswerer, raster_lookup

logger = logging.getLogger(__name__)

#: CPU share of one window-listing or chip-reading task.
READ_CPUS = 0.1
#: Threads per CPU actor when nobody says (torch's sweet spot on one model is a few cores).
CPU_ACTOR_THREADS = 4


@dataclass
class RayOptions:
    """How to use the cluster (every field has a default that fits the cluster found)."""

    address: str | None = None  # None: start a local Ray with this machine's cores
    actors: int | None = None  # default: one per GPU, else one per CPU_ACTOR_THREADS cores
    cpus_per_actor: float | None = None
    gpus_per_actor: float | None = None  # default 1 when the cluster has GPUs, else 0
    object_store_mb: int | None = None  # local Ray only
    # Every actor is up before the first window is handed out: otherwise the first actor to
    # start takes the whole scan while the others load, and a cluster too small for the pool
    # fails with a clear timeout instead of running on one actor.
    actor_start_timeout_s: int = 600


def ensure_ray(options: RayOptions) -> Any:
    """Join the cluster at ``options.address``, reuse a running session, or start a local one."""
    try:
        import ray
    except ImportError as exc:
        raise ScanError(
            "--engine ray needs Ray: pip install 'rsvlm[distributed]'."
        ) from exc
    if ray.is_initialized():
        return ray
    if options.address:
        ray.init(address=options.address, log_to_driver=False)
    else:
        kwargs: dict[str, Any] = {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}
        if options.object_store_mb:
            kwargs["object_store_memory"] = int(options.object_store_mb) * 2**20
        ray.init(log_to_driver=False, **kwargs)
    return ray


def actor_resources(cluster: dict[str, float], options: RayOptions) -> dict[str, Any]:
    """Actors, and the resources and torch threads of each, for this cluster."""
    gpus = float(cluster.get("GPU", 0))
    cpus = float(cluster.get("CPU", 1))
    per_gpu = options.gpus_per_actor if options.gpus_per_actor is not None else (1.0 if gpus else 0)
    if per_gpu > 0:
        if gpus < per_gpu:
            raise ScanError(f"Actors of {per_gpu} GPU need GPUs; the cluster has {gpus:g}.")
        actors = options.actors or max(1, int(gpus // per_gpu))
        per_cpu = options.cpus_per_actor or 1.0
    else:
        actors = options.actors or max(1, int(cpus // CPU_ACTOR_THREADS))
        # Leave room for the reading tasks on every node, or they never get a CPU.
        per_cpu = options.cpus_per_actor or max(0.1, cpus / actors - 2 * READ_CPUS)
    if actors < 1:
        raise ScanError(f"--actors must be at least 1, got {actors!r}")
    return {
        "actors": int(actors),
        "num_cpus": float(per_cpu),
        "num_gpus": float(per_gpu),
        "threads": max(1, round(per_cpu)),
    }


def _make_ledger(ray: Any) -> Any:
    @ray.remote(num_cpus=0)
    class WindowLedger:
        """How often each window reached an actor (more than once: it was retried)."""

        def __init__(self) -> None:
            self.counts: dict[tuple[int, int], int] = {}

        def record(self, keys: list[tuple[int, int]]) -> None:
            for key in keys:
                self.counts[tuple(key)] = self.counts.get(tuple(key), 0) + 1

        def retried(self) -> int:
            return sum(c - 1 for c in self.counts.values())

    return WindowLedger.remote()


def _windows_of(
    row: dict[str, Any], plans: dict[int, RasterPlan], grid: Grid, done: set[tuple[int, int]]
) -> list[dict[str, Any]]:
    plan = plans[int(row["raster"])]
    return [w for w in list_windows(plan, grid) if (plan.id, w["window"]) not in done]


def run_ray(
    job: ScanJob,
    writer: PartWriter,
    tick: Tick,
    cancel: threading.Event | None = None,
    options: RayOptions | None = None,
) -> dict[str, Any]:
    """Scan ``job``'s remaining windows on Ray; returns engine facts for the summary."""
    options = options or RayOptions()
    ensure_ray(options)
    import ray
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # the run has its own progress
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the run shows one bar for the whole scan
    context.execution_options.preserve_order = False
    if context.wait_for_min_actors_s <= 0:  # a value the user set for the cluster is kept
        context.wait_for_min_actors_s = options.actor_start_timeout_s
    res = actor_resources(ray.cluster_resources(), options)
    logger.info(
        "ray: %d actor(s), %g CPU / %g GPU / %d thread(s) each",
        res["actors"], res["num_cpus"], res["num_gpus"], res["threads"],
    )  # fmt: skip
    uris, rasters = raster_lookup(job.plans)
    ledger = _make_ledger(ray)
    plans = {p.id: p for p in job.plans}
    todo = [{"raster": p.id} for p in job.plans if p.windows > 0]
    if not todo:
        return {"cancelled": False, "retried": 0, **res}
    ds = ray.data.from_items(todo, override_num_blocks=len(todo))
    ds = ds.flat_map(partial(_windows_of, plans=plans, grid=job.grid, done=job.done),
                     num_cpus=READ_CPUS)  # fmt: skip
    ds = ds.map_batches(
        ChipReader(uris, job.model_size),
        batch_size=job.batch_size,
        batch_format="numpy",
        num_cpus=READ_CPUS,
    )
    ds = ds.map_batches(
        WindowAnswerer,
        fn_constructor_kwargs={
            "factory": job.answerer,
            "rasters": rasters,
            "question": job.question,
            "margin_frac": job.margin_frac,
            "ledger": ledger,
            "threads": res["threads"],
        },
        batch_size=job.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=res["actors"]),
        num_cpus=res["num_cpus"],
        num_gpus=res["num_gpus"] or None,
        max_restarts=-1,
        max_task_retries=-1,
    )
    cancelled = False
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        tick(writer.consume(batch))
        if cancel is not None and cancel.is_set():
            cancelled = True
            break
    retried = int(ray.get(ledger.retried.remote()))
    ray.kill(ledger)
    return {"cancelled": cancelled, "retried": retried, **res}
