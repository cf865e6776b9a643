"""The default metrics backend: counts kept in this process as plain numbers under one lock, and handed to
prometheus_client as a custom collector when scraped, its documented extension point.

One lock per update costs a fraction of prometheus_client's own metric objects, which lock per child and value. The
runs in progress are the runs started and not finished, from the same counts; when the oldest of them started comes
from the runs themselves, as the configuration's activity record holds them.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from opentelemetry.trace import SpanContext
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

from traced_tasks import _conventions as names
from traced_tasks._activity import Activity
from traced_tasks._backends.base import Backend, TaskTotals
from traced_tasks._backends.families import label_names, metric_name, sampled
from traced_tasks._options import Options

_KINDS: dict[str, Any] = {
    "counter": CounterMetricFamily,
    "histogram": HistogramMetricFamily,
    "gauge": GaugeMetricFamily,
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


class _Histogram:
    __slots__ = ("counts", "exemplars", "sum")

    def __init__(self, size: int) -> None:
        self.counts = [0.0] * size  # per bucket, not cumulative; the last is +Inf
        # Per bucket, the last exemplar: (span context, value, Unix time).
        self.exemplars: list[tuple[SpanContext, float, float] | None] = [None] * size
        self.sum = 0.0

    def copy(self) -> _Histogram:
        copied = _Histogram(0)
        copied.counts = list(self.counts)
        copied.exemplars = list(self.exemplars)
        copied.sum = self.sum
        return copied


class Snapshot(NamedTuple):
    values: tuple[str, ...]
    scheduled: float
    wait: _Histogram
    durations: dict[str, _Histogram]
    exceptions: dict[str, float]
    skipped: float
    last_success: float

    @property
    def in_progress(self) -> float:
        """Runs started (their wait observed) and not finished (no duration yet)."""
        finished = sum(sum(histogram.counts) for histogram in self.durations.values())
        return sum(self.wait.counts) - finished


class InProcessCounts:
    """The counts of one set of label values. Every update takes the backend's one lock once."""

    __slots__ = (
        "_bounds",
        "_lock",
        "durations",
        "exceptions",
        "last_success",
        "scheduled",
        "skipped",
        "success",
        "values",
        "wait",
    )

    def __init__(self, bounds: Sequence[float], lock: threading.Lock, values: tuple[str, ...]) -> None:
        self.values = values
        self._bounds = bounds
        self._lock = lock
        size = len(bounds) + 1
        # Floats, as prometheus_client keeps them, so the exposition reads the same (1.0, not 1).
        self.scheduled = 0.0
        self.skipped = 0.0
        self.last_success = 0.0
        self.wait = _Histogram(size)
        self.success = _Histogram(size)
        # success and error from the first schedule, at 0, so that rate() sees a task's first failures; cancelled
        # with its first run: it is rare, mostly at shutdown, and no rule reads it.
        self.durations = {names.STATUS_SUCCESS: self.success, names.STATUS_ERROR: _Histogram(size)}
        self.exceptions: dict[str, float] = {}

    def schedule(self) -> None:
        with self._lock:
            self.scheduled += 1

    def start(self, wait: float, started_at: float, oldest: float | None) -> None:
        index = bisect.bisect_left(self._bounds, wait)
        with self._lock:
            histogram = self.wait
            histogram.counts[index] += 1
            histogram.sum += wait

    def succeed(self, seconds: float, started_at: float, exemplar: SpanContext | None, oldest: float | None) -> None:
        index = bisect.bisect_left(self._bounds, seconds)
        now = started_at + seconds  # the run's end, without another read of the clock
        with self._lock:
            self.last_success = now
            histogram = self.success
            histogram.counts[index] += 1
            histogram.sum += seconds
            if exemplar is not None:
                histogram.exemplars[index] = (exemplar, seconds, now)

    def fail(
        self,
        status: str,
        seconds: float,
        started_at: float,
        exemplar: SpanContext | None,
        exception: str | None,
        oldest: float | None,
    ) -> None:
        index = bisect.bisect_left(self._bounds, seconds)
        now = started_at + seconds
        with self._lock:
            histogram = self.durations.get(status)
            if histogram is None:
                histogram = self.durations[status] = _Histogram(len(self._bounds) + 1)
            histogram.counts[index] += 1
            histogram.sum += seconds
            if exemplar is not None:
                histogram.exemplars[index] = (exemplar, seconds, now)
            if exception is not None:
                self.exceptions[exception] = self.exceptions.get(exception, 0.0) + 1

    def skip(self) -> None:
        with self._lock:
            self.skipped += 1

    def snapshot(self) -> Snapshot:
        # Under the backend's lock.
        return Snapshot(
            self.values,
            self.scheduled,
            self.wait.copy(),
            {status: histogram.copy() for status, histogram in self.durations.items()},
            dict(self.exceptions),
            self.skipped,
            self.last_success,
        )


class InProcessBackend(Backend):
    """The families of one configuration, counted in this process and collected as one custom collector, with the
    families sampled from queues and schedulers.

    With a registry it registers there, all families at once or none; without one it only counts, for the task
    console and the observations of another backend. The oldest start of the runs in progress comes from the
    activity records `activities()` gives.
    """

    def __init__(
        self, options: Options, registry: CollectorRegistry | None, activities: Callable[[], Iterable[Activity]]
    ) -> None:
        self.bounds = tuple(options.buckets)
        self.activities = activities
        self._lock = threading.Lock()
        self._options = options
        self._le = [floatToGoString(bound) for bound in self.bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        self._counts: dict[tuple[str, ...], InProcessCounts] = {}
        self._registry = registry

    def counts(self, values: tuple[str, ...]) -> InProcessCounts:
        with self._lock:
            counts = self._counts.get(values)
            if counts is None:
                counts = self._counts[values] = InProcessCounts(self.bounds, self._lock, values)
            return counts

    def registry(self) -> CollectorRegistry:
        return self._registry if self._registry is not None else CollectorRegistry()

    def open(self) -> None:
        if self._registry is not None:
            self._registry.register(self)

    def close(self) -> None:
        if self._registry is not None:
            self._registry.unregister(self)

    def oldest_starts(self) -> dict[tuple[str, ...], float]:
        """For each set of label values with runs in progress, when the oldest of them started: one pass over the
        runs, at collection."""
        found: dict[tuple[str, ...], float] = {}
        for activity in self.activities():
            for run in activity.runs():
                known = found.get(run.values)
                if known is None or run.started_at < known:
                    found[run.values] = run.started_at
        return found

    def snapshots(self) -> list[Snapshot]:
        with self._lock:
            return [counts.snapshot() for counts in self._counts.values()]

    def totals(self) -> list[TaskTotals]:
        return [
            TaskTotals(
                task.values,
                self.bounds,
                scheduled=task.scheduled,
                skipped=task.skipped,
                started=sum(task.wait.counts),
                outcomes={status: sum(histogram.counts) for status, histogram in task.durations.items()},
                run_buckets=[sum(counts) for counts in zip(*(h.counts for h in task.durations.values()), strict=True)],
                wait_buckets=list(task.wait.counts),
                last_success=task.last_success,
            )
            for task in self.snapshots()
        ]

    def describe(self) -> list[Metric]:
        """The families without samples, so the registry can refuse names that are taken."""
        return [*self._families().values(), *sampled(self._options, samples=False)]

    def collect(self) -> Iterable[Metric]:
        return [*self.task_families(), *sampled(self._options)]

    def task_families(self) -> list[Metric]:
        snapshots = self.snapshots()
        oldest_starts = self.oldest_starts()
        # Built outside the lock, so tasks finishing during a scrape wait only for the copy.
        family = self._families()
        for task in snapshots:
            labels = list(task.values)
            family[names.SCHEDULED].add_metric(labels, task.scheduled)
            self._add_histogram(family[names.WAIT], labels, task.wait)
            for status, histogram in task.durations.items():
                self._add_histogram(family[names.DURATION], [*labels, status], histogram)
            family[names.IN_PROGRESS].add_metric(labels, task.in_progress)
            oldest = oldest_starts.get(task.values)
            if oldest is not None:  # absent while nothing runs
                family[names.IN_PROGRESS_SINCE].add_metric(labels, oldest)
            for label, count in task.exceptions.items():
                family[names.EXCEPTIONS].add_metric([*labels, label], count)
            family[names.SKIPPED].add_metric(labels, task.skipped)
            family[names.LAST_SUCCESS].add_metric(labels, task.last_success)
        return list(family.values())

    def _families(self) -> dict[names.Family, Any]:
        options = self._options
        return {
            family: _KINDS[family.kind](metric_name(options, family), family.help, labels=label_names(options, family))
            for family in names.TASK_FAMILIES
        }

    def _add_histogram(self, family: HistogramMetricFamily, values: list[str], histogram: _Histogram) -> None:
        buckets: list[tuple[str, float] | tuple[str, float, Exemplar]] = []
        total = 0.0
        for le, count, exemplar in zip(self._le, histogram.counts, histogram.exemplars, strict=True):
            total += count
            if exemplar is not None:
                span_context, value, timestamp = exemplar
                ids = exemplar_labels(span_context)
                if ids is not None:
                    buckets.append((le, total, Exemplar(ids, value, timestamp)))
                    continue
            buckets.append((le, total))
        family.add_metric(values, buckets, histogram.sum)
