"""The Prometheus metrics of one configuration: what every backend shares, and prometheus_client's own metrics.

Two backends count the same seven families. In one process, `_local` keeps plain numbers under one lock and
renders them when scraped, which costs a fraction of prometheus_client's per-update locking. In multiprocess
mode the counts must live in prometheus_client's files, so `ClientMetrics` here uses its metric objects.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry.trace import SpanContext
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

HELP = {
    names.SCHEDULED: "Background tasks scheduled (add_task calls).",
    names.WAIT: "Time from scheduling a background task to the start of its run, in seconds.",
    names.DURATION: "Run time of background tasks by outcome, in seconds.",
    names.IN_PROGRESS: "Background tasks running now.",
    names.EXCEPTIONS: "Background tasks that failed, by exception class.",
    names.SKIPPED: "Background tasks never started because an earlier task of their batch failed.",
    names.LAST_SUCCESS: "Unix time of the last successful run of a background task.",
}


def exemplar_labels(span_context: SpanContext) -> dict[str, str] | None:
    """An exemplar's labels: the trace and span IDs of the run's span, in hex, as tracing backends show them.
    None, and no exemplar, when the IDs are not numbers, as only a tracer other than the SDK's could make them."""
    try:
        return {
            names.EXEMPLAR_TRACE_ID: format(span_context.trace_id, "032x"),
            names.EXEMPLAR_SPAN_ID: format(span_context.span_id, "016x"),
        }
    except Exception:
        return None


class TaskMetrics:
    """The counts of one `task` label value (and route, with the route label), one call per event.

    An exemplar is the span context of the run, sampled and ours. The in-process backend keeps it as it is
    and writes its IDs in hex only when scraped; prometheus_client's metric objects need the labels at once.
    """

    __slots__ = ()
    values: tuple[str, ...]  # (task,) or, with the route label, (task, route)

    def schedule(self) -> None:
        raise NotImplementedError

    def start(self, wait_seconds: float) -> None:
        raise NotImplementedError

    def succeed(self, seconds: float, exemplar: SpanContext | None) -> None:
        raise NotImplementedError

    def fail(self, status: str, seconds: float, exemplar: SpanContext | None, kind: type[BaseException]) -> None:
        raise NotImplementedError

    def skip(self) -> None:
        raise NotImplementedError


class CappedLabel:
    """Values of one label, admitted up to a cap; past it, the overflow value, with one warning."""

    def __init__(self, cap: int, what: str) -> None:
        self._cap = cap
        self._what = what
        self._seen: set[str] = set()
        self._overflowed = False
        self._lock = threading.Lock()

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
                "traced_tasks: more than %d %s seen; further ones are counted as %r",
                self._cap,
                self._what,
                names.OVERFLOW,
            )
        return names.OVERFLOW


class Metrics:
    """What both backends share: the registry, the label names, and the caps on routes and exception names."""

    def __init__(self, registry: CollectorRegistry, route_label: bool) -> None:
        self.registry = registry
        self.route_label = route_label
        self.labelnames = [names.LABEL_TASK, names.LABEL_ROUTE] if route_label else [names.LABEL_TASK]
        self._routes = CappedLabel(MAX_ROUTES, "routes")
        self._exception_names = CappedLabel(MAX_EXCEPTION_TYPES, "exception classes")

    def for_task(self, name: str, route: str | None = None) -> TaskMetrics:
        """The counts for one task name, and with the route label for one route ("" when unknown)."""
        raise NotImplementedError

    def register(self) -> None:
        raise NotImplementedError

    def unregister(self) -> None:
        raise NotImplementedError

    def values(self, name: str, route: str | None) -> tuple[str, ...]:
        if not self.route_label:
            return (name,)
        return (name, "" if route is None else self._routes.admit(route))

    def exception_label(self, kind: type[BaseException]) -> str:
        return self._exception_names.admit(kind.__qualname__)


class ClientTaskMetrics(TaskMetrics):
    """prometheus_client's children for one label value, resolved once and reused."""

    __slots__ = (
        "_failures",
        "_families",
        "_in_progress",
        "_last_success",
        "_scheduled",
        "_skipped",
        "_success",
        "_wait",
        "exceptions",
        "values",
    )

    def __init__(self, families: ClientMetrics, values: tuple[str, ...]) -> None:
        self.values = values
        self._families = families
        self._scheduled = families.scheduled.labels(*values)
        self._wait = families.wait.labels(*values)
        self._in_progress = families.in_progress.labels(*values)
        self._skipped = families.skipped.labels(*values)
        self._last_success = families.last_success.labels(*values)
        self._success = families.duration.labels(*values, names.STATUS_SUCCESS)
        # The error and cancelled series appear with the first such run: most tasks never fail, and each
        # histogram series is a score of samples per task in every scrape.
        self._failures: dict[str, Any] = {}
        # Keyed by label, not class: classes made at run time would grow it without end.
        self.exceptions: dict[str, Any] = {}

    def schedule(self) -> None:
        self._scheduled.inc()

    def start(self, wait_seconds: float) -> None:
        self._wait.observe(wait_seconds)
        self._in_progress.inc()

    def succeed(self, seconds: float, exemplar: SpanContext | None) -> None:
        self._in_progress.dec()
        self._success.observe(seconds, None if exemplar is None else exemplar_labels(exemplar))
        self._last_success.set(time.time())

    def fail(self, status: str, seconds: float, exemplar: SpanContext | None, kind: type[BaseException]) -> None:
        self._in_progress.dec()
        duration = self._failures.get(status)
        if duration is None:
            duration = self._failures[status] = self._families.duration.labels(*self.values, status)
        duration.observe(seconds, None if exemplar is None else exemplar_labels(exemplar))
        if status == names.STATUS_ERROR:
            label = self._families.exception_label(kind)
            counter = self.exceptions.get(label)
            if counter is None:
                counter = self.exceptions[label] = self._families.exceptions.labels(*self.values, label)
            counter.inc()

    def skip(self) -> None:
        self._skipped.inc()


class ClientMetrics(Metrics):
    """The seven families as prometheus_client metric objects, as multiprocess mode needs."""

    def __init__(
        self, registry: CollectorRegistry, namespace: str, buckets: Sequence[float], route_label: bool = False
    ) -> None:
        super().__init__(registry, route_label)
        task = self.labelnames
        # Made unregistered, then registered together below, so a clash leaves the registry as it was.
        common: dict[str, Any] = {"namespace": namespace, "registry": None}
        self.scheduled = Counter(names.SCHEDULED, HELP[names.SCHEDULED], task, **common)
        self.wait = Histogram(names.WAIT, HELP[names.WAIT], task, buckets=buckets, **common)
        self.duration = Histogram(
            names.DURATION, HELP[names.DURATION], [*task, names.LABEL_STATUS], buckets=buckets, **common
        )
        self.in_progress = Gauge(
            names.IN_PROGRESS, HELP[names.IN_PROGRESS], task, multiprocess_mode="livesum", **common
        )
        self.exceptions = Counter(names.EXCEPTIONS, HELP[names.EXCEPTIONS], [*task, names.LABEL_EXCEPTION], **common)
        self.skipped = Counter(names.SKIPPED, HELP[names.SKIPPED], task, **common)
        self.last_success = Gauge(names.LAST_SUCCESS, HELP[names.LAST_SUCCESS], task, multiprocess_mode="max", **common)
        self._families = (
            self.scheduled,
            self.wait,
            self.duration,
            self.in_progress,
            self.exceptions,
            self.skipped,
            self.last_success,
        )
        self.register()

    def for_task(self, name: str, route: str | None = None) -> TaskMetrics:
        return ClientTaskMetrics(self, self.values(name, route))

    def register(self) -> None:
        registered = []
        try:
            for family in self._families:
                self.registry.register(family)
                registered.append(family)
        except ValueError:
            for family in registered:
                self.registry.unregister(family)
            raise

    def unregister(self) -> None:
        for family in self._families:
            self.registry.unregister(family)


def make_metrics(
    registry: CollectorRegistry, namespace: str, buckets: Sequence[float], route_label: bool, multiprocess: bool
) -> Metrics:
    if multiprocess:
        return ClientMetrics(registry, namespace, buckets, route_label)
    from traced_tasks._local import LocalMetrics

    return LocalMetrics(registry, namespace, buckets, route_label)
