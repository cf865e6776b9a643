"""Metric label values, bounded: task names, routes and exception names, each up to a cap."""

from __future__ import annotations

import logging
import threading
from typing import Generic, TypeVar

from traced_tasks._callables import utf8
from traced_tasks._conventions import OVERFLOW

MAX_ROUTES = 100
MAX_EXCEPTION_TYPES = 100

logger = logging.getLogger("traced_tasks")

T = TypeVar("T", str, tuple[str, ...])


class CappedLabel(Generic[T]):
    """Values of one label, or sets of them, admitted up to a cap; past it, `overflow`, with one warning."""

    def __init__(self, cap: int, what: str, overflow: T, hint: str = "") -> None:
        self._cap = cap
        self._what = what
        self._hint = hint
        self._overflow: T = overflow
        self._seen: set[T] = set()
        self._overflowed = False
        self._lock = threading.Lock()

    def admit_all(self, values: set[T]) -> None:
        """Count values already in use toward the cap, all of them, even past it."""
        with self._lock:
            self._seen |= values - {self._overflow}

    def admit(self, value: T) -> T:
        with self._lock:
            if value in self._seen or value == self._overflow:
                return value
            if len(self._seen) < self._cap:
                self._seen.add(value)
                return value
            first = not self._overflowed
            self._overflowed = True
        if first:
            logger.warning(
                "traced_tasks: more than %d %s seen; further ones are counted as %r%s",
                self._cap,
                self._what,
                OVERFLOW,
                self._hint,
            )
        return self._overflow


# Why a cap on sets of label values exists, where it does: the OpenTelemetry SDK's limit.
_SDK = (
    ": the MeterProvider's limit of attribute sets per instrument keeps no more apart. A View of the"
    " background_task.* instruments with a larger aggregation_cardinality_limit raises it"
)


class Labels:
    """The label values of one configuration: every backend counts under the same ones."""

    def __init__(self, max_task_names: int, route_label: bool, max_series: int | None = None) -> None:
        self.route_label = route_label
        self._tasks = CappedLabel(max_task_names, "task names", OVERFLOW)
        self._routes = CappedLabel(MAX_ROUTES, "routes", OVERFLOW)
        self._exceptions = CappedLabel(MAX_EXCEPTION_TYPES, "exception classes", OVERFLOW)
        width = 2 if route_label else 1
        self._series = (
            None if max_series is None else CappedLabel(max_series, "tasks (and routes)", (OVERFLOW,) * width, _SDK)
        )

    def task(self, name: str) -> str:
        return self._tasks.admit(name)

    def admit_tasks(self, names: set[str]) -> None:
        """Task names that already have series, as earlier worker processes left them in multiprocess mode."""
        self._tasks.admit_all(names)

    def values(self, task: str, route: str | None) -> tuple[str, ...]:
        """A task's label values: (task,) or, with the route label, (task, route), the route "" when unknown."""
        values = (task, "" if route is None else self._routes.admit(route)) if self.route_label else (task,)
        return values if self._series is None else self._series.admit(values)

    def admit_routes(self, routes: set[str]) -> None:
        """Routes that already have series, as earlier worker processes left them in multiprocess mode."""
        self._routes.admit_all(routes)

    def exception_name(self, name: str) -> str:
        """The exception label value of an exception class's name: `error_type()`'s, or an engine's."""
        return self._exceptions.admit(utf8(name))


def error_type(kind: type[BaseException]) -> str:
    """The class name without its module, as OpenTelemetry's error.type."""
    return utf8(kind.__qualname__)
