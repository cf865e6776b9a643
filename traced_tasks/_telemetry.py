"""One configuration's tracer and metrics, and what they do around each task run."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import anyio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from prometheus_client import REGISTRY, CollectorRegistry

from traced_tasks import _multiprocess, _request
from traced_tasks import _names as names
from traced_tasks._metrics import DEFAULT_BUCKETS, MAX_ROUTES, CappedLabel, TaskMetrics, make_metrics
from traced_tasks._naming import identify
from traced_tasks._version import __version__

logger = logging.getLogger("traced_tasks")

_ROOT = Context()
_PARTIAL = functools.partial

DEFAULT_MAX_TASK_NAMES = 1000


class TaskTelemetry:
    """What every run of one callable shares: its span name and attributes, its task label, and its Targets."""

    __slots__ = ("attributes", "code", "label", "span_name", "targets")

    def __init__(self, span_name: str, attributes: dict[str, str | int], label: str, code: object) -> None:
        self.span_name = span_name
        self.attributes = attributes
        self.label = label  # the task label value: the name, or the overflow value past the cap
        # By the route scheduling it, for up to MAX_ROUTES routes.
        self.targets: dict[str | None, Target] = {}
        self.code = code  # keeps the code object, whose id() is part of the cache key, alive


class Target:
    """What every run of one callable scheduled from one route shares: span name and attributes, and counts."""

    __slots__ = ("attributes", "metrics", "span_name", "telemetry")

    def __init__(
        self, telemetry: Telemetry, span_name: str, attributes: dict[str, str | int], metrics: TaskMetrics
    ) -> None:
        self.telemetry = telemetry
        self.span_name = span_name
        self.attributes = attributes
        self.metrics = metrics


class Telemetry:
    """The tracer, the metric families and the per-callable cache of one `configure()` call."""

    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        registry: CollectorRegistry = REGISTRY,
        namespace: str = "",
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        max_task_names: int = DEFAULT_MAX_TASK_NAMES,
        use_span_links: bool = False,
        isolate_tasks: bool = False,
        route_label: bool = False,
    ) -> None:
        # With no provider this is the API's proxy tracer, which follows the global provider whenever it is set.
        self.tracer = trace.get_tracer(names.INSTRUMENTATION_NAME, __version__, tracer_provider=tracer_provider)
        self.metrics = make_metrics(
            registry, namespace, buckets, route_label, multiprocess=_multiprocess.directory() is not None
        )
        self.use_span_links = use_span_links
        self.isolate_tasks = isolate_tasks
        self.max_task_names = max_task_names
        self._tasks: dict[object, TaskTelemetry] = {}
        self._names = CappedLabel(max_task_names, "task names")
        self._lock = threading.Lock()
        self._reported: set[str] = set()

    def task(self, func: Callable[..., Any]) -> TaskTelemetry:
        target: Any = func
        while type(target) is _PARTIAL:
            target = target.func
        code = getattr(target, "__code__", None)
        # Functions and bound methods are keyed by their code object, which every closure made from one `def`
        # shares, so closures created per request stay one entry; the names tell apart functions that share
        # code, such as those one decorator makes. id(), because equal code objects can live in different
        # modules; the cached entry holds the code, so its id is not reused. Other callables go by name.
        key = (id(code), target.__module__, target.__qualname__) if code is not None else identify(target).name
        task = self._tasks.get(key)
        if task is None:
            task = self._resolve(target, key, code)
        return task

    def _resolve(self, func: Callable[..., Any], key: object, code: object) -> TaskTelemetry:
        with self._lock:
            task = self._tasks.get(key)
            if task is not None:
                return task
            identity = identify(func)
            label = self._names.admit(identity.name)
            attributes: dict[str, str | int] = {names.ATTR_FUNCTION: identity.name}
            if identity.file is not None and identity.line is not None:
                attributes[names.ATTR_FILE] = identity.file
                attributes[names.ATTR_LINE] = identity.line
            task = TaskTelemetry(names.SPAN_NAME_PREFIX + identity.name, attributes, label, code)
            # Only code generated at run time (exec, eval) makes new keys without end; past this, resolve each time.
            if len(self._tasks) < 4 * self.max_task_names:
                self._tasks[key] = task
            return task

    def target(self, task: TaskTelemetry, route: str | None) -> Target:
        """The callable's Target for the route scheduling it."""
        target = task.targets.get(route)
        if target is None:
            # Without the route label, every route's Target gets the task's one set of counts.
            metrics = self.metrics.for_task(task.label, route)
            attributes = task.attributes if route is None else {**task.attributes, names.ATTR_ROUTE: route}
            target = Target(self, task.span_name, attributes, metrics)
            if len(task.targets) < MAX_ROUTES:  # past that, an application adding routes without end
                task.targets[route] = target
        return target

    def report(self, part: str) -> None:
        """Log the exception being handled, once per part, so a broken exporter cannot flood the logs."""
        with self._lock:
            if part in self._reported:
                return
            self._reported.add(part)
        logger.exception("traced_tasks: %s failed; tasks run on without it, and later failures are not logged", part)

    def schedule(self, func: Callable[..., Any]) -> Scheduled | None:
        """Capture what a task needs at its run and count it as scheduled; never raises. None: setup failed."""
        try:
            scheduled = Scheduled(self.target(self.task(func), _request.route()))
        except Exception:
            self.report("task setup")
            return None
        try:
            scheduled.target.metrics.schedule()
        except Exception:
            self.report("metrics")
        return scheduled

    def start(self, scheduled: Scheduled) -> tuple[Span | None, object]:
        """Open the span, make it current and count the start; never raises. Returns the span, None when
        there is none of ours, and the token that restores the context."""
        started_ns = time.perf_counter_ns()
        target = scheduled.target
        parent = scheduled.context
        span: Span | None = None
        token: object = None
        try:
            if self.use_span_links:
                request = trace.get_current_span(parent).get_span_context()
                links = [Link(request)] if request.is_valid else None
                span = self.tracer.start_span(
                    target.span_name, context=_ROOT, kind=SpanKind.INTERNAL, attributes=target.attributes, links=links
                )
            else:
                span = self.tracer.start_span(
                    target.span_name, context=parent, kind=SpanKind.INTERNAL, attributes=target.attributes
                )
                if not span.is_recording() and span is trace.get_current_span(parent):
                    # The API's no-op tracer hands back the parent's own span: nothing of ours to end or annotate.
                    span = None
            # The parent context, not the run-time one, so baggage set before add_task reaches the task too.
            token = otel_context.attach(parent if span is None else trace.set_span_in_context(span, parent))
        except Exception:
            self.report("tracing")
            if token is None:
                with contextlib.suppress(Exception):
                    token = otel_context.attach(parent)
        try:
            target.metrics.start((started_ns - scheduled.scheduled_ns) / 1e9)
        except Exception:
            self.report("metrics")
        return span, token

    def finish(
        self, metrics: TaskMetrics, span: Span | None, token: object, started_ns: int, exc: BaseException | None
    ) -> None:
        """Close the span, restore the context and count the outcome; never raises."""
        seconds = (time.perf_counter_ns() - started_ns) / 1e9
        cancelled = exc is not None and is_cancellation(exc)
        if token is not None:
            otel_context.detach(token)  # type: ignore[arg-type]  # logs, never raises
        exemplar = None
        if span is not None:
            try:
                span_context = span.get_span_context()
                if span_context.trace_flags.sampled and span.is_recording():
                    exemplar = span_context
                if cancelled:
                    span.set_attribute(names.ATTR_STATUS, names.STATUS_CANCELLED)
                elif exc is not None:
                    span.add_event(names.EVENT_EXCEPTION, _exception_attributes(exc))
                    span.set_attribute(names.ATTR_ERROR_TYPE, type(exc).__qualname__)
                    span.set_status(Status(StatusCode.ERROR))
                span.end()
            except Exception:
                self.report("tracing")
        try:
            if exc is None:
                metrics.succeed(seconds, exemplar)
            else:
                status = names.STATUS_CANCELLED if cancelled else names.STATUS_ERROR
                metrics.fail(status, seconds, exemplar, type(exc))
        except Exception:
            self.report("metrics")

    def skip(self, metrics: TaskMetrics) -> None:
        try:
            metrics.skip()
        except Exception:
            self.report("metrics")


class Scheduled:
    """A task as scheduled: what its runs share, and the context and clock captured at add_task."""

    __slots__ = ("context", "scheduled_ns", "target")

    def __init__(self, target: Target) -> None:
        self.target = target
        self.context = otel_context.get_current()
        self.scheduled_ns = time.perf_counter_ns()


def is_cancellation(exc: BaseException) -> bool:
    # GeneratorExit: the task's coroutine was closed, as at interpreter shutdown.
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return True
    try:
        return isinstance(exc, anyio.get_cancelled_exc_class())  # trio's Cancelled under the trio backend
    except Exception:  # no async library running
        return False


def _exception_attributes(exc: BaseException) -> dict[str, str]:
    """The exception event's attributes, without the exception's message, which may hold personal data.

    Span.record_exception would add the message twice: as exception.message and as the last line of
    the stack trace.
    """
    kind = type(exc)
    module = kind.__module__
    name = kind.__qualname__ if module in (None, "builtins") else f"{module}.{kind.__qualname__}"
    stack = "".join(traceback.format_tb(exc.__traceback__))
    return {
        names.ATTR_EXCEPTION_TYPE: name,
        names.ATTR_EXCEPTION_STACKTRACE: f"Traceback (most recent call last):\n{stack}{name}",
    }
