from __future__ import annotations

import inspect
from collections.abc import Iterator
from importlib.metadata import version
from typing import Annotated, Any

import fastapi
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI
from fastapi.responses import PlainTextResponse
from fastapi.testclient import TestClient
from opentelemetry import trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from packaging.version import Version
from starlette.background import BackgroundTask as StarletteBackgroundTask

import traced_tasks
from tests.conftest import Telemetry
from traced_tasks import _conventions as names

TASK = "tests.test_fastapi.audit"


def audit(seen: list[trace.SpanContext]) -> None:
    seen.append(trace.get_current_span().get_span_context())


def named_audit(spans: list[ReadableSpan]) -> list[ReadableSpan]:
    """Every span any instrumentation made for the task, whatever it is called."""
    return [span for span in spans if "audit" in span.name or span.name == "fastapi.background_task"]


def test_annotated_parameter_gets_traced_tasks(telemetry: Telemetry) -> None:
    """A path operation annotated with traced_tasks.BackgroundTasks gets a traced instance, and its task is counted."""
    app = FastAPI()
    injected: list[object] = []

    @app.get("/")
    def endpoint(tasks: traced_tasks.BackgroundTasks) -> str:
        injected.append(tasks)
        tasks.add_task(audit, [])
        return "ok"

    assert TestClient(app).get("/").status_code == 200
    (tasks,) = injected
    assert isinstance(tasks, traced_tasks.BackgroundTasks)
    assert isinstance(tasks, fastapi.BackgroundTasks)
    assert telemetry.value(names.DURATION.count, task=TASK, status="success") == 1
    assert [span.name for span in telemetry.task_spans()] == ["BackgroundTask " + TASK]


def test_dependency_shares_the_traced_instance(telemetry: Telemetry) -> None:
    """A dependency and its path operation get the same traced instance, and both their tasks run in order."""
    app = FastAPI()
    injected: list[object] = []

    def schedule_audit(tasks: traced_tasks.BackgroundTasks) -> None:
        injected.append(tasks)
        tasks.add_task(audit, [])

    @app.get("/", dependencies=[Depends(schedule_audit)])
    async def endpoint(tasks: traced_tasks.BackgroundTasks) -> str:
        injected.append(tasks)
        tasks.add_task(audit, [])
        return "ok"

    TestClient(app).get("/")
    assert injected[0] is injected[1]
    assert telemetry.value(names.DURATION.count, task=TASK, status="success") == 2


def test_fastapi_annotation_is_traced_too(telemetry: Telemetry) -> None:
    """Once traced_tasks is imported, a parameter annotated with fastapi.BackgroundTasks is traced as well."""
    app = FastAPI()

    @app.get("/")
    def endpoint(tasks: fastapi.BackgroundTasks) -> str:
        tasks.add_task(audit, [])
        return "ok"

    TestClient(app).get("/")
    assert telemetry.value(names.SCHEDULED.total, task=TASK) == 1


def test_response_background_task(telemetry: Telemetry) -> None:
    """A traced BackgroundTask returned on a FastAPI response is traced and counted."""
    app = FastAPI()

    @app.get("/")
    async def endpoint() -> PlainTextResponse:
        return PlainTextResponse("ok", background=traced_tasks.BackgroundTask(audit, []))

    TestClient(app).get("/")
    assert telemetry.value(names.DURATION.count, task=TASK, status="success") == 1


@pytest.fixture
def instrumented(telemetry: Telemetry) -> Iterator[FastAPI]:
    """A FastAPI app instrumented by opentelemetry-instrumentation-fastapi, which patches Starlette's BackgroundTask."""
    if Version(version("opentelemetry-instrumentation-fastapi")) < Version("0.63b0"):
        pytest.skip("opentelemetry-instrumentation-fastapi wraps background tasks from 0.63b0 on")
    app = FastAPI()
    FastAPIInstrumentor.instrument_app(app, tracer_provider=telemetry.provider)
    yield app
    FastAPIInstrumentor.uninstrument_app(app)


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
def test_one_span_per_task_with_otel_fastapi_instrumentation(
    telemetry: Telemetry, instrumented: FastAPI, sync: bool
) -> None:
    """With opentelemetry-instrumentation-fastapi active, each task is exactly one span, ours, under the server span."""
    assert hasattr(StarletteBackgroundTask, "_otel_original_call"), "the instrumentation no longer patches tasks"
    seen: list[trace.SpanContext] = []

    def endpoint_sync(tasks: traced_tasks.BackgroundTasks) -> str:
        tasks.add_task(audit, seen)
        tasks.add_task(audit, seen)
        return "ok"

    async def endpoint_async(tasks: traced_tasks.BackgroundTasks) -> str:
        return endpoint_sync(tasks)

    instrumented.get("/")(endpoint_sync if sync else endpoint_async)
    TestClient(instrumented).get("/")

    spans = telemetry.spans()
    tasks = named_audit(spans)
    assert [span.name for span in tasks] == ["BackgroundTask " + TASK] * 2
    (server,) = [span for span in spans if span.kind is SpanKind.SERVER]
    assert all(span.parent is not None and span.parent.span_id == server.context.span_id for span in tasks)
    assert [context.span_id for context in seen] == [span.context.span_id for span in tasks]


def test_plain_starlette_task_still_gets_the_instrumentation_span(telemetry: Telemetry, instrumented: FastAPI) -> None:
    """Control: the instrumentation really is active, since an untraced Starlette task gets its span."""

    @instrumented.get("/")
    async def endpoint() -> PlainTextResponse:
        return PlainTextResponse("ok", background=StarletteBackgroundTask(audit, []))

    TestClient(instrumented).get("/")
    assert [span.name for span in named_audit(telemetry.spans())] == ["BackgroundTask audit"]


def test_one_span_per_task_with_fastapi_native_telemetry(telemetry: Telemetry) -> None:
    """With FastAPI's own telemetry on, which wraps each task of its class, each task is still exactly one span."""
    if "telemetry" not in inspect.signature(FastAPI).parameters:
        pytest.skip("this FastAPI has no native telemetry (0.165 and later)")
    app = FastAPI(telemetry={"tracer_provider": telemetry.provider})  # type: ignore[call-arg,unused-ignore]

    @app.get("/")
    def endpoint(tasks: Annotated[traced_tasks.BackgroundTasks, "audit"]) -> str:
        tasks.add_task(audit, [])
        return "ok"

    TestClient(app).get("/")
    spans = telemetry.spans()
    assert [span.name for span in named_audit(spans)] == ["BackgroundTask " + TASK]
    (task,) = named_audit(spans)
    assert task.context.trace_id in {span.context.trace_id for span in spans if span.kind is SpanKind.SERVER}


def native_app(provider: TracerProvider, seen: list[Any]) -> FastAPI:
    app = FastAPI(telemetry={"tracer_provider": provider})  # type: ignore[call-arg,unused-ignore]

    from fastapi.telemetry import get_telemetry_data

    def look(order_id: int) -> None:
        data = get_telemetry_data()
        seen.append(None if data is None or data.request is None else data.request.url.path)

    async def look_async(order_id: int) -> None:
        look(order_id)

    @app.post("/orders/{order_id}")
    def place_order(order_id: int, tasks: BackgroundTasks) -> str:
        tasks.add_task(look, order_id)
        tasks.add_task(look_async, order_id)
        return "ok"

    return app


def test_native_telemetry_on_its_own_provider_keeps_one_recording_span_per_task(telemetry: Telemetry) -> None:
    """FastAPI(telemetry={"tracer_provider": ...}) with no global SDK provider, as FastAPI's docs allow: each task
    is exactly one recording span, in that provider, a child of the request's server span, and FastAPI's
    get_telemetry_data() works inside the task."""
    if "telemetry" not in inspect.signature(FastAPI).parameters:
        pytest.skip("this FastAPI has no native telemetry (0.165 and later)")
    traced_tasks.configure(registry=telemetry.registry)  # no tracer_provider: the global one, here the API's no-op
    seen: list[Any] = []
    TestClient(native_app(telemetry.provider, seen)).post("/orders/7")
    spans = telemetry.spans()
    (server,) = [span for span in spans if span.kind is SpanKind.SERVER]
    tasks = [span for span in spans if "look" in span.name or span.name == "fastapi.background_task"]
    assert sorted(span.name for span in tasks) == [
        f"BackgroundTask {__name__}.native_app.<locals>.look",
        f"BackgroundTask {__name__}.native_app.<locals>.look_async",
    ]
    assert [span.parent.span_id if span.parent else None for span in tasks] == [server.context.span_id] * 2
    assert {span.instrumentation_scope.name for span in tasks if span.instrumentation_scope} == {"traced_tasks"}
    assert seen == ["/orders/7", "/orders/7"]


def test_configured_tracer_provider_wins_over_fastapis(telemetry: Telemetry) -> None:
    """configure(tracer_provider=...) names where task spans go, whatever provider FastAPI's telemetry uses; they
    stay children of the request's server span."""
    if "telemetry" not in inspect.signature(FastAPI).parameters:
        pytest.skip("this FastAPI has no native telemetry (0.165 and later)")
    fastapis = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(fastapis))
    TestClient(native_app(provider, [])).post("/orders/7")
    (server,) = [span for span in fastapis.get_finished_spans() if span.kind is SpanKind.SERVER]
    ours = telemetry.task_spans()
    assert len(ours) == 2
    assert {span.parent.span_id if span.parent else None for span in ours} == {server.context.span_id}
    assert [span.name for span in fastapis.get_finished_spans() if span.name.startswith("BackgroundTask")] == []


def test_native_telemetry_gives_the_route_its_server_span_reports(telemetry: Telemetry) -> None:
    """Under FastAPI's native telemetry, with no middleware of ours, a task scheduled under an included router gets
    the http.route FastAPI's server span reports, and with the route label, its series."""
    if "telemetry" not in inspect.signature(FastAPI).parameters:
        pytest.skip("this FastAPI has no native telemetry (0.165 and later)")
    traced_tasks.configure(registry=telemetry.registry, route_label=True)
    router = fastapi.APIRouter()

    @router.post("/{order_id}")
    def place_order(order_id: int, tasks: BackgroundTasks) -> str:
        tasks.add_task(audit, [])
        return "ok"

    app = FastAPI(telemetry={"tracer_provider": telemetry.provider})  # type: ignore[call-arg,unused-ignore]
    app.include_router(router, prefix="/orders")
    TestClient(app).post("/orders/7")
    (server,) = [span for span in telemetry.spans() if span.kind is SpanKind.SERVER]
    (task,) = telemetry.task_spans()
    assert (task.attributes or {})["http.route"] == (server.attributes or {})["http.route"] == "/orders/{order_id}"
    assert telemetry.value(names.SCHEDULED.total, task=TASK, route="/orders/{order_id}") == 1
