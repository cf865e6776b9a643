"""Metric label values, bounded: task names, routes and exception names, each up to a cap."""

from __future__ import annotations

import logging
import threading

from traced_tasks._callables import utf8
from traced_tasks._conventions import OVERFLOW

MAX_ROUTES = 100
MAX_EXCEPTION_TYPES = 100

logger = logging.getLogger("traced_tasks")


class CappedLabel:
    """Values of one label, admitted up to a cap; past it, the overflow value, with one warning."""

    def __init__(self, cap: int, what: str) -> None:
        self._cap = cap
        self._what = what
        self._seen: set[str] = set()
        self._overflowed = False
        self._lock = threading.Lock()

    def admit_all(self, values: set[str]) -> None:
        """Count values already in use toward the cap, all of them, even past it."""
        with self._lock:
            self._seen |= values - {OVERFLOW}

    def admit(self, value: str) -> str:
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) < self._cap:
                self._seen.add(value)
                return value
            first = not self._overflowed
            self._overflowed = True
        if first:
            logger.warning(
                "traced_tasks: more than %d %s seen; further ones are counted as %r", self._cap, self._what, OVERFLOW
            )
        return OVERFLOW


class Labels:
    """The label values of one configuration: every backend counts under the same ones."""

    def __init__(self, max_task_names: int, route_label: bool) -> None:
        self.route_label = route_label
        self._tasks = CappedLabel(max_task_names, "task names")
        self._routes = CappedLabel(MAX_ROUTES, "routes")
        self._exceptions = CappedLabel(MAX_EXCEPTION_TYPES, "exception classes")

    def task(self, name: str) -> str:
        return self._tasks.admit(name)

    def admit_tasks(self, names: set[str]) -> None:
        """Task names that already have series, as earlier worker processes left them in multiprocess mode."""
        self._tasks.admit_all(names)

    def values(self, task: str, route: str | None) -> tuple[str, ...]:
        """A task's label values: (task,) or, with the route label, (task, route), the route "" when unknown."""
        if not self.route_label:
            return (task,)
        return (task, "" if route is None else self._routes.admit(route))

    def exception(self, kind: type[BaseException]) -> str:
        return self._exceptions.admit(error_type(kind))


def error_type(kind: type[BaseException]) -> str:
    """The class name without its module, as OpenTelemetry's error.type."""
    return utf8(kind.__qualname__)
