"""The Prometheus metric families, and the labelled children of one task name."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from traced_tasks import _names as names

logger = logging.getLogger("traced_tasks")

# Background work runs from milliseconds (a cache write) to many minutes (a report): the client's
# default buckets stop at 10 s.
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
)  # fmt: skip

MAX_EXCEPTION_TYPES = 100
MAX_ROUTES = 100


class TaskMetrics:
    """The children of every family for one `task` label value, resolved once and reused."""

    __slots__ = (
        "_duration",
        "_failures",
        "exceptions",
        "exceptions_overflow",
        "in_progress",
        "last_success",
        "scheduled",
        "skipped",
        "success",
        "values",
        "wait",
    )

    def __init__(self, families: Metrics, values: tuple[str, ...]) -> None:
        self.values = values  # (task,) or, with the route label, (task, route)
        self.scheduled = families.scheduled.labels(*values)
        self.wait = families.wait.labels(*values)
        self.in_progress = families.in_progress.labels(*values)
        self.skipped = families.skipped.labels(*values)
        self.last_success = families.last_success.labels(*values)
        self.success = families.duration.labels(*values, names.STATUS_SUCCESS)
        # The error and cancelled series appear with the first such run: most tasks never fail, and each
        # histogram series is a score of samples per task in every scrape.
        self._duration = families.duration
        self._failures: dict[str, Any] = {}
        self.exceptions: dict[type[BaseException], Any] = {}
        self.exceptions_overflow: Any = None

    def failure(self, status: str) -> Any:
        """The duration child for `error` or `cancelled`."""
        child = self._failures.get(status)
        if child is None:
            child = self._failures[status] = self._duration.labels(*self.values, status)
        return child


class Metrics:
    """The seven metric families of one configuration, registered in one registry."""

    def __init__(
        self, registry: CollectorRegistry, namespace: str, buckets: Sequence[float], route_label: bool = False
    ) -> None:
        task = [names.LABEL_TASK, names.LABEL_ROUTE] if route_label else [names.LABEL_TASK]
        self.route_label = route_label
        # Made unregistered, then registered together below, so a clash leaves the registry as it was.
        common: dict[str, Any] = {"namespace": namespace, "registry": None}
        self.scheduled = Counter(names.SCHEDULED, "Background tasks scheduled (add_task calls).", task, **common)
        self.wait = Histogram(
            names.WAIT,
            "Time from scheduling a background task to the start of its run, in seconds.",
            task,
            buckets=buckets,
            **common,
        )
        self.duration = Histogram(
            names.DURATION,
            "Run time of background tasks by outcome, in seconds.",
            [*task, names.LABEL_STATUS],
            buckets=buckets,
            **common,
        )
        self.in_progress = Gauge(
            names.IN_PROGRESS, "Background tasks running now.", task, multiprocess_mode="livesum", **common
        )
        self.exceptions = Counter(
            names.EXCEPTIONS,
            "Background tasks that failed, by exception class.",
            [*task, names.LABEL_EXCEPTION],
            **common,
        )
        self.skipped = Counter(
            names.SKIPPED,
            "Background tasks never started because an earlier task of their batch failed.",
            task,
            **common,
        )
        self.last_success = Gauge(
            names.LAST_SUCCESS,
            "Unix time of the last successful run of a background task.",
            task,
            multiprocess_mode="max",
            **common,
        )
        self._families = (
            self.scheduled,
            self.wait,
            self.duration,
            self.in_progress,
            self.exceptions,
            self.skipped,
            self.last_success,
        )
        self._registry = registry
        self._lock = threading.Lock()
        self._exception_names: set[str] = set()
        self._exception_overflowed = False
        self._routes: set[str] = set()
        self._route_overflowed = False
        self.register()

    def for_task(self, name: str, route: str | None = None) -> TaskMetrics:
        """The children for one task name, and with the route label for one route ("" when unknown)."""
        if not self.route_label:
            return TaskMetrics(self, (name,))
        return TaskMetrics(self, (name, self._route_value(route)))

    def _route_value(self, route: str | None) -> str:
        if route is None:
            return ""
        with self._lock:
            if route in self._routes:
                return route
            if len(self._routes) < MAX_ROUTES:
                self._routes.add(route)
                return route
            if not self._route_overflowed:
                self._route_overflowed = True
                logger.warning(
                    "traced_tasks: more than %d routes seen; further ones are counted as route=%r",
                    MAX_ROUTES,
                    names.OVERFLOW,
                )
            return names.OVERFLOW

    def exception(self, task: TaskMetrics, kind: type[BaseException]) -> Any:
        """The exceptions counter child of one task and exception class, with the class names capped."""
        child = task.exceptions.get(kind)
        if child is not None:
            return child
        with self._lock:
            label = kind.__qualname__
            if label not in self._exception_names:
                if len(self._exception_names) >= MAX_EXCEPTION_TYPES:
                    return self._exception_overflow(task)
                self._exception_names.add(label)
            child = task.exceptions[kind] = self.exceptions.labels(*task.values, label)
            return child

    def _exception_overflow(self, task: TaskMetrics) -> Any:
        # Not cached by class: classes made at run time would grow the cache without end.
        if not self._exception_overflowed:
            self._exception_overflowed = True
            logger.warning(
                "traced_tasks: more than %d exception classes seen; further ones are counted as %r",
                MAX_EXCEPTION_TYPES,
                names.OVERFLOW,
            )
        if task.exceptions_overflow is None:
            task.exceptions_overflow = self.exceptions.labels(*task.values, names.OVERFLOW)
        return task.exceptions_overflow

    def register(self) -> None:
        registered = []
        try:
            for family in self._families:
                self._registry.register(family)
                registered.append(family)
        except ValueError:
            for family in registered:
                self._registry.unregister(family)
            raise

    def unregister(self) -> None:
        for family in self._families:
            self._registry.unregister(family)
