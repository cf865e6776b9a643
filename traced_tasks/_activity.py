"""What runs now and what failed lately, in this process (Activity) and as the task console shows it, for one process
or several (View). And the runs a test captures."""

from __future__ import annotations

import collections
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

MAX_FAILURES = 50
# Runs in progress listed one by one, the oldest first; the others are counted per task.
MAX_LISTED = 100


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
    def task(self) -> str:
        """Its task's name, `module.qualname`."""

    @property
    def values(self) -> tuple[str, ...]:
        """Its metric label values: (task,) or, with the route label, (task, route)."""

    @property
    def route(self) -> str | None: ...

    @property
    def started_at(self) -> float: ...


@dataclass(frozen=True)
class Listed:
    """A run in progress as the console lists it: its task's name and label, route, start and process."""

    task: str
    label: str  # the task label value: the name, or __overflow__ past the cap
    route: str | None
    started_at: float
    pid: int


@dataclass
class View:
    """The runs in progress and the recent failures of one process or several, bounded: the oldest MAX_LISTED runs
    one by one, all of them counted per task label, and the last MAX_FAILURES failures. And the task labels whose
    runs are handed to an engine, with the engine's name: they start, and are counted, where the engine runs them."""

    listed: list[Listed] = field(default_factory=list)  # oldest first
    by_label: dict[str, tuple[int, float]] = field(default_factory=dict)  # runs in progress, oldest start
    failures: list[TaskRun] = field(default_factory=list)  # newest first
    handed_off: dict[str, str] = field(default_factory=dict)  # task label: engine

    @property
    def running(self) -> int:
        return sum(count for count, _ in self.by_label.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "listed": [asdict(run) for run in self.listed],
            "by_label": {label: list(entry) for label, entry in self.by_label.items()},
            "failures": [asdict(run) for run in self.failures],
            "handed_off": self.handed_off,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> View:
        return cls(
            [Listed(**run) for run in data["listed"]],
            {label: (int(count), float(oldest)) for label, (count, oldest) in data["by_label"].items()},
            [TaskRun(**run) for run in data["failures"]],
            dict(data.get("handed_off", {})),
        )

    @classmethod
    def merge(cls, views: Iterable[View]) -> View:
        merged = cls()
        for view in views:
            merged.listed.extend(view.listed)
            merged.failures.extend(view.failures)
            merged.handed_off.update(view.handed_off)
            for label, (count, oldest) in view.by_label.items():
                total, first = merged.by_label.get(label, (0, oldest))
                merged.by_label[label] = (total + count, min(first, oldest))
        merged.listed = sorted(merged.listed, key=lambda run: run.started_at)[:MAX_LISTED]
        merged.failures = sorted(merged.failures, key=lambda run: run.finished_at, reverse=True)[:MAX_FAILURES]
        return merged


class Activity:
    """The runs in progress and the last failures of one configuration, in this process.

    Updated from the event loop and from threadpool threads without a lock: in CPython, setting a dict's key,
    dict.pop, dict.copy, deque.append and list(deque) are each atomic.
    """

    def __init__(self) -> None:
        self.running: dict[Running, bool] = {}
        self.failures: collections.deque[TaskRun] = collections.deque(maxlen=MAX_FAILURES)
        self.handed_off: dict[str, str] = {}  # one entry per task label, so as bounded as the labels

    def view(self) -> View:
        pid = os.getpid()
        runs = sorted(self.running.copy(), key=lambda run: run.started_at)
        by_label: dict[str, tuple[int, float]] = {}
        for run in runs:
            count, oldest = by_label.get(run.values[0], (0, run.started_at))
            by_label[run.values[0]] = (count + 1, oldest)
        listed = [Listed(run.task, run.values[0], run.route, run.started_at, pid) for run in runs[:MAX_LISTED]]
        return View(listed, by_label, list(self.failures)[::-1], self.handed_off.copy())


# The lists of the capture_tasks() blocks open now, in any configuration.
captures: list[list[TaskRun]] = []
