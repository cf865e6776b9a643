"""The BackgroundTasks classes the benchmarks compare, each built the way its users would build it."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette import background

import traced_tasks

P = ParamSpec("P")


class NullExporter(SpanExporter):
    """Spans to nowhere: what the SDK costs, without an exporter's."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def span_only(tracer: trace.Tracer) -> type[background.BackgroundTasks]:
    """What opentelemetry-instrumentation-fastapi does: start_as_current_span around Starlette's own call."""

    class SpanOnlyTask(background.BackgroundTask):
        async def __call__(self) -> None:
            span_name = f"BackgroundTask {getattr(self.func, '__name__', self.func.__class__.__name__)}"
            with tracer.start_as_current_span(span_name):
                await super().__call__()

    class SpanOnlyTasks(background.BackgroundTasks):
        def add_task(self, func: Callable[P, Any], *args: P.args, **kwargs: P.kwargs) -> None:
            self.tasks.append(SpanOnlyTask(func, *args, **kwargs))

    return SpanOnlyTasks


def span_with_code_attributes(tracer: trace.Tracer) -> type[background.BackgroundTasks]:
    """The span-only wrapper plus the three code attributes traced_tasks puts on its spans, found once per
    function: the SDK copies and checks span attributes at every start, and this shows what that costs."""
    found: dict[Callable[..., Any], dict[str, str | int]] = {}

    def attributes(func: Callable[..., Any]) -> dict[str, str | int]:
        known = found.get(func)
        if known is None:
            code = func.__code__
            name = f"{func.__module__}.{func.__qualname__}"
            known = found[func] = {
                "code.function.name": name,
                "code.file.path": code.co_filename,
                "code.line.number": code.co_firstlineno,
            }
        return known

    class AttributesTask(background.BackgroundTask):
        async def __call__(self) -> None:
            span_name = f"BackgroundTask {getattr(self.func, '__name__', self.func.__class__.__name__)}"
            with tracer.start_as_current_span(span_name, attributes=attributes(self.func)):
                await super().__call__()

    class AttributesTasks(background.BackgroundTasks):
        def add_task(self, func: Callable[P, Any], *args: P.args, **kwargs: P.kwargs) -> None:
            self.tasks.append(AttributesTask(func, *args, **kwargs))

    return AttributesTasks


def hand_written(tracer: trace.Tracer, registry: CollectorRegistry) -> type[background.BackgroundTasks]:
    """A careful user's own version: the same span and metrics, with prometheus_client's labels() per call."""
    buckets = traced_tasks.DEFAULT_BUCKETS
    scheduled = Counter("hand_scheduled", "", ["task"], registry=registry)
    wait = Histogram("hand_wait_seconds", "", ["task"], buckets=buckets, registry=registry)
    duration = Histogram("hand_duration_seconds", "", ["task", "status"], buckets=buckets, registry=registry)
    in_progress = Gauge("hand_in_progress", "", ["task"], registry=registry)
    exceptions = Counter("hand_exceptions", "", ["task", "exception"], registry=registry)
    skipped = Counter("hand_skipped", "", ["task"], registry=registry)
    last_success = Gauge("hand_last_success_timestamp_seconds", "", ["task"], registry=registry)

    class HandWrittenTask(background.BackgroundTask):
        def __init__(self, func: Callable[P, Any], *args: P.args, **kwargs: P.kwargs) -> None:
            super().__init__(func, *args, **kwargs)
            self.name = f"{func.__module__}.{func.__qualname__}"
            self.context = otel_context.get_current()
            self.scheduled_at = time.perf_counter()
            scheduled.labels(self.name).inc()

        async def __call__(self) -> None:
            start = time.perf_counter()
            wait.labels(self.name).observe(start - self.scheduled_at)
            in_progress.labels(self.name).inc()
            status = "success"
            with tracer.start_as_current_span(f"BackgroundTask {self.name}", context=self.context) as span:
                try:
                    await super().__call__()
                except Exception as exc:
                    status = "error"
                    exceptions.labels(self.name, type(exc).__qualname__).inc()
                    raise
                finally:
                    in_progress.labels(self.name).dec()
                    span_context = span.get_span_context()
                    exemplar = None
                    if span_context.trace_flags.sampled:
                        exemplar = {
                            "trace_id": format(span_context.trace_id, "032x"),
                            "span_id": format(span_context.span_id, "016x"),
                        }
                    duration.labels(self.name, status).observe(time.perf_counter() - start, exemplar)
                    if status == "success":
                        last_success.labels(self.name).set_to_current_time()

    class HandWrittenTasks(background.BackgroundTasks):
        def add_task(self, func: Callable[P, Any], *args: P.args, **kwargs: P.kwargs) -> None:
            self.tasks.append(HandWrittenTask(func, *args, **kwargs))

        async def __call__(self) -> None:
            for index, task in enumerate(self.tasks):
                try:
                    await task()
                except Exception:
                    for later in self.tasks[index + 1 :]:
                        if isinstance(later, HandWrittenTask):
                            skipped.labels(later.name).inc()
                    raise

    return HandWrittenTasks


def two_histograms(meter: metrics.Meter) -> type[background.BackgroundTasks]:
    """Starlette's tasks with the two histogram measurements a run needs at the least through OpenTelemetry (its
    wait and its run time), the SDK's floor for a task's metrics: what the OpenTelemetry path adds to the
    in-process counts can be no less."""
    wait = meter.create_histogram("floor.wait", unit="s")
    duration = meter.create_histogram("floor.duration", unit="s")

    class MeasuredTask(background.BackgroundTask):
        def __init__(self, func: Callable[P, Any], *args: P.args, **kwargs: P.kwargs) -> None:
            super().__init__(func, *args, **kwargs)
            self.scheduled = time.perf_counter()

        async def __call__(self) -> None:
            name = f"{self.func.__module__}.{self.func.__qualname__}"
            started = time.perf_counter()
            wait.record(started - self.scheduled, {"task": name})
            await super().__call__()
            duration.record(time.perf_counter() - started, {"task": name, "status": "success"})

    class MeasuredTasks(background.BackgroundTasks):
        def add_task(self, func: Callable[P, Any], *args: P.args, **kwargs: P.kwargs) -> None:
            self.tasks.append(MeasuredTask(func, *args, **kwargs))

    return MeasuredTasks
