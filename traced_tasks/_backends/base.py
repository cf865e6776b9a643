"""What every metrics backend is: the counts of a set of label values, the totals it gives the task console, and the
bodies most backends share."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from opentelemetry.trace import SpanContext
from prometheus_client import CollectorRegistry

from traced_tasks._activity import Activity, View


class TaskCounts(Protocol):
    """The counts of one set of label values: (task,) or, with the route label, (task, route).

    Each method is one event of a run, called once, in this order: schedule, then start and one of succeed or fail,
    or skip. `started_at` is the Unix time at which the run started, and `started_at + seconds` when it ended;
    `exemplar` is the span context of a sampled, recording span of the run; `oldest` is when the oldest run of these
    label values still in progress in this process started, this one included at its start, None when none is.
    Events of one set of label values come from many threads at once.
    """

    def schedule(self) -> None: ...

    def start(self, wait: float, started_at: float, oldest: float | None) -> None: ...

    def succeed(
        self, seconds: float, started_at: float, exemplar: SpanContext | None, oldest: float | None
    ) -> None: ...

    def fail(
        self,
        status: str,
        seconds: float,
        started_at: float,
        exemplar: SpanContext | None,
        exception: str | None,
        oldest: float | None,
    ) -> None:
        """A run that raised: status `error` with the exception label value, or `cancelled` with None."""

    def skip(self) -> None: ...


@dataclass
class TaskTotals:
    """The counts of one set of label values, summed over the processes a backend sees: what the console shows."""

    values: tuple[str, ...]
    bounds: Sequence[float]  # the buckets' upper bounds, without +Inf
    scheduled: float = 0.0
    skipped: float = 0.0
    started: float = 0.0  # runs whose wait was observed
    outcomes: dict[str, float] = field(default_factory=dict)  # runs ended, by status
    run_buckets: list[float] = field(default_factory=list)  # runs per bucket of run time (not cumulative), +Inf last
    wait_buckets: list[float] = field(default_factory=list)
    last_success: float = 0.0  # Unix time; 0 when never

    def __post_init__(self) -> None:
        size = len(self.bounds) + 1
        self.run_buckets = self.run_buckets or [0.0] * size
        self.wait_buckets = self.wait_buckets or [0.0] * size

    @property
    def task(self) -> str:
        return self.values[0]

    def add(self, other: TaskTotals) -> None:
        """Add the counts of the same task under another route."""
        self.scheduled += other.scheduled
        self.skipped += other.skipped
        self.started += other.started
        for status, count in other.outcomes.items():
            self.outcomes[status] = self.outcomes.get(status, 0.0) + count
        self.run_buckets = [a + b for a, b in zip(self.run_buckets, other.run_buckets, strict=True)]
        self.wait_buckets = [a + b for a, b in zip(self.wait_buckets, other.wait_buckets, strict=True)]
        self.last_success = max(self.last_success, other.last_success)


class Backend:
    """The metric families of one configuration. A backend implements counts(), totals() and registry(); the other
    bodies here fit one that counts this process only."""

    # Whether what it serves and shows is every process's (multiprocess mode), not this process's only.
    sees_all_processes = False

    def counts(self, values: tuple[str, ...]) -> TaskCounts:
        """The counts of a set of label values; called once for each set."""
        raise NotImplementedError

    def totals(self) -> list[TaskTotals]:
        """Every set of label values' counts now, taken at once."""
        raise NotImplementedError

    def registry(self) -> CollectorRegistry:
        """The registry `/metrics` serves: what the application registered, and traced_tasks' families."""
        raise NotImplementedError

    def open(self) -> None:
        """Register the families in the registry, all or none: ValueError when one of the names is taken."""

    def close(self) -> None:
        """Take the families out of the registry."""

    def known_task_names(self) -> set[str]:
        """Task label values other processes already count under, which count toward the cap of task names."""
        return set()

    def known_routes(self) -> set[str]:
        """Route label values other processes already count under, which count toward the cap of routes."""
        return set()

    def processes(self) -> int:
        """How many live processes' counts and runs it sees, this one included."""
        return 1

    def series_limit(self) -> int | None:
        """The most sets of label values it keeps apart, past which one more stands for the rest; None: no limit."""
        return None

    def process_ending(self) -> None:
        """This process ends, maybe without atexit: write what other processes read of it now."""

    def activity(self, local: Activity, stacks_after: float | None = None) -> View:
        """The runs in progress and recent failures of the processes it sees, `local` being this process's; with
        `stacks_after`, where each run in progress for longer than that many seconds waits."""
        return local.view(stacks_after, time.time())
