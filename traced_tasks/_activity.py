"""What runs now and what failed lately, in this process (Activity) and as the task console shows it, for one process
or several (View). And the runs a test captures."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

# Groups of failures kept, by task and exception class; the least recent goes first.
MAX_FAILURE_GROUPS = 50
# Trace IDs kept per group of failures, the latest.
MAX_TRACES = 3
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

    def trace_id(self) -> str | None: ...

    def where(self) -> list[str] | None:
        """Where it waits now, innermost last, as `file:line in function`; None when it cannot be told."""


@dataclass(frozen=True)
class Listed:
    """A run in progress as the console lists it: its task's name and label, route, start, process and trace, and
    where it waits, when that was asked for."""

    task: str
    label: str  # the task label value: the name, or __overflow__ past the cap
    route: str | None
    started_at: float
    pid: int
    trace_id: str | None = None
    where: list[str] | None = None


@dataclass(frozen=True)
class Failures:
    """The failures of one task with one exception class (or its cancelled runs): how many, the first and the last,
    the last one's route and run time, and the traces of the last few."""

    task: str
    status: str  # error or cancelled
    exception: str | None
    count: int
    first_at: float
    last_at: float
    route: str | None
    seconds: float
    traces: tuple[str, ...]

    @property
    def key(self) -> tuple[str, str, str | None]:
        return (self.task, self.status, self.exception)

    def merge(self, other: Failures) -> Failures:
        newer, older = (other, self) if other.last_at >= self.last_at else (self, other)
        return replace(
            newer,
            count=self.count + other.count,
            first_at=min(self.first_at, other.first_at),
            traces=(*older.traces, *newer.traces)[-MAX_TRACES:],
        )

    @classmethod
    def of(cls, run: TaskRun) -> Failures:
        traces = () if run.trace_id is None else (run.trace_id,)
        return cls(
            run.task, run.status, run.exception, 1, run.finished_at, run.finished_at, run.route, run.duration, traces
        )


def group(failures: Iterable[Failures]) -> list[Failures]:
    """Groups of the same key merged, the latest first, at most MAX_FAILURE_GROUPS."""
    merged: dict[tuple[str, str, str | None], Failures] = {}
    for found in failures:
        known = merged.get(found.key)
        merged[found.key] = found if known is None else known.merge(found)
    return sorted(merged.values(), key=lambda found: found.last_at, reverse=True)[:MAX_FAILURE_GROUPS]


@dataclass
class View:
    """The runs in progress and the recent failures of one process or several, bounded: the oldest MAX_LISTED runs
    one by one, all of them counted per task label, and the last MAX_FAILURE_GROUPS groups of failures. And the task
    labels whose runs are handed to an engine, with the engine's name: they start, and are counted, where the engine
    runs them."""

    listed: list[Listed] = field(default_factory=list)  # oldest first
    by_label: dict[str, tuple[int, float]] = field(default_factory=dict)  # runs in progress, oldest start
    failures: list[Failures] = field(default_factory=list)  # latest first
    handed_off: dict[str, str] = field(default_factory=dict)  # task label: engine

    @property
    def running(self) -> int:
        return sum(count for count, _ in self.by_label.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "listed": [asdict(run) for run in self.listed],
            "by_label": {label: list(entry) for label, entry in self.by_label.items()},
            "failures": [{**asdict(found), "traces": list(found.traces)} for found in self.failures],
            "handed_off": self.handed_off,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> View:
        return cls(
            [Listed(**run) for run in data["listed"]],
            {label: (int(count), float(oldest)) for label, (count, oldest) in data["by_label"].items()},
            [Failures(**{**found, "traces": tuple(found["traces"])}) for found in data["failures"]],
            dict(data.get("handed_off", {})),
        )

    @classmethod
    def merge(cls, views: Iterable[View]) -> View:
        merged = cls()
        failures: list[Failures] = []
        for view in views:
            merged.listed.extend(view.listed)
            failures.extend(view.failures)
            merged.handed_off.update(view.handed_off)
            for label, (count, oldest) in view.by_label.items():
                total, first = merged.by_label.get(label, (0, oldest))
                merged.by_label[label] = (total + count, min(first, oldest))
        merged.listed = sorted(merged.listed, key=lambda run: run.started_at)[:MAX_LISTED]
        merged.failures = group(failures)
        return merged


class Activity:
    """The runs in progress and the groups of recent failures of one configuration, in this process. Updated from the
    event loop and from threadpool threads."""

    def __init__(self) -> None:
        # The runs in progress, in the order they started: a run sets and pops its own key. Setting and popping a
        # dict's key, and dict.copy(), are each atomic in CPython: the event loop and threadpool threads update it
        # without a lock.
        self.running: dict[Running, None] = {}
        # Per set of label values, its runs in progress in the order they started, the first the oldest: kept only
        # for a backend that asks at each event (index_by_values), at the cost of a lock.
        self._by_values: dict[tuple[str, ...], dict[Running, None]] | None = None
        self._failures: dict[tuple[str, str, str | None], Failures] = {}
        self.handed_off: dict[str, str] = {}  # one entry per task label, so as bounded as the labels
        self._lock = threading.Lock()
        # Called after each failure: a process's file of failures is written at once, not at its next turn.
        self.on_failure: Callable[[], None] | None = None

    def index_by_values(self) -> None:
        """Keep the runs of each set of label values in order too, so that started() and ended() say when the oldest
        of them started."""
        with self._lock:
            if self._by_values is None:
                self._by_values = {}
                for run in self.running.copy():
                    self._by_values.setdefault(run.values, {})[run] = None

    def started(self, run: Running) -> float | None:
        """Record a run that started; indexed by values, the oldest start of its label values' runs now, `run`
        included."""
        self.running[run] = None  # atomic: no lock
        if self._by_values is None:
            return None
        with self._lock:
            runs = self._by_values.get(run.values)
            if runs is None:
                runs = self._by_values[run.values] = {}
            runs[run] = None
            return next(iter(runs)).started_at

    def ended(self, run: Running) -> float | None:
        """Forget a run that ended; indexed by values, the oldest start of its label values' runs still in progress,
        None if none."""
        self.running.pop(run, None)  # atomic: no lock
        if self._by_values is None:
            return None
        with self._lock:
            runs = self._by_values.get(run.values)
            if runs is not None and run in runs:
                del runs[run]
                if not runs:
                    del self._by_values[run.values]
            return next(iter(runs)).started_at if runs else None

    def runs(self) -> list[Running]:
        return list(self.running.copy())

    def failed(self, run: TaskRun) -> None:
        key = (run.task, run.status, run.exception)
        with self._lock:
            known = self._failures.pop(key, None)  # popped and put back: the dict stays in order of last failure
            found = Failures.of(run)
            self._failures[key] = found if known is None else known.merge(found)
            while len(self._failures) > MAX_FAILURE_GROUPS:
                del self._failures[next(iter(self._failures))]
        notify = self.on_failure
        if notify is not None:
            notify()

    def absorb(self, failures: Iterable[Failures]) -> None:
        """Keep the failures of a process that ended, as this process's own."""
        with self._lock:
            latest_first = group([*self._failures.values(), *failures])
            self._failures = {found.key: found for found in reversed(latest_first)}

    def view(self, stacks_after: float | None = None, now: float = 0.0) -> View:
        """This process's runs and failures; with `stacks_after`, where each run older than that many seconds waits."""
        pid = os.getpid()
        runs = sorted(self.runs(), key=lambda run: run.started_at)
        by_label: dict[str, tuple[int, float]] = {}
        for run in runs:
            count, oldest = by_label.get(run.values[0], (0, run.started_at))
            by_label[run.values[0]] = (count + 1, oldest)
        listed = [
            Listed(
                run.task,
                run.values[0],
                run.route,
                run.started_at,
                pid,
                run.trace_id(),
                run.where() if stacks_after is not None and now - run.started_at > stacks_after else None,
            )
            for run in runs[:MAX_LISTED]
        ]
        with self._lock:
            failures = group(self._failures.values())
        return View(listed, by_label, failures, self.handed_off.copy())


# The lists of the capture_tasks() blocks open now, in any configuration.
captures: list[list[TaskRun]] = []
