"""What this process runs now and what failed lately: the task console shows them, and the in-process backend counts
the runs in progress from them. And the runs a test captures."""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Protocol

MAX_FAILURES = 50


@dataclass(frozen=True)
class TaskRun:
    """One run of a background task, as traced_tasks counted it.

    `task` is the task label (`module.qualname`), `status` one of `success`, `error`, `cancelled` or `skipped`,
    `exception` the exception's class name (never its message), `trace_id` the run's trace ID in hex when its span
    is sampled, `duration` the run time in seconds (0 when skipped), and `finished_at` the Unix time the run ended.
    """

    task: str
    status: str
    exception: str | None
    trace_id: str | None
    duration: float
    route: str | None
    finished_at: float


class Running(Protocol):
    """A run in progress."""

    @property
    def task(self) -> str: ...

    @property
    def values(self) -> tuple[str, ...]:
        """Its metric label values: (task,) or, with the route label, (task, route)."""

    @property
    def route(self) -> str | None: ...

    @property
    def started_at(self) -> float: ...


class Activity:
    """The runs in progress and the last failures of one configuration, in this process.

    Updated from the event loop and from threadpool threads without a lock: in CPython, setting a dict's key,
    dict.pop, dict.copy, deque.append and list(deque) are each atomic.
    """

    def __init__(self) -> None:
        self.running: dict[Running, bool] = {}  # in the order they started
        self.failures: collections.deque[TaskRun] = collections.deque(maxlen=MAX_FAILURES)

    def running_now(self) -> list[Running]:
        """The runs in progress, oldest first."""
        return sorted(self.running.copy(), key=lambda run: run.started_at)

    def recent_failures(self) -> list[TaskRun]:
        """The last failed or cancelled runs, newest first."""
        return list(self.failures)[::-1]


# The lists of the capture_tasks() blocks open now, in any configuration.
captures: list[list[TaskRun]] = []
