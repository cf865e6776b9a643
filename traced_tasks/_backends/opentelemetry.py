"""The metrics backend for OpenTelemetry: the same families as instruments of a MeterProvider, to leave over OTLP or
any reader the application set up.

OpenTelemetry's Prometheus translation turns each instrument into the Prometheus family of the same meaning (see
_conventions.Family), so one set of dashboards and rules reads both paths. The counts are also kept in this
process, as the default backend keeps them, for the task console and for the gauge of the oldest run in progress,
which OpenTelemetry reads through a callback.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
from opentelemetry.trace import NonRecordingSpan, SpanContext
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from traced_tasks import _conventions as names
from traced_tasks._activity import Activity
from traced_tasks._backends.in_process import InProcessBackend, InProcessCounts
from traced_tasks._options import Options
from traced_tasks._version import __version__

# The context measurements are made in, when no span of a run is to become their exemplar: without one, the SDK
# would take the current context's span, which is the request's, not the task's.
_NO_SPAN = trace.set_span_in_context(trace.INVALID_SPAN, Context())


class _Instruments:
    """The instruments of one meter provider and namespace. OpenTelemetry hands back the instrument it made first for
    a name, callbacks and buckets included, so each configuration on the same provider shares these."""

    def __init__(self, provider: MeterProvider, prefix: str, buckets: list[float]) -> None:
        self.provider = provider  # kept alive, so that its id() stays this entry's key
        self.buckets = buckets
        self.observed: OpenTelemetryBackend | None = None  # the configuration whose runs in progress are observed
        self._series: set[tuple[tuple[str, str], ...]] = set()
        self._lock = threading.Lock()
        meter = provider.get_meter(names.INSTRUMENTATION_NAME, __version__)

        def family(kind: Any, family: names.Family, **extra: Any) -> Any:
            return kind(prefix + family.instrument, unit=family.unit, description=family.help, **extra)

        self.scheduled = family(meter.create_counter, names.SCHEDULED)
        self.wait = family(meter.create_histogram, names.WAIT, explicit_bucket_boundaries_advisory=buckets)
        self.duration = family(meter.create_histogram, names.DURATION, explicit_bucket_boundaries_advisory=buckets)
        self.in_progress = family(meter.create_up_down_counter, names.IN_PROGRESS)
        self.exceptions = family(meter.create_counter, names.EXCEPTIONS)
        self.skipped = family(meter.create_counter, names.SKIPPED)
        self.last_success = family(meter.create_gauge, names.LAST_SUCCESS)
        family(meter.create_observable_gauge, names.IN_PROGRESS_SINCE, callbacks=[self._oldest_starts])

    def first(self, attributes: dict[str, str]) -> bool:
        """Whether this set of attributes is new to these instruments, in this process."""
        key = tuple(sorted(attributes.items()))
        with self._lock:
            if key in self._series:
                return False
            self._series.add(key)
            return True

    def _oldest_starts(self, options: CallbackOptions) -> Iterable[Observation]:
        backend = self.observed
        return [] if backend is None else backend.oldest_starts()


_instruments: dict[tuple[int, str], _Instruments] = {}
_instruments_lock = threading.Lock()


def _instruments_for(provider: MeterProvider, prefix: str, buckets: list[float]) -> _Instruments:
    with _instruments_lock:
        found = _instruments.get((id(provider), prefix))
        if found is None:
            found = _instruments[(id(provider), prefix)] = _Instruments(provider, prefix, buckets)
        elif found.buckets != buckets:
            raise ValueError(
                f"buckets: this MeterProvider's histograms have the buckets {tuple(found.buckets)} since an earlier "
                "configure(), and OpenTelemetry keeps an instrument's first buckets; pass those, or a new MeterProvider"
            )
        return found


class _Counts:
    """One set of label values: the counts kept here, and the same events as measurements."""

    __slots__ = ("_base", "_by_status", "_instruments", "_local")

    def __init__(self, backend: OpenTelemetryBackend, values: tuple[str, ...]) -> None:
        self._instruments = instruments = backend.instruments
        self._local: InProcessCounts = backend.local.counts(values)
        self._base = dict(zip(backend.labelnames, values, strict=True))
        self._by_status = {
            status: {**self._base, names.LABEL_STATUS: status}
            for status in (names.STATUS_SUCCESS, names.STATUS_ERROR, names.STATUS_CANCELLED)
        }
        if instruments.first(self._base):
            # The series the Prometheus path makes at 0 for a task's first schedule; a histogram's cannot be made
            # before its first measurement. Once: a later configuration must not set a last success back to 0.
            for instrument in (instruments.scheduled, instruments.skipped, instruments.in_progress):
                instrument.add(0, self._base, context=_NO_SPAN)
            instruments.last_success.set(0.0, self._base, context=_NO_SPAN)

    def schedule(self) -> None:
        self._local.schedule()
        self._instruments.scheduled.add(1, self._base, context=_NO_SPAN)

    def start(self, wait: float, started_at: float) -> None:
        self._local.start(wait, started_at)
        instruments = self._instruments
        instruments.wait.record(wait, self._base, context=_NO_SPAN)
        instruments.in_progress.add(1, self._base, context=_NO_SPAN)

    def succeed(self, seconds: float, started_at: float, exemplar: SpanContext | None) -> None:
        self._local.succeed(seconds, started_at, exemplar)
        instruments = self._instruments
        instruments.in_progress.add(-1, self._base, context=_NO_SPAN)
        instruments.duration.record(seconds, self._by_status[names.STATUS_SUCCESS], context=_exemplar(exemplar))
        instruments.last_success.set(self._local.last_success, self._base, context=_NO_SPAN)

    def fail(
        self, status: str, seconds: float, started_at: float, exemplar: SpanContext | None, exception: str | None
    ) -> None:
        self._local.fail(status, seconds, started_at, exemplar, exception)
        instruments = self._instruments
        instruments.in_progress.add(-1, self._base, context=_NO_SPAN)
        instruments.duration.record(seconds, self._by_status[status], context=_exemplar(exemplar))
        if exception is not None:
            instruments.exceptions.add(1, {**self._base, names.LABEL_EXCEPTION: exception}, context=_NO_SPAN)

    def skip(self) -> None:
        self._local.skip()
        self._instruments.skipped.add(1, self._base, context=_NO_SPAN)


def _exemplar(span_context: SpanContext | None) -> Context:
    """The context a duration is recorded in: the run's span, sampled, so that the SDK's trace-based exemplar filter
    attaches its trace and span IDs."""
    if span_context is None:
        return _NO_SPAN
    return trace.set_span_in_context(NonRecordingSpan(span_context), Context())


class OpenTelemetryBackend:
    """The families as instruments of `options.meter_provider`."""

    def __init__(self, options: Options, activity: Activity) -> None:
        assert options.meter_provider is not None
        self.local = InProcessBackend(options, None, activity)
        self.labelnames = options.label_names
        self._registry = options.registry
        prefix = f"{options.namespace}." if options.namespace else ""
        self.instruments = _instruments_for(options.meter_provider, prefix, list(options.buckets))

    def counts(self, values: tuple[str, ...]) -> _Counts:
        return _Counts(self, values)

    def registry(self) -> CollectorRegistry:
        """The application's registry: traced_tasks' own series leave through OpenTelemetry."""
        return self._registry

    def collect(self) -> Iterable[Metric]:
        return self.local.collect()

    def open(self) -> None:
        self.instruments.observed = self

    def close(self) -> None:
        if self.instruments.observed is self:
            self.instruments.observed = None

    def known_task_names(self) -> set[str]:
        return set()

    def processes(self) -> int | None:
        return None

    def oldest_starts(self) -> list[Observation]:
        return [
            Observation(oldest, dict(zip(self.labelnames, values, strict=True)))
            for values, (_, oldest) in self.local.running().items()
        ]
