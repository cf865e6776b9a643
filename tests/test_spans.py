from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import pytest
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry
from starlette import background
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

import traced_tasks
from tests.conftest import Telemetry
from traced_tasks import BackgroundTask, BackgroundTasks, _shutdown
from traced_tasks import _conventions as names

PREFIX = "tests.test_spans."


class PaymentDeclined(Exception):
    pass


def record_current_span(seen: list[trace.SpanContext]) -> None:
    seen.append(trace.get_current_span().get_span_context())


async def record_current_span_async(seen: list[trace.SpanContext]) -> None:
    seen.append(trace.get_current_span().get_span_context())


def charge(card_number: str, amount: int) -> None:
    raise PaymentDeclined(f"card {card_number} declined for {amount}")


def app_with(endpoint: Any, telemetry: Telemetry) -> Starlette:
    """A Starlette app whose requests get a server span, as OpenTelemetry's ASGI middleware makes it."""
    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(OpenTelemetryMiddleware, tracer_provider=telemetry.provider)
    return app


def server_span(telemetry: Telemetry) -> ReadableSpan:
    (span,) = [span for span in telemetry.spans() if span.kind is SpanKind.SERVER]
    return span


def test_task_span_is_child_of_request_span(telemetry: Telemetry) -> None:
    """A task scheduled in an async endpoint gets one INTERNAL span in the request's trace, under its server span."""

    async def endpoint(request: Request) -> Response:
        tasks = BackgroundTasks()
        tasks.add_task(record_current_span_async, [])
        return PlainTextResponse("ok", background=tasks)

    TestClient(app_with(endpoint, telemetry)).get("/")

    (task,) = telemetry.task_spans()
    request = server_span(telemetry)
    assert task.name == "BackgroundTask tests.test_spans.record_current_span_async"
    assert task.kind is SpanKind.INTERNAL
    assert task.parent is not None
    assert task.parent.span_id == request.context.span_id
    assert task.context.trace_id == request.context.trace_id
    assert task.status.status_code is StatusCode.UNSET


@pytest.mark.parametrize("sync_endpoint", [False, True], ids=["async-endpoint", "sync-endpoint"])
def test_parent_is_span_current_at_add_task(telemetry: Telemetry, sync_endpoint: bool) -> None:
    """The span current when add_task runs, a handler's own child span, is the parent, in async and sync endpoints."""
    tracer = telemetry.provider.get_tracer("handler")

    def schedule() -> Response:
        tasks = BackgroundTasks()
        with tracer.start_as_current_span("handler work"):
            tasks.add_task(record_current_span, [])
        return PlainTextResponse("ok", background=tasks)

    async def async_endpoint(request: Request) -> Response:
        return schedule()

    def sync_endpoint_(request: Request) -> Response:
        return schedule()

    TestClient(app_with(sync_endpoint_ if sync_endpoint else async_endpoint, telemetry)).get("/")

    (task,) = telemetry.task_spans()
    (handler,) = [span for span in telemetry.spans() if span.name == "handler work"]
    assert task.parent is not None
    assert task.parent.span_id == handler.context.span_id
    # The handler span ended before the task ran: the parent was captured, not looked up at run time.
    assert handler.end_time is not None
    assert task.start_time is not None
    assert handler.end_time <= task.start_time


@pytest.mark.parametrize("func", [record_current_span, record_current_span_async], ids=["sync", "async"])
def test_task_span_is_current_inside_task(telemetry: Telemetry, func: Any) -> None:
    """Inside the task, in the threadpool too, the current span is the task's own span."""
    seen: list[trace.SpanContext] = []

    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("ok", background=BackgroundTask(func, seen))

    TestClient(app_with(endpoint, telemetry)).get("/")

    (task,) = telemetry.task_spans()
    assert [context.span_id for context in seen] == [task.context.span_id]


def test_spans_made_in_a_sync_task_nest_under_it(telemetry: Telemetry) -> None:
    """A span started inside a sync task, in a worker thread, is a child of the task span."""
    tracer = telemetry.provider.get_tracer("task code")
    threads: list[int] = []

    def send_email() -> None:
        threads.append(threading.get_ident())
        with tracer.start_as_current_span("smtp send"):
            pass

    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("ok", background=BackgroundTask(send_email))

    TestClient(app_with(endpoint, telemetry)).get("/")

    (task,) = telemetry.task_spans()
    (inner,) = [span for span in telemetry.spans() if span.name == "smtp send"]
    assert inner.parent is not None
    assert inner.parent.span_id == task.context.span_id
    assert threads
    assert threads[0] != threading.get_ident()


def test_code_attributes(telemetry: Telemetry) -> None:
    """The span carries the fully qualified function name, its file and its first line, and nothing else."""

    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("ok", background=BackgroundTask(record_current_span, []))

    TestClient(app_with(endpoint, telemetry)).get("/")

    (task,) = telemetry.task_spans()
    assert dict(task.attributes or {}) == {
        "code.function.name": "tests.test_spans.record_current_span",
        "code.file.path": __file__,
        "code.line.number": record_current_span.__code__.co_firstlineno,
    }


def test_failure_is_recorded_and_reraised(telemetry: Telemetry) -> None:
    """A failing task's span has ERROR status, error.type and the exception event; the same exception propagates."""

    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("ok", background=BackgroundTask(charge, "4111111111111111", amount=987654))

    with pytest.raises(PaymentDeclined, match="card 4111111111111111 declined"):
        TestClient(Starlette(routes=[Route("/", endpoint)])).get("/")

    (task,) = telemetry.task_spans()
    assert task.status.status_code is StatusCode.ERROR
    assert task.status.description is None
    assert (task.attributes or {})["error.type"] == "PaymentDeclined"
    (event,) = task.events
    assert event.name == "exception"
    assert str((event.attributes or {})["exception.type"]).endswith("PaymentDeclined")


def test_arguments_and_message_are_never_recorded(telemetry: Telemetry) -> None:
    """Task arguments and the exception message appear nowhere in the span: not in attributes, not in its events."""

    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("ok", background=BackgroundTask(charge, "4111111111111111", amount=987654))

    with pytest.raises(PaymentDeclined):
        TestClient(Starlette(routes=[Route("/", endpoint)])).get("/")

    (task,) = telemetry.task_spans()
    recorded = task.to_json()
    assert "4111111111111111" not in recorded
    assert "declined for 987654" not in recorded  # the message; the source line of the raise is code, not data
    assert [str(value) for value in (task.attributes or {}).values()].count("987654") == 0
    (event,) = task.events
    stack = str((event.attributes or {})["exception.stacktrace"])
    assert "in charge" in stack
    assert stack.endswith("tests.test_spans.PaymentDeclined")


def test_cancellation_by_closing_the_coroutine(telemetry: Telemetry) -> None:
    """A task whose coroutine is closed (GeneratorExit, as at interpreter exit) counts as cancelled and not running."""

    class Suspend:
        def __await__(self) -> Any:
            yield

    async def parked() -> None:
        await Suspend()

    batch = BackgroundTask(parked)()
    batch.send(None)  # now suspended inside the task, with no event loop running
    batch.close()
    name = "tests.test_spans.test_cancellation_by_closing_the_coroutine.<locals>.parked"
    assert telemetry.value(names.DURATION.count, task=name, status="cancelled") == 1
    assert telemetry.value(names.IN_PROGRESS.name, task=name) == 0
    (task,) = telemetry.task_spans()
    assert (task.attributes or {})["background_task.status"] == "cancelled"


def test_cancellation_is_its_own_outcome(telemetry: Telemetry) -> None:
    """A task cancelled while it runs is marked cancelled, not as an error, and the CancelledError propagates."""
    started = asyncio.Event()

    async def slow() -> None:
        started.set()
        await asyncio.sleep(60)

    async def main() -> None:
        tasks = BackgroundTasks()
        tasks.add_task(slow)
        tasks.add_task(record_current_span_async, [])
        running = asyncio.ensure_future(tasks())
        await started.wait()
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running

    asyncio.run(main())

    (task,) = telemetry.task_spans()
    assert task.status.status_code is StatusCode.UNSET
    assert (task.attributes or {})["background_task.status"] == "cancelled"
    assert (
        telemetry.value(
            names.DURATION.count,
            task="tests.test_spans.test_cancellation_is_its_own_outcome.<locals>.slow",
            status="cancelled",
        )
        == 1
    )
    assert telemetry.value(names.SKIPPED.total, task="tests.test_spans.record_current_span_async") == 1


def test_link_mode_starts_a_new_trace_linked_to_the_request(telemetry: Telemetry) -> None:
    """With use_span_links, a task span is a root span in its own trace, with a link to the request span."""
    traced_tasks.configure(tracer_provider=telemetry.provider, registry=CollectorRegistry(), use_span_links=True)

    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("ok", background=BackgroundTask(record_current_span_async, []))

    TestClient(app_with(endpoint, telemetry)).get("/")

    (task,) = telemetry.task_spans()
    request = server_span(telemetry)
    assert task.parent is None
    assert task.context.trace_id != request.context.trace_id
    (link,) = task.links
    assert link.context.span_id == request.context.span_id
    assert link.context.trace_id == request.context.trace_id


def test_baggage_set_before_add_task_reaches_the_task(telemetry: Telemetry) -> None:
    """Baggage current at add_task is current inside the task, as the rest of the captured context is."""
    seen: list[object] = []

    def read_baggage() -> None:
        seen.append(baggage.get_baggage("tenant"))

    async def main() -> None:
        token = otel_context.attach(baggage.set_baggage("tenant", "acme"))
        tasks = BackgroundTasks()
        tasks.add_task(read_baggage)
        otel_context.detach(token)
        await tasks()

    asyncio.run(main())
    assert seen == ["acme"]


def test_each_task_of_a_batch_gets_its_own_span(telemetry: Telemetry) -> None:
    """Three tasks in one batch give three sibling spans with the same parent, ended in order."""

    async def endpoint(request: Request) -> Response:
        tasks = BackgroundTasks()
        for _ in range(3):
            tasks.add_task(record_current_span, [])
        return PlainTextResponse("ok", background=tasks)

    TestClient(app_with(endpoint, telemetry)).get("/")

    spans = telemetry.task_spans()
    request = server_span(telemetry)
    assert len(spans) == 3
    assert [span.parent.span_id if span.parent else None for span in spans] == [request.context.span_id] * 3
    ends = [span.end_time or 0 for span in spans]
    assert ends == sorted(ends)


CALLER = trace.SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED))


@pytest.mark.parametrize("func", [record_current_span, record_current_span_async], ids=["sync", "async"])
def test_without_an_sdk_the_context_of_add_task_is_current_in_the_task(func: Any) -> None:
    """With the API's no-op tracer there is no span of ours, yet the task runs in the context captured at
    add_task, caller's span and baggage included, even after that context stopped being current."""
    traced_tasks.configure(tracer_provider=trace.NoOpTracerProvider(), registry=CollectorRegistry())
    seen: list[trace.SpanContext] = []
    tenants: list[object] = []

    def read_baggage() -> None:
        tenants.append(baggage.get_baggage("tenant"))

    async def main() -> None:
        context = trace.set_span_in_context(trace.NonRecordingSpan(CALLER), baggage.set_baggage("tenant", "acme"))
        token = otel_context.attach(context)
        tasks = BackgroundTasks()
        tasks.add_task(func, seen)
        tasks.add_task(read_baggage)
        otel_context.detach(token)
        await tasks()

    try:
        asyncio.run(main())
    finally:
        traced_tasks.configure(registry=CollectorRegistry())
    assert seen == [CALLER]
    assert tenants == ["acme"]


def test_without_an_sdk_a_context_a_task_leaves_attached_reaches_no_later_task() -> None:
    """With the API's no-op tracer, a task that attaches a context and never detaches it changes no later task's
    context: each runs in the context of its own add_task, baggage included. A run whose context is current already
    makes nothing current, so what the batch leaves current is what Starlette's own tasks leave."""
    traced_tasks.configure(tracer_provider=trace.NoOpTracerProvider(), registry=CollectorRegistry())

    async def leak() -> None:
        otel_context.attach(baggage.set_baggage("tenant", "leaked"))

    async def run(batch: background.BackgroundTasks, tenants: list[object]) -> object:
        async def read_baggage() -> None:
            tenants.append(baggage.get_baggage("tenant"))

        batch.add_task(read_baggage)
        batch.add_task(leak)
        batch.add_task(read_baggage)
        token = otel_context.attach(baggage.set_baggage("tenant", "acme"))
        batch.add_task(read_baggage)
        otel_context.detach(token)
        await batch()
        return baggage.get_baggage("tenant")

    ours: list[object] = []
    theirs: list[object] = []
    try:
        ours_after = asyncio.run(run(BackgroundTasks(), ours))
        theirs_after = asyncio.run(run(background.BackgroundTasks(), theirs))
    finally:
        traced_tasks.configure(registry=CollectorRegistry())
    assert ours == [None, None, "acme"]
    assert theirs == [None, "leaked", "leaked"]
    assert ours_after == theirs_after == "leaked"


def test_a_run_the_sampler_drops_still_has_its_own_span_current() -> None:
    """When the SDK's sampler drops a run, its span is not recorded but is still the task's own: a new span ID
    in the caller's trace is current inside the task, so what the task calls joins the trace below it."""
    provider = TracerProvider(sampler=ALWAYS_OFF)
    registry = CollectorRegistry()
    traced_tasks.configure(tracer_provider=provider, registry=registry)
    seen: list[trace.SpanContext] = []

    async def main() -> None:
        token = otel_context.attach(trace.set_span_in_context(trace.NonRecordingSpan(CALLER)))
        tasks = BackgroundTasks()
        tasks.add_task(record_current_span, seen)
        otel_context.detach(token)
        await tasks()

    try:
        asyncio.run(main())
        count = registry.get_sample_value(
            names.DURATION.count, {"task": PREFIX + "record_current_span", "status": "success"}
        )
    finally:
        traced_tasks.configure(registry=CollectorRegistry())
        provider.shutdown()
    (current,) = seen
    assert current.trace_id == CALLER.trace_id
    assert current.span_id != CALLER.span_id
    assert not current.trace_flags.sampled
    assert count == 1


def test_a_run_abandoned_at_a_stop_ends_once(telemetry: Telemetry) -> None:
    """A run that a server's stop abandons (a sync task whose thread a cancellation cannot stop) ends as cancelled at
    once, span and counts; when its thread ends later, nothing more is counted or exported."""
    release = threading.Event()

    def blocks() -> None:
        release.wait(10)

    async def main() -> None:
        running = asyncio.create_task(traced_tasks.BackgroundTask(blocks)())
        while not _shutdown.in_progress():
            await asyncio.sleep(0.001)
        (run,) = _shutdown.in_progress()
        run.abandon()
        assert _shutdown.in_progress() == []
        release.set()
        await running

    asyncio.run(main())
    name = "tests.test_spans.test_a_run_abandoned_at_a_stop_ends_once.<locals>.blocks"
    assert telemetry.value(names.DURATION.count, task=name, status="cancelled") == 1
    assert telemetry.value(names.DURATION.count, task=name, status="success") == 0
    assert telemetry.value(names.IN_PROGRESS.name, task=name) == 0
    (span,) = telemetry.task_spans()
    assert (span.attributes or {})[names.ATTR_STATUS] == names.STATUS_CANCELLED


def test_a_sync_task_that_returns_a_coroutine_is_an_error(
    telemetry: Telemetry, caplog: pytest.LogCaptureFixture
) -> None:
    """A sync callable that returns a coroutine never ran anything (Starlette drops the coroutine): the run counts
    as an error, CoroutineNeverAwaited, with an ERROR span; the batch goes on as in Starlette, nothing is raised,
    and a warning says what to change, once per task."""
    ran: list[str] = []

    async def send() -> None:
        ran.append("send")

    def wrapper() -> Any:  # a decorator that lost the function's asyncness
        return send()

    async def main() -> None:
        for _ in range(2):
            tasks = BackgroundTasks()
            tasks.add_task(wrapper)
            tasks.add_task(ran.append, "after")
            await tasks()

    with caplog.at_level(logging.WARNING, logger="traced_tasks"):
        asyncio.run(main())
    assert ran == ["after", "after"]
    name = "tests.test_spans.test_a_sync_task_that_returns_a_coroutine_is_an_error.<locals>.wrapper"
    assert telemetry.value(names.DURATION.count, task=name, status="error") == 2
    assert telemetry.value(names.DURATION.count, task=name, status="success") == 0
    assert telemetry.value(names.EXCEPTIONS.total, task=name, exception="CoroutineNeverAwaited") == 2
    spans = [span for span in telemetry.task_spans() if span.name.endswith(".wrapper")]
    assert [span.status.status_code for span in spans] == [StatusCode.ERROR] * 2
    assert [(span.attributes or {})[names.ATTR_ERROR_TYPE] for span in spans] == ["CoroutineNeverAwaited"] * 2
    warnings = [record.getMessage() for record in caplog.records if "never ran" in record.getMessage()]
    assert len(warnings) == 1
    assert name in warnings[0]
