"""The metrics backend for OpenTelemetry: the same families as instruments of a MeterProvider, to leave over OTLP or
any reader the application set up.

OpenTelemetry's Prometheus translation turns each instrument into the Prometheus family of the same meaning (see
_conventions.Family), so one set of dashboards and rules reads both paths. The counts are kept in this process, as
the default backend keeps them: the two histograms are measured at each run, and every other family is observed from
those counts when the meter provider collects, which costs a run nothing.
"""

from __future__ import annotations

import fnmatch
import logging
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
from opentelemetry.trace import NonRecordingSpan, SpanContext
from prometheus_client import CollectorRegistry

from traced_tasks import _conventions as names
from traced_tasks import _sampled
from traced_tasks._activity import Activity
from traced_tasks._backends.base import Backend, TaskTotals
from traced_tasks._backends.in_process import InProcessBackend, InProcessCounts, Snapshot
from traced_tasks._options import Options
from traced_tasks._version import __version__

logger = logging.getLogger("traced_tasks")

# The context measurements are made in, when no span of a run is to become their exemplar: without one, the SDK
# would take the current context's span, which is the request's, not the task's.
_NO_SPAN = trace.set_span_in_context(trace.INVALID_SPAN, Context())

# Series of the run-time histogram per set of label values: success, error and cancelled.
_STATUSES = 3


class _Instruments:
    """The instruments of one meter provider and namespace, and the counts they observe. OpenTelemetry hands back the
    instrument it made first for a name, callbacks and buckets included, so each configuration on the same provider
    shares these, and counts on where the one before stopped."""

    def __init__(self, provider: MeterProvider, options: Options) -> None:
        self.provider = provider  # kept alive, so that its id() stays this entry's key
        self.buckets = list(options.buckets)
        self.route_label = options.route_label
        self.label_names = options.label_names
        self.limit = attribute_set_limit(provider, options.namespace)
        # The activity records of every configuration counting here, whose runs in progress are observed.
        self.activities: weakref.WeakSet[Activity] = weakref.WeakSet()
        self.counts = InProcessBackend(options, None, self.activities_now)
        self._pairs: set[tuple[tuple[str, ...], str]] = set()
        self.lock = threading.Lock()
        meter = provider.get_meter(names.INSTRUMENTATION_NAME, __version__)
        prefix = f"{options.namespace}." if options.namespace else ""

        def make(kind: Callable[..., Any], family: names.Family, **extra: Any) -> Any:
            return kind(prefix + family.instrument, unit=family.unit, description=family.help, **extra)

        self.wait = make(meter.create_histogram, names.WAIT, explicit_bucket_boundaries_advisory=self.buckets)
        self.duration = make(meter.create_histogram, names.DURATION, explicit_bucket_boundaries_advisory=self.buckets)
        observed = {
            names.SCHEDULED: (meter.create_observable_counter, self._scheduled),
            names.SKIPPED: (meter.create_observable_counter, self._skipped),
            names.EXCEPTIONS: (meter.create_observable_counter, self._exceptions),
            names.IN_PROGRESS: (meter.create_observable_up_down_counter, self._in_progress),
            names.IN_PROGRESS_SINCE: (meter.create_observable_gauge, self._oldest_starts),
            names.LAST_SUCCESS: (meter.create_observable_gauge, self._last_successes),
        }
        for family, (kind, callback) in observed.items():
            make(kind, family, callbacks=[callback])
        for family in names.SAMPLED_FAMILIES:
            make(meter.create_observable_gauge, family, callbacks=[self._sampled(family)])

    def activities_now(self) -> list[Activity]:
        """The activity records counting here now, which a configure() in another thread may add to."""
        with self.lock:
            return list(self.activities)

    def exception(self, values: tuple[str, ...], exception: str) -> str:
        """The exception label of a failure, past the limit of (task, exception) pairs the overflow value: for each
        set of label values one more pair is left, for its overflow."""
        pair = (values, exception)
        if self.limit is None or exception == names.OVERFLOW:
            return exception
        with self.lock:
            if pair in self._pairs:
                return exception
            if len(self._pairs) < self.limit - (self.limit // _STATUSES):
                self._pairs.add(pair)
                return exception
        return names.OVERFLOW

    def _attributes(self, snapshot: Snapshot) -> dict[str, str]:
        return dict(zip(self.label_names, snapshot.values, strict=True))

    def _observe(self, value: Callable[[Snapshot], float]) -> list[Observation]:
        return [Observation(value(task), self._attributes(task)) for task in self.counts.snapshots()]

    def _scheduled(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._observe(lambda task: task.scheduled)

    def _skipped(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._observe(lambda task: task.skipped)

    def _in_progress(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._observe(lambda task: task.in_progress)

    def _last_successes(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._observe(lambda task: task.last_success)

    def _exceptions(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(count, {**self._attributes(task), names.LABEL_EXCEPTION: exception})
            for task in self.counts.snapshots()
            for exception, count in task.exceptions.items()
        ]

    def _oldest_starts(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(oldest, dict(zip(self.label_names, values, strict=True)))
            for values, oldest in self.counts.oldest_starts().items()
        ]

    def _sampled(self, family: names.Family) -> Callable[[CallbackOptions], Iterable[Observation]]:
        keys = family.labels or ()

        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [
                Observation(sample.value, dict(zip(keys, sample.labels, strict=True)))
                for sample in _sampled.collect()
                if sample.family is family
            ]

        return observe


def attribute_set_limit(provider: MeterProvider, namespace: str) -> int | None:
    """How many attribute sets the SDK keeps per instrument of ours: the readers' limit, or that of the views that
    match our instruments; None where there is none (another SDK, or one before 1.45)."""
    config = getattr(provider, "_sdk_config", None)
    limits = [
        limit
        for reader in getattr(provider, "_metric_readers", ())
        for limit in (getattr(reader, "_instrument_class_cardinality_limit", None) or {}).values()
        if isinstance(limit, int)
    ]
    if not limits:
        return None
    default = min(limits)
    ours = (f"{namespace}." if namespace else "") + names.DURATION.instrument
    views = [
        getattr(view, "_aggregation_cardinality_limit", None) or default
        for view in getattr(config, "views", ())
        if isinstance(getattr(view, "_instrument_name", None), str) and fnmatch.fnmatch(ours, view._instrument_name)
    ]
    return min(views, default=default)


_instruments: dict[tuple[int, str], _Instruments] = {}
_instruments_lock = threading.Lock()


def _instruments_for(provider: MeterProvider, options: Options) -> _Instruments:
    with _instruments_lock:
        key = (id(provider), options.namespace)
        found = _instruments.get(key)
        if found is None:
            found = _instruments[key] = _Instruments(provider, options)
        elif found.buckets != list(options.buckets):
            raise ValueError(
                f"buckets: this MeterProvider's histograms have the buckets {tuple(found.buckets)} since an earlier "
                "configure(), and OpenTelemetry keeps an instrument's first buckets; pass those, or a new MeterProvider"
            )
        elif found.route_label != options.route_label:
            raise ValueError(
                f"route_label: this MeterProvider's instruments have route_label={found.route_label} since an earlier "
                "configure(), and OpenTelemetry keeps an instrument's series; pass that, or a new MeterProvider"
            )
        return found


class _Counts:
    """One set of label values: the counts kept here, and the run's wait and run time as measurements."""

    __slots__ = ("_base", "_by_status", "_instruments", "_local", "_values")

    def __init__(self, backend: OpenTelemetryBackend, values: tuple[str, ...]) -> None:
        self._instruments = instruments = backend.instruments
        self._values = values
        self._local: InProcessCounts = instruments.counts.counts(values)
        self._base = dict(zip(instruments.label_names, values, strict=True))
        self._by_status = {
            status: {**self._base, names.LABEL_STATUS: status}
            for status in (names.STATUS_SUCCESS, names.STATUS_ERROR, names.STATUS_CANCELLED)
        }

    def schedule(self) -> None:
        self._local.schedule()

    def start(self, wait: float, started_at: float, oldest: float | None) -> None:
        self._local.start(wait, started_at, oldest)
        self._instruments.wait.record(wait, self._base, context=_NO_SPAN)

    def succeed(self, seconds: float, started_at: float, exemplar: SpanContext | None, oldest: float | None) -> None:
        self._local.succeed(seconds, started_at, exemplar, oldest)
        self._instruments.duration.record(seconds, self._by_status[names.STATUS_SUCCESS], context=_exemplar(exemplar))

    def fail(
        self,
        status: str,
        seconds: float,
        started_at: float,
        exemplar: SpanContext | None,
        exception: str | None,
        oldest: float | None,
    ) -> None:
        if exception is not None:
            exception = self._instruments.exception(self._values, exception)
        self._local.fail(status, seconds, started_at, exemplar, exception, oldest)
        self._instruments.duration.record(seconds, self._by_status[status], context=_exemplar(exemplar))

    def skip(self) -> None:
        self._local.skip()


def _exemplar(span_context: SpanContext | None) -> Context:
    """The context a duration is recorded in: the run's span, sampled, so that the SDK's trace-based exemplar filter
    attaches its trace and span IDs."""
    if span_context is None:
        return _NO_SPAN
    return trace.set_span_in_context(NonRecordingSpan(span_context), Context())


class OpenTelemetryBackend(Backend):
    """The families as instruments of `options.meter_provider`."""

    def __init__(self, options: Options, activity: Activity) -> None:
        assert options.meter_provider is not None
        self._activity = activity
        self._registry = options.registry
        self.instruments = _instruments_for(options.meter_provider, options)

    def counts(self, values: tuple[str, ...]) -> _Counts:
        return _Counts(self, values)

    def registry(self) -> CollectorRegistry:
        """The application's registry: traced_tasks' own series leave through OpenTelemetry."""
        return self._registry

    def totals(self) -> list[TaskTotals]:
        return self.instruments.counts.totals()

    def open(self) -> None:
        with self.instruments.lock:
            self.instruments.activities.add(self._activity)

    def close(self) -> None:
        """Nothing to take out: a run of this configuration still in progress is still observed."""

    def series_limit(self) -> int | None:
        """The most sets of label values whose run-time series all fit under the SDK's limit, with one more set for
        the overflow."""
        limit = self.instruments.limit
        return None if limit is None else limit // _STATUSES - 1
