"""A task's life as traced_tasks sees it: a `Ticket` when it is scheduled, then a `Run` of it, or a skip.

A Ticket is made when a task is scheduled (add_task, an engine's publish) or received from an engine's broker: the
configuration it was scheduled under, the profile of its callable and route, the trace context and clock of its
scheduling, and the engine it is handed to. Each run of it is a Run, claimed from the ticket: its span, the context
it makes current, its run clock, its counts and its record. Both call down only, into the profiles, the metrics
backend and the activity record of the configuration (`Config`).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

import anyio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN, Link, Span, SpanKind, Status, StatusCode, Tracer

from traced_tasks import _activity, _request, _stacks, _wire
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


@dataclass(frozen=True)
class Outcome:
    """How a run ended: `status` success, error or cancelled; for an error, its exception's class name, and the
    exception itself where there is one (an engine can report a failure by name only)."""

    status: str
    error_type: str | None = None
    exception: BaseException | None = None

    @classmethod
    def of(cls, exc: BaseException | None) -> Outcome:
        """The outcome of a run that returned (None) or raised `exc`."""
        if exc is None:
            return SUCCEEDED
        if is_cancellation(exc):
            return CANCELLED
        return cls(names.STATUS_ERROR, error_type(type(exc)), exc)

    @classmethod
    def failed(cls, error_type: str) -> Outcome:
        """An error known by its exception class's name only."""
        return cls(names.STATUS_ERROR, error_type)


SUCCEEDED = Outcome(names.STATUS_SUCCESS)
CANCELLED = Outcome(names.STATUS_CANCELLED)


class Ticket:
    """A task scheduled to run: the configuration and profile it was scheduled under, the context and clock of its
    scheduling, and the engine it is handed to, if any. Each run of it is claimed from it.

        ticket = schedule(config, send_receipt)  # at add_task
        with ticket.claim():  # when the task runs
            await send_receipt(order_id)
    """

    __slots__ = ("claimed", "config", "context", "engine", "profile", "scheduled_ns", "tracer")

    def __init__(
        self,
        config: Config,
        profile: Profile,
        context: Context,
        tracer: Tracer,
        scheduled_at: float | None = None,
        engine: Any = None,
    ) -> None:
        self.config = config
        self.profile = profile
        self.context = context
        self.tracer = tracer
        self.engine = engine  # the engine its runs are handed to; None: they run here
        self.claimed = False  # whether a run of it began, or it was counted as skipped
        now = time.perf_counter_ns()
        # A time of scheduling from another host's clock: the wait is as good as the two clocks' synchronisation.
        self.scheduled_ns = now if scheduled_at is None else now - int(max(0.0, time.time() - scheduled_at) * 1e9)

    @property
    def scheduled_at(self) -> float:
        """The Unix time it was scheduled."""
        return time.time() - (time.perf_counter_ns() - self.scheduled_ns) / 1e9

    def claim(self, span_kind: SpanKind = SpanKind.INTERNAL, span_name: str | None = None) -> Run:
        """A new run of the task, not started yet."""
        self.claimed = True
        return Run(self, span_kind, span_name or self.profile.span_name)

    def skip(self) -> None:
        """Count a run that never started because an earlier task stopped its batch."""
        self.claimed = True
        try:
            self.profile.counts.skip()
        except Exception:
            self.config.report("metrics", self.profile.name)
        if _activity.captures:
            _record(self.profile, names.STATUS_SKIPPED, None, None, 0.0, time.time())

    def carried(self, starts_at: float | None = None) -> dict[str, str]:
        """What travels with the message when an engine runs this task: the trace context it was scheduled in, the
        Unix time it was scheduled, or `starts_at` when later (an ETA: a delay on purpose is no wait), and its
        route. Empty when it cannot be written (logged once)."""
        try:
            return _wire.write(self.context, max(self.scheduled_at, starts_at or 0.0), self.profile.route)
        except Exception:
            self.config.report("tracing", self.profile.name)
            return {}

    def count_scheduled(self) -> None:
        try:
            self.profile.counts.schedule()
        except Exception:
            self.config.report("metrics", self.profile.name)


def schedule(config: Config, func: Callable[..., Any], engine: Any = None) -> Ticket | None:
    """A Ticket of `func` in the context and route of now, counted as scheduled; never raises. None: the setup
    failed (logged once)."""
    ticket = capture(config, func, None, engine)
    if ticket is not None:
        ticket.count_scheduled()
    return ticket


def capture(config: Config, func: Callable[..., Any], route: object = None, engine: Any = None) -> Ticket | None:
    """A Ticket of `func` in the context and route of now, counting nothing yet; never raises. None: the setup
    failed (logged once). `route`, when it is text, stands for the route where no request is served now (a retry in
    a worker)."""
    try:
        context = otel_context.get_current()
        scope = _request.serving_scope()
        if scope is not None:
            served = _request.route(scope)
            route = served if served is not None or not isinstance(route, str) else route
        elif not isinstance(route, str):
            route = None
        tracer = config.tracer
        if _request.NATIVE_KEY in context:
            context, route, tracer = _under_fastapis_telemetry(config, context, route)
        return Ticket(config, config.profiles.get(func, route), context, tracer, None, engine)
    except Exception:
        config.report("task setup", _name(func))
        return None


def received(config: Config, func: Callable[..., Any], carried: _wire.Carrier) -> Ticket | None:
    """The Ticket of a message an engine delivered: under the context, route and time of scheduling it carries, as
    far as they can be believed (`_wire.read`); what cannot, is as if it were not there: a message that carries no
    time of scheduling waited no time at all. Never raises; None: the setup failed (logged once)."""
    try:
        found = _wire.read(carried)
        profile = config.profiles.get(func, found.route)
        return Ticket(config, profile, found.context, config.tracer, found.scheduled_at)
    except Exception:
        config.report("task setup", _name(func))
        return None


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
    """One run of a task: its span, current inside it in the context its ticket captured, its clock, counts and
    record. `start()`, then `end()` with the exception it raised, if any; the first end counts, later ones do nothing.

        run = ticket.claim()
        with run:  # start(), and end(exc) on the way out: the exception leaves the block untouched
            await func(*args, **kwargs)
    """

    __slots__ = (
        "_end",
        "_span",
        "_started_ns",
        "_token",
        "_where",
        "config",
        "profile",
        "span_kind",
        "span_name",
        "started_at",
        "ticket",
    )

    def __init__(self, ticket: Ticket, span_kind: SpanKind, span_name: str) -> None:
        self.ticket = ticket
        self.config = ticket.config
        self.profile = ticket.profile
        self.span_kind = span_kind
        self.span_name = span_name
        self._started_ns = 0  # 0 until it starts, which sets the rest: started_at, _span, _token, _where
        self._end = [None]  # the one end there is, which the first end() or abandon() takes

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

    def __enter__(self) -> Run:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.end(exc)

    def start(self, started_ns: int | None = None, scoped: bool = False, where: Any = None) -> None:
        """Start the run now, or at `started_ns` (time.perf_counter_ns()) in the past: start its span, make it current
        in this context, and count the start and its wait since the ticket was scheduled. `scoped`: this context ends
        with the run's code (a thread's copy of it), and its end restores nothing. `where`: what runs it, for where()
        to follow: its coroutine, its asyncio task or its thread's ident (here(): the caller's)."""
        now_ns = time.perf_counter_ns()
        if started_ns is None:
            started_ns = now_ns
            self.started_at = time.time()
            start_time = None
        else:
            start_time = time.time_ns() - (now_ns - started_ns)
            self.started_at = start_time / 1e9
        self._started_ns = started_ns
        self._where = where  # what runs it: its coroutine, its asyncio task or its thread's ident
        self._span: Span | None = None
        self._token: object = None
        config, profile = self.config, self.profile
        parent = self.ticket.context
        try:
            if config.options.use_span_links:
                self._span = _start_linked_span(
                    self.ticket.tracer, self.span_name, self.span_kind, profile.attributes, parent, start_time
                )
            else:
                span = self.ticket.tracer.start_span(
                    self.span_name, parent, self.span_kind, profile.attributes, start_time=start_time
                )
                # The API's no-op tracer hands back the parent's own span (an invalid one, in older APIs): nothing
                # of ours to end or annotate, and the parent context stays as it is.
                noop = span is INVALID_SPAN or (
                    not span.is_recording()
                    and (not span.get_span_context().is_valid or span is trace.get_current_span(parent))
                )
                self._span = None if noop else span
            # The parent context, not the run-time one, so baggage set before add_task reaches the task too. With no
            # span of ours and the parent current already, there is nothing to make current, nor to restore.
            if self._span is not None:
                self._token = otel_context.attach(trace.set_span_in_context(self._span, parent))
            elif parent is not otel_context.get_current():
                self._token = otel_context.attach(parent)
        except Exception:
            config.report("tracing", profile.name)
            if self._token is None:
                with contextlib.suppress(Exception):
                    self._token = otel_context.attach(parent)
        if scoped:
            self._token = None
        oldest = config.activity.started(self)
        try:
            profile.counts.start((started_ns - self.ticket.scheduled_ns) / 1e9, self.started_at, oldest)
        except Exception:
            config.report("metrics", profile.name)

    def end(self, exc: BaseException | None = None, outcome: Outcome | None = None) -> None:
        """End the run, in the context it started in: it returned, or raised `exc`, or ended with `outcome`."""
        if self._token is not None:
            token, self._token = self._token, None
            otel_context.detach(token)  # type: ignore[arg-type]  # logs, never raises
        if outcome is None:
            outcome = SUCCEEDED if exc is None else Outcome.of(exc)
        self.finish(outcome)

    def abandon(self) -> None:
        """End a run that is still in progress as cancelled, now, from anywhere: at a stop, when nothing waits for it
        any more (a sync task's thread, a task that ignored its cancellation). Its own end then counts nothing."""
        self.finish(CANCELLED)

    def finish(self, outcome: Outcome) -> None:
        """End the run with `outcome`, from anywhere, without touching the context it made current."""
        try:
            self._end.pop()  # its own end, or abandon() at a stop: one atomic step, so the first ends it, unlocked
        except IndexError:
            return
        seconds = (time.perf_counter_ns() - self._started_ns) / 1e9  # a monotonic clock: never negative
        config, profile, span = self.config, self.profile, self._span
        succeeded = outcome is SUCCEEDED  # the one success there is
        exemplar = None
        if span is not None:
            try:
                span_context = span.get_span_context()
                if span_context.trace_flags.sampled and span.is_recording():
                    exemplar = span_context
                if outcome.status == names.STATUS_CANCELLED:
                    span.set_attribute(names.ATTR_STATUS, names.STATUS_CANCELLED)
                elif not succeeded:
                    if outcome.exception is not None:
                        span.add_event(names.EVENT_EXCEPTION, _exception_attributes(outcome.exception))
                    span.set_attribute(names.ATTR_ERROR_TYPE, outcome.error_type or "")
                    span.set_status(Status(StatusCode.ERROR))
                span.end()
            except Exception:
                config.report("tracing", profile.name)
        exception = None
        if not succeeded and outcome.status == names.STATUS_ERROR:
            exception = config.labels.exception_name(outcome.error_type or "")
        activity = config.activity
        oldest = activity.ended(self)
        try:
            if succeeded:
                profile.counts.succeed(seconds, self.started_at, exemplar, oldest)
            else:
                profile.counts.fail(outcome.status, seconds, self.started_at, exemplar, exception, oldest)
        except Exception:
            config.report("metrics", profile.name)
        if not succeeded or _activity.captures:
            record = _record(profile, outcome.status, exception, self.trace_id(), seconds, self.started_at + seconds)
            if not succeeded:
                activity.failed(record)

    def trace_id(self) -> str | None:
        """The trace ID of the span current in the task, when it is sampled: where its trace can be found."""
        try:
            span = self._span if self._span is not None else trace.get_current_span(self.ticket.context)
            span_context = span.get_span_context()
            if not span_context.is_valid or not span_context.trace_flags.sampled:
                return None
            return format(span_context.trace_id, "032x")
        except Exception:  # a tracer other than the SDK's; the run's outcome matters more than its trace ID
            return None

    def where(self) -> list[str] | None:
        where = self._where
        try:
            if isinstance(where, int):
                return _stacks.of_thread(where)
            if isinstance(where, asyncio.Task):
                return _stacks.of_task(where)
            return None if where is None else _stacks.of_coroutine(where)
        except Exception:
            return None


def here() -> asyncio.Task[Any] | int:
    """What runs the code that starts a run: the asyncio task of this thread's loop, else this thread."""
    loop = asyncio._get_running_loop()  # None in a thread with no loop, where current_task() would raise
    task = None if loop is None else asyncio.current_task(loop)
    return threading.get_ident() if task is None else task


def _record(
    profile: Profile, status: str, exception: str | None, trace_id: str | None, seconds: float, ended: float
) -> TaskRun:
    """The record of a run that ended, or was skipped, for the capture_tasks() blocks open now."""
    record = TaskRun(profile.task, status, exception, trace_id, seconds, profile.route, ended)
    for captured in _activity.captures:
        captured.append(record)
    return record


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
