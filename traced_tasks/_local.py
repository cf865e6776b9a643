"""The in-process metrics backend: plain numbers under one lock, turned into metric families when scraped."""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

from opentelemetry.trace import SpanContext
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

from traced_tasks import _names as names
from traced_tasks._metrics import HELP, Metrics, TaskMetrics, exemplar_labels


class _Histogram:
    __slots__ = ("counts", "exemplars", "sum")

    def __init__(self, size: int) -> None:
        self.counts = [0.0] * size  # per bucket, not cumulative; the last is +Inf
        # Per bucket, the last exemplar: (span context, value, Unix time).
        self.exemplars: list[tuple[SpanContext, float, float] | None] = [None] * size
        self.sum = 0.0


class TaskSnapshot(NamedTuple):
    values: tuple[str, ...]
    scheduled: float
    wait: _Histogram
    durations: dict[str, _Histogram]
    in_progress: float
    exceptions: dict[str, float]
    skipped: float
    last_success: float


class LocalTaskMetrics(TaskMetrics):
    """The counts of one label value. Every update takes the backend's one lock once."""

    __slots__ = (
        "_bounds",
        "_families",
        "_lock",
        "durations",
        "exceptions",
        "in_progress",
        "last_success",
        "scheduled",
        "skipped",
        "success",
        "values",
        "wait",
    )

    def __init__(self, families: LocalMetrics, values: tuple[str, ...]) -> None:
        self.values = values
        self._bounds = families.bounds
        self._lock = families.lock
        # Floats, as prometheus_client keeps them, so the exposition reads the same (1.0, not 1).
        self.scheduled = 0.0
        self.skipped = 0.0
        self.in_progress = 0.0
        self.last_success = 0.0
        self.wait = _Histogram(len(families.bounds) + 1)
        # success from the start, so a task that never ran shows 0; error and cancelled with their first run.
        self.success = _Histogram(len(families.bounds) + 1)
        self.durations = {names.STATUS_SUCCESS: self.success}
        self.exceptions: dict[str, float] = {}
        self._families = families

    def schedule(self) -> None:
        with self._lock:
            self.scheduled += 1

    def start(self, wait_seconds: float) -> None:
        index = bisect.bisect_left(self._bounds, wait_seconds)
        with self._lock:
            wait = self.wait
            wait.counts[index] += 1
            wait.sum += wait_seconds
            self.in_progress += 1

    def succeed(self, seconds: float, exemplar: SpanContext | None) -> None:
        index = bisect.bisect_left(self._bounds, seconds)
        now = time.time()
        with self._lock:
            self.in_progress -= 1
            self.last_success = now
            histogram = self.success
            histogram.counts[index] += 1
            histogram.sum += seconds
            if exemplar is not None:
                histogram.exemplars[index] = (exemplar, seconds, now)

    def fail(self, status: str, seconds: float, exemplar: SpanContext | None, kind: type[BaseException]) -> None:
        index = bisect.bisect_left(self._bounds, seconds)
        label = self._families.exception_label(kind) if status == names.STATUS_ERROR else None
        now = time.time()
        with self._lock:
            self.in_progress -= 1
            histogram = self.durations.get(status)
            if histogram is None:
                histogram = self.durations[status] = _Histogram(len(self._bounds) + 1)
            histogram.counts[index] += 1
            histogram.sum += seconds
            if exemplar is not None:
                histogram.exemplars[index] = (exemplar, seconds, now)
            if label is not None:
                self.exceptions[label] = self.exceptions.get(label, 0.0) + 1

    def skip(self) -> None:
        with self._lock:
            self.skipped += 1


class LocalMetrics(Metrics):
    """The seven families of one configuration, counted in this process and collected as one collector."""

    def __init__(
        self, registry: CollectorRegistry, namespace: str, buckets: Sequence[float], route_label: bool = False
    ) -> None:
        super().__init__(registry, route_label)
        self.bounds = tuple(float(bound) for bound in buckets if bound != float("inf"))
        self.lock = threading.Lock()  # guards the counts; Metrics' own lock guards the label caps
        self.prefix = f"{namespace}_" if namespace else ""
        self.le = [floatToGoString(bound) for bound in self.bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        self._tasks: dict[tuple[str, ...], LocalTaskMetrics] = {}
        self._left_out = threading.local()
        self.register()

    def for_task(self, name: str, route: str | None = None) -> TaskMetrics:
        values = self.values(name, route)
        with self.lock:
            task = self._tasks.get(values)
            if task is None:
                task = self._tasks[values] = LocalTaskMetrics(self, values)
            return task

    def register(self) -> None:
        self.registry.register(self)

    def unregister(self) -> None:
        self.registry.unregister(self)

    def describe(self) -> list[Metric]:
        """The families without samples, so the registry can refuse names that are taken."""
        return list(self._families())

    def snapshot(self) -> list[TaskSnapshot]:
        """A copy of every task's counts, taken under the lock, so tasks finishing during a scrape wait only
        for the copy, not for the rendering."""
        with self.lock:
            return [
                TaskSnapshot(
                    task.values,
                    task.scheduled,
                    _copy(task.wait),
                    {status: _copy(histogram) for status, histogram in task.durations.items()},
                    task.in_progress,
                    dict(task.exceptions),
                    task.skipped,
                    task.last_success,
                )
                for task in self._tasks.values()
            ]

    @contextmanager
    def left_out(self) -> Iterator[None]:
        """Within this, in this thread, collect() yields nothing: /metrics renders these counts itself."""
        self._left_out.active = True
        try:
            yield
        finally:
            self._left_out.active = False

    def collect(self) -> list[Metric]:
        if getattr(self._left_out, "active", False):
            return []
        families = self._families()
        scheduled, wait, duration, in_progress, exceptions, skipped, last_success = families
        for task in self.snapshot():
            labels = list(task.values)
            scheduled.add_metric(labels, task.scheduled)
            self._add_histogram(wait, labels, task.wait)
            for status, histogram in task.durations.items():
                self._add_histogram(duration, [*labels, status], histogram)
            in_progress.add_metric(labels, task.in_progress)
            for label, count in task.exceptions.items():
                exceptions.add_metric([*labels, label], count)
            skipped.add_metric(labels, task.skipped)
            last_success.add_metric(labels, task.last_success)
        return list(families)

    def _families(
        self,
    ) -> tuple[
        CounterMetricFamily,
        HistogramMetricFamily,
        HistogramMetricFamily,
        GaugeMetricFamily,
        CounterMetricFamily,
        CounterMetricFamily,
        GaugeMetricFamily,
    ]:
        labels = self.labelnames
        prefix = self.prefix
        return (
            CounterMetricFamily(prefix + names.SCHEDULED, HELP[names.SCHEDULED], labels=labels),
            HistogramMetricFamily(prefix + names.WAIT, HELP[names.WAIT], labels=labels),
            HistogramMetricFamily(prefix + names.DURATION, HELP[names.DURATION], labels=[*labels, names.LABEL_STATUS]),
            GaugeMetricFamily(prefix + names.IN_PROGRESS, HELP[names.IN_PROGRESS], labels=labels),
            CounterMetricFamily(
                prefix + names.EXCEPTIONS, HELP[names.EXCEPTIONS], labels=[*labels, names.LABEL_EXCEPTION]
            ),
            CounterMetricFamily(prefix + names.SKIPPED, HELP[names.SKIPPED], labels=labels),
            GaugeMetricFamily(prefix + names.LAST_SUCCESS, HELP[names.LAST_SUCCESS], labels=labels),
        )

    def _add_histogram(self, family: HistogramMetricFamily, values: list[str], histogram: _Histogram) -> None:
        buckets: list[tuple[str, float] | tuple[str, float, Exemplar]] = []
        total = 0.0
        for le, count, exemplar in zip(self.le, histogram.counts, histogram.exemplars, strict=True):
            total += count
            if exemplar is not None:
                span_context, value, timestamp = exemplar
                ids = exemplar_labels(span_context)
                if ids is not None:
                    buckets.append((le, total, Exemplar(ids, value, timestamp)))
                    continue
            buckets.append((le, total))
        family.add_metric(values, buckets, histogram.sum)


def _copy(histogram: _Histogram) -> _Histogram:
    copied = _Histogram(0)
    copied.counts = list(histogram.counts)
    copied.exemplars = list(histogram.exemplars)
    copied.sum = histogram.sum
    return copied
