"""`ScanJob`: everything an engine needs to scan the windows a run has not finished yet."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from rsvlm.scanning.plan import Grid, RasterPlan, list_windows

#: Called with the number of windows just finished (read or failed).
Tick = Callable[[int], None]


@dataclass
class ScanJob:
    plans: list[RasterPlan]  # the rasters that opened
    grid: Grid
    model_size: int
    question: str
    margin_frac: float
    batch_size: int
    answerer: Callable[[], Any]  # picklable factory -> AnswerFn
    done: set[tuple[int, int]] = field(default_factory=set)

    def todo(self, plan: RasterPlan) -> Iterator[dict[str, Any]]:
        """The windows of ``plan`` not finished by an earlier (killed) run."""
        for row in list_windows(plan, self.grid):
            if (plan.id, row["window"]) not in self.done:
                yield row

    def remaining(self) -> int:
        ids = {p.id for p in self.plans}
        done = sum(1 for r, _ in self.done if r in ids)
        return sum(p.windows for p in self.plans) - done
