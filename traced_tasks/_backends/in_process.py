"""The default metrics backend: counts kept in this process as plain numbers, and handed to prometheus_client as
a custom collector when scraped, its documented extension point.

An update from the main thread, where servers run their event loop and prefork workers their tasks, takes no lock;
one from any other thread takes one: a fraction of prometheus_client's own metric objects, which lock per child and
value. The runs in progress are the runs started and not finished, from the same counts; when the oldest of them
started comes from the runs themselves, as the configuration's activity record holds them.
"""

from __future__ import annotations

import bisect
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from threading import get_ident
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

_GIL: bool = getattr(sys, "_is_gil_enabled", lambda: True)()

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

    def add(self, other: _Histogram) -> None:
        """Add `other`'s observations; each bucket keeps the later of the two exemplars."""
        self.counts = [mine + theirs for mine, theirs in zip(self.counts, other.counts, strict=True)]
        self.exemplars = [
            mine if theirs is None or (mine is not None and mine[2] >= theirs[2]) else theirs
            for mine, theirs in zip(self.exemplars, other.exemplars, strict=True)
        ]
        self.sum += other.sum


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


class _Tally:
    """The counts of one set of label values that one writer keeps, one thread at a time: plain numbers."""

    __slots__ = ("durations", "exceptions", "last_success", "scheduled", "skipped", "success", "wait")

    def __init__(self, size: int) -> None:
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
        self.scheduled += 1

    def skip(self) -> None:
        self.skipped += 1

    def start(self, index: int, wait: float) -> None:
        histogram = self.wait
        histogram.counts[index] += 1
        histogram.sum += wait

    def succeed(self, index: int, seconds: float, now: float, exemplar: SpanContext | None) -> None:
        self.last_success = now
        histogram = self.success
        histogram.counts[index] += 1
        histogram.sum += seconds
        if exemplar is not None:
            histogram.exemplars[index] = (exemplar, seconds, now)

    def fail(
        self, status: str, index: int, seconds: float, now: float, exemplar: SpanContext | None, exception: str | None
    ) -> None:
        histogram = self.durations.get(status)
        if histogram is None:
            # setdefault: a finalizer that the allocation sets off may count a run of this status first.
            histogram = self.durations.setdefault(status, _Histogram(len(self.wait.counts)))
        histogram.counts[index] += 1
        histogram.sum += seconds
        if exemplar is not None:
            histogram.exemplars[index] = (exemplar, seconds, now)
        if exception is not None:
            self.exceptions[exception] = self.exceptions.get(exception, 0.0) + 1

    def read(self, values: tuple[str, ...]) -> Snapshot:
        """A copy, right while its writer goes on: each part is copied in one step, and before what must have come
        first. Outcomes before starts, so that a run read as ended is read as started too (in_progress is never
        negative); starts and skips before schedules."""
        durations = {status: histogram.copy() for status, histogram in dict(self.durations).items()}
        exceptions = dict(self.exceptions)
        last_success = self.last_success
        wait = self.wait.copy()
        skipped = self.skipped
        return Snapshot(values, self.scheduled, wait, durations, exceptions, skipped, last_success)


class InProcessCounts:
    """The counts of one set of label values, in two tallies. The main thread keeps the first without a lock: it is
    that tally's only writer, and the with statement of a lock costs more than the rest of an update. Every other
    thread keeps the second, under the backend's lock."""

    __slots__ = ("_bounds", "_lock", "_others", "_own", "_writer", "values")

    def __init__(self, bounds: Sequence[float], lock: threading.Lock, values: tuple[str, ...]) -> None:
        self.values = values
        self._bounds = bounds
        self._lock = lock
        # The main thread runs a service's event loop, or a prefork worker's tasks. Without a GIL (a free-threaded
        # build), a read in steps is not known to keep its order: every thread takes the lock.
        self._writer = threading.main_thread().ident if _GIL else None
        self._own = _Tally(len(bounds) + 1)
        self._others: _Tally | None = None  # made at another thread's first update

    def _locked(self, update: Callable[..., None], *args: Any) -> None:
        """An update from a thread other than the main one: into the second tally, under the backend's lock, the
        tally made at the first such update."""
        with self._lock:
            others = self._others
            if others is None:
                others = self._others = _Tally(len(self._bounds) + 1)
            update(others, *args)

    # On the main thread, schedule() and skip() add in place rather than call _Tally's method: every task a service
    # schedules takes that path.
    def schedule(self) -> None:
        if get_ident() == self._writer:
            self._own.scheduled += 1
        else:
            self._locked(_Tally.schedule)

    def start(self, wait: float, started_at: float, oldest: float | None) -> None:
        index = bisect.bisect_left(self._bounds, wait)
        if get_ident() == self._writer:
            self._own.start(index, wait)
        else:
            self._locked(_Tally.start, index, wait)

    def succeed(self, seconds: float, started_at: float, exemplar: SpanContext | None, oldest: float | None) -> None:
        index = bisect.bisect_left(self._bounds, seconds)
        now = started_at + seconds  # the run's end, without another read of the clock
        if get_ident() == self._writer:
            self._own.succeed(index, seconds, now, exemplar)
        else:
            self._locked(_Tally.succeed, index, seconds, now, exemplar)

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
        if get_ident() == self._writer:
            self._own.fail(status, index, seconds, now, exemplar, exception)
        else:
            self._locked(_Tally.fail, status, index, seconds, now, exemplar, exception)

    def skip(self) -> None:
        if get_ident() == self._writer:
            self._own.skipped += 1
        else:
            self._locked(_Tally.skip)

    def snapshot(self) -> Snapshot:
        """Both tallies added up. Under the backend's lock, which holds the second still."""
        own = self._own.read(self.values)
        if self._others is None:
            return own
        others = self._others.read(self.values)
        own.wait.add(others.wait)
        durations = own.durations
        for status, histogram in others.durations.items():
            if status in durations:
                durations[status].add(histogram)
            else:
                durations[status] = histogram
        exceptions = own.exceptions
        for name, count in others.exceptions.items():
            exceptions[name] = exceptions.get(name, 0.0) + count
        return own._replace(
            scheduled=own.scheduled + others.scheduled,
            skipped=own.skipped + others.skipped,
            last_success=max(own.last_success, others.last_success),
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
