"""A task's life as traced_tasks sees it: scheduled, then run, or skipped.

A `Run` is made when a task is scheduled (add_task, an engine's publish) or received from an engine's broker, and
owns the run from there: the context and clock of its scheduling, then the span, the context token, the run clock
and the counts. It is given the configuration the task was scheduled under (`Config`), and calls down only, into
its profiles and metrics backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import inspect
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, Protocol

import anyio
import anyio.to_thread
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, Tracer

from traced_tasks import _activity, _request
from traced_tasks import _conventions as names
from traced_tasks._activity import TaskRun
from traced_tasks._callables import describe, utf8
from traced_tasks._labels import Labels, error_type
from traced_tasks._options import Options
from traced_tasks._profiles import Profile, Profiles


class Config(Protocol):
    """What a run needs of the configuration it was scheduled under: `_config.Configuration` is the one there is."""

    options: Options
    tracer: Tracer
    profiles: Profiles
    labels: Labels
    activity: _activity.Activity

    def tracer_for(self, provider: trace.TracerProvider) -> Tracer: ...

    def report(self, part: str, task: str) -> None: ...

    def warn(self, part: str, task: str, message: str) -> None: ...


_ROOT = Context()
_ENDING = threading.Lock()
# What a run abandoned at a stop ends with.
_ABANDONED = asyncio.CancelledError("the server stopped while the task ran")


def schedule(config: Config, func: Callable[..., Any]) -> Run | None:
    """Capture what a task needs at its run and count it as scheduled; never raises. None: the setup failed."""
    scheduled = capture(config, func)
    if scheduled is not None:
        count_scheduled(config, scheduled.profile)
    return scheduled


def capture(config: Config, func: Callable[..., Any], route: object = None) -> Run | None:
    """A Run of `func` in the context and route of now, counting nothing yet; never raises. None: the setup failed.
    `route`, when it is text, stands for the route where no request is served now (a retry in a worker)."""
    try:
        context = otel_context.get_current()
        scope = _request.serving_scope()
        served = None if scope is None else _request.route(scope)
        route = served if served is not None or not isinstance(route, str) else route
        tracer = config.tracer
        if _request.NATIVE_KEY in context:
            context, route, tracer = _under_fastapis_telemetry(config, context, route)
        return Run(config, config.profiles.get(func, route), context, tracer)
    except Exception:
        config.report("task setup", _name(func))
        return None


def count_scheduled(config: Config, profile: Profile) -> None:
    try:
        profile.counts.schedule()
    except Exception:
        config.report("metrics", profile.name)


def published(config: Config, func: Callable[..., Any], carried: Mapping[str, Any]) -> None:
    """Count a message an engine published as scheduled, under the route it carries: for a publish traced_tasks did
    not make (task.delay(), a retry), once the engine published it."""
    try:
        route = carried.get(names.CARRIED_ROUTE)
        profile = config.profiles.get(func, route if isinstance(route, str) else None)
    except Exception:
        config.report("task setup", _name(func))
        return
    count_scheduled(config, profile)


def _under_fastapis_telemetry(
    config: Config, context: Context, route: str | None
) -> tuple[Context, str | None, Tracer]:
    """Under FastAPI's native telemetry the current span is its endpoint or dependency span, which ends before the task
    runs: the task belongs under the request's server span, with the route that span reports, in the provider
    FastAPI traces the request with."""
    native = _request.native_tracing(context)
    if native is None:
        return context, route, config.tracer
    provider, server_span, native_route = native
    tracer = config.tracer
    if provider is not None and config.options.tracer_provider is None:
        tracer = config.tracer_for(provider)
    return trace.set_span_in_context(server_span, context), native_route or route, tracer


class Run:
    """One run of a task, from add_task to its outcome: the configuration and profile it was scheduled under, the
    context and clock add_task captured, then its span, the context it makes current, its run clock and counts.

        scheduled = Run(config, profile, otel_context.get_current(), config.tracer)  # at add_task
        with scheduled:  # when the task runs
            await func(*args, **kwargs)

    The span is current inside the block, in the context captured when the Run was made. An exception leaves the
    block untouched.
    """

    __slots__ = (
        "_claimed",
        "_ended",
        "_span",
        "_started_ns",
        "_token",
        "config",
        "context",
        "engine",
        "kind",
        "profile",
        "scheduled_ns",
        "started_at",
        "tracer",
    )

    def __init__(self, config: Config, profile: Profile, context: Context, tracer: Tracer) -> None:
        self.config = config
        self.profile = profile
        self.context = context
        self.tracer = tracer
        self.scheduled_ns = time.perf_counter_ns()
        self.kind = SpanKind.INTERNAL  # CONSUMER for a run an engine delivered
        self.engine: Any = None  # the engine a run is handed to, for a task of an engine's
        self._claimed = False
        self._ended = False
        self._started_ns = 0  # 0 until the run starts

    @property
    def claimed(self) -> bool:
        """Whether a run of this task began, or it was counted as skipped."""
        return self._claimed

    def again(self) -> Run:
        """A Run with this one's scheduling, for a task object that runs more than once: attached to several
        responses, say."""
        again = copy.copy(self)
        again._started_ns = 0
        again._ended = False
        return again

    @property
    def task(self) -> str:
        return self.profile.name

    @property
    def route(self) -> str | None:
        return self.profile.route

    @property
    def values(self) -> tuple[str, ...]:
        return self.profile.values

    @property
    def started(self) -> bool:
        return self._started_ns != 0

    def __enter__(self) -> None:
        self._start(time.perf_counter_ns(), self.profile.span_name, self.kind)

    def _start(self, started_ns: int, span_name: str, kind: SpanKind, start_time: int | None = None) -> None:
        config = self.config
        profile = self.profile
        self._started_ns = started_ns
        self.started_at = time.time() - (time.perf_counter_ns() - started_ns) / 1e9 if start_time else time.time()
        parent = self.context
        span: Span | None = None
        token: object = None
        try:
            if config.options.use_span_links:
                span = _start_linked_span(self.tracer, span_name, kind, profile.attributes, parent, start_time)
            else:
                span = self.tracer.start_span(
                    span_name, context=parent, kind=kind, attributes=profile.attributes, start_time=start_time
                )
                if not span.is_recording() and (
                    span is trace.get_current_span(parent) or not span.get_span_context().is_valid
                ):
                    # The API's no-op tracer hands back the parent's own span (an invalid one, in older APIs):
                    # nothing of ours to end or annotate, and the parent context stays as it is.
                    span = None
            # The parent context, not the run-time one, so baggage set before add_task reaches the task too.
            token = otel_context.attach(parent if span is None else trace.set_span_in_context(span, parent))
        except Exception:
            config.report("tracing", profile.name)
            if token is None:
                with contextlib.suppress(Exception):
                    token = otel_context.attach(parent)
        self._span = span
        self._token = token
        try:
            profile.counts.start((started_ns - self.scheduled_ns) / 1e9, self.started_at)
        except Exception:
            config.report("metrics", profile.name)
        config.activity.running[self] = True

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._token is not None:
            otel_context.detach(self._token)  # type: ignore[arg-type]  # logs, never raises
        self._finish(exc)

    def abandon(self) -> None:
        """End a run that is still in progress as cancelled, now: at a server's stop, when nothing waits for it any
        more (a sync task's thread, a task that ignored its cancellation). Its own end then counts nothing."""
        self._finish(_ABANDONED)

    def _finish(self, exc: BaseException | None) -> None:
        seconds = (time.perf_counter_ns() - self._started_ns) / 1e9
        config = self.config
        profile = self.profile
        with _ENDING:  # its own exit, or abandon() at a stop: the first ends it
            if self._ended:
                return
            self._ended = True
        span = self._span
        cancelled = exc is not None and is_cancellation(exc)
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
                    span.set_attribute(names.ATTR_ERROR_TYPE, error_type(type(exc)))
                    span.set_status(Status(StatusCode.ERROR))
                span.end()
            except Exception:
                config.report("tracing", profile.name)
        if exc is None:
            status, exception = names.STATUS_SUCCESS, None
        elif cancelled:
            status, exception = names.STATUS_CANCELLED, None
        else:
            status, exception = names.STATUS_ERROR, config.labels.exception(type(exc))
        try:
            if exc is None:
                profile.counts.succeed(seconds, self.started_at, exemplar)
            else:
                profile.counts.fail(status, seconds, self.started_at, exemplar, exception)
        except Exception:
            config.report("metrics", profile.name)
        # Running until counted as finished: a scrape between the two would see it in neither.
        config.activity.running.pop(self, None)
        if exc is not None or _activity.captures:
            ended = self.started_at + seconds
            record = TaskRun(profile.task, status, exception, self._trace_id(), seconds, profile.route, ended)
            if exc is not None:
                config.activity.failures.append(record)
            for captured in _activity.captures:
                captured.append(record)

    def skip(self) -> None:
        """Count a run that never started because an earlier task stopped its batch."""
        self._claimed = True
        config, profile = self.config, self.profile
        try:
            profile.counts.skip()
        except Exception:
            config.report("metrics", profile.name)
        if _activity.captures:
            record = TaskRun(profile.task, names.STATUS_SKIPPED, None, None, 0.0, profile.route, time.time())
            for captured in _activity.captures:
                captured.append(record)

    def claim(self) -> Run:
        """The Run for a run of the task beginning now: this one, or another with its scheduling when this one ran
        already (a task object attached to several responses)."""
        run = self.again() if self._claimed else self
        run._claimed = True
        return run

    def carried(self, starts_at: float | None = None) -> dict[str, str]:
        """What travels with the message when an engine runs this task: the trace context it was scheduled in,
        through the configured propagator (traceparent, tracestate, baggage), the Unix time it was scheduled, or
        `starts_at`, the start it was given (an ETA: a delay on purpose is no wait), and its route."""
        carrier: dict[str, str] = {}
        try:
            propagate.inject(carrier, context=self.context)
            scheduled_at = time.time() - (time.perf_counter_ns() - self.scheduled_ns) / 1e9
            carrier[names.CARRIED_SCHEDULED_AT] = repr(max(scheduled_at, starts_at or 0.0))
            if self.profile.route is not None:
                carrier[names.CARRIED_ROUTE] = self.profile.route
        except Exception:
            self.config.report("tracing", self.profile.name)
        return carrier

    def hand_off_failed(self, exc: BaseException, began_ns: int) -> None:
        """Count a hand-off to an engine that failed (its broker is down, say) as this run, begun at `began_ns`,
        failing with the engine's exception: no run of it will start anywhere. Its span is a PRODUCER span of the
        publish, not one of the task."""
        start_time = time.time_ns() - (time.perf_counter_ns() - began_ns)
        self._start(began_ns, names.PUBLISH_SPAN_PREFIX + self.profile.name, SpanKind.PRODUCER, start_time)
        self.__exit__(type(exc), exc, exc.__traceback__)

    def call(self, func: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        """Run a sync task in this run, in a threadpool thread: its run starts when the thread starts it.

        A sync callable that returns a coroutine (a lambda around an async function, a decorator that lost the
        function's asyncness) did nothing: Starlette drops the coroutine unawaited. The run counts as an error,
        CoroutineNeverAwaited, the coroutine is closed, and a warning says so once per task; nothing is raised.
        """
        self.__enter__()
        try:
            result = func(*args, **kwargs)
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        if inspect.iscoroutine(result):
            result.close()
            self.config.warn(
                "coroutine",
                self.profile.name,
                "returned a coroutine that nothing awaits, so it never ran: make the task itself `async def`",
            )
            self.__exit__(CoroutineNeverAwaited, CoroutineNeverAwaited(), None)
        else:
            self.__exit__(None, None, None)
        return result

    def cancelled_before_start(self, exc: BaseException) -> None:
        """Count a run that was cancelled while it waited for a thread, with no run time to speak of."""
        self.__enter__()
        self.__exit__(type(exc), exc, exc.__traceback__)

    def _trace_id(self) -> str | None:
        """The trace ID of the span current in the task, when it is sampled: where its trace can be found."""
        try:
            span = self._span if self._span is not None else trace.get_current_span(self.context)
            span_context = span.get_span_context()
            if not span_context.is_valid or not span_context.trace_flags.sampled:
                return None
            return format(span_context.trace_id, "032x")
        except Exception:  # a tracer other than the SDK's; the run's outcome matters more than its trace ID
            return None


class CoroutineNeverAwaited(Exception):  # the outcome's name, never raised
    """The outcome of a sync task that returned a coroutine, which Starlette drops unawaited."""


def received(config: Config, func: Callable[..., Any], carried: Mapping[str, Any]) -> Run:
    """The Run of a message an engine delivered, to start now in this process: under the context, route and time of
    scheduling carried with it (`carried()`). A message that carries no time of scheduling (published by a process
    without traced_tasks) waited no time at all."""
    context = propagate.extract(carried, context=Context())
    route = carried.get(names.CARRIED_ROUTE)
    run = Run(config, config.profiles.get(func, route if isinstance(route, str) else None), context, config.tracer)
    run.kind = SpanKind.CONSUMER
    run._claimed = True
    with contextlib.suppress(KeyError, TypeError, ValueError):
        scheduled_at = float(carried[names.CARRIED_SCHEDULED_AT])
        # Unix times, from two hosts' clocks: the wait is as good as their synchronisation, and never negative.
        run.scheduled_ns -= int(max(0.0, time.time() - scheduled_at) * 1e9)
    return run


def in_progress(configs: Iterable[Config]) -> list[Run]:
    """Every run in progress under these configurations."""
    return [run for config in configs for run in config.activity.running.copy()]  # type: ignore[misc]


def _start_linked_span(
    tracer: Tracer,
    name: str,
    kind: SpanKind,
    attributes: dict[str, str | int],
    parent: Context,
    start_time: int | None,
) -> Span:
    """The run's span in link mode: the first of a trace of its own, linked to the span that scheduled it."""
    request = trace.get_current_span(parent).get_span_context()
    links = [Link(request)] if request.is_valid else None
    return tracer.start_span(name, context=_ROOT, kind=kind, attributes=attributes, links=links, start_time=start_time)


def is_cancellation(exc: BaseException) -> bool:
    # GeneratorExit: the task's coroutine was closed, as at interpreter shutdown.
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return True
    try:
        return isinstance(exc, anyio.get_cancelled_exc_class())  # trio's Cancelled under the trio backend
    except Exception:  # no async library running
        return False


def _name(func: Callable[..., Any]) -> str:
    try:
        return describe(func).name
    except Exception:
        return type(func).__qualname__


def _exception_attributes(exc: BaseException) -> dict[str, str]:
    """The exception event's attributes, without the exception's message, which may hold personal data.

    Span.record_exception would add the message twice: as exception.message and as the last line of
    the stack trace.
    """
    kind = type(exc)
    module = kind.__module__
    name = utf8(kind.__qualname__ if module in (None, "builtins") else f"{module}.{kind.__qualname__}")
    stack = utf8("".join(traceback.format_tb(exc.__traceback__)))
    return {
        names.ATTR_EXCEPTION_TYPE: name,
        names.ATTR_EXCEPTION_STACKTRACE: f"Traceback (most recent call last):\n{stack}{name}",
    }
