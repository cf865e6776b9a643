from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import fastapi
import pytest
from fastapi.testclient import TestClient
from opentelemetry import baggage, trace
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route

import traced_tasks
from tests.conftest import Telemetry
from tests.support import Server, needs_starlette_routes, wait_until
from traced_tasks import BackgroundTasks, _config
from traced_tasks import _conventions as names
from traced_tasks._labels import MAX_ROUTES

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{SPAN_ID}-01"


def remember(seen: list[Any]) -> None:
    seen.append(baggage.get_baggage("tenant"))


def orders(seen: list[Any]) -> Starlette:
    """An app whose POST /orders/{order_id} schedules one task, with TraceContextMiddleware."""

    async def place_order(request: Request) -> Response:
        tasks = BackgroundTasks()
        tasks.add_task(remember, seen)
        return PlainTextResponse("ok", background=tasks)

    app = Starlette(routes=[Route("/orders/{order_id:int}", place_order, methods=["POST"])])
    app.add_middleware(traced_tasks.TraceContextMiddleware)
    return app


def test_task_joins_the_callers_trace(telemetry: Telemetry) -> None:
    """Behind TraceContextMiddleware, with no server span, a task span's parent is the caller's span from
    traceparent, and the caller's baggage is current inside the task."""
    seen: list[Any] = []
    TestClient(orders(seen)).post("/orders/7", headers={"traceparent": TRACEPARENT, "baggage": "tenant=acme"})
    (task,) = telemetry.task_spans()
    assert format(task.context.trace_id, "032x") == TRACE_ID
    assert task.parent is not None
    assert format(task.parent.span_id, "016x") == SPAN_ID
    assert task.parent.is_remote
    assert seen == ["acme"]


def test_without_traceparent_the_task_starts_a_trace(telemetry: Telemetry) -> None:
    """Without a traceparent, the task span is a root span: nothing leaks from an earlier request."""
    seen: list[Any] = []
    client = TestClient(orders(seen))
    client.post("/orders/7", headers={"traceparent": TRACEPARENT})
    client.post("/orders/8")
    first, second = telemetry.task_spans()
    assert second.parent is None
    assert second.context.trace_id != first.context.trace_id
    assert trace.get_current_span().get_span_context().is_valid is False


def remember_order(order_id: int, seen: list[tuple[int, Any, int, int | None]]) -> None:
    span: Any = trace.get_current_span()  # the task's own span, an SDK span
    parent = span.parent.trace_id if span.parent is not None else None
    seen.append((order_id, baggage.get_baggage("tenant"), span.get_span_context().trace_id, parent))


@pytest.mark.integration
@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_pipelined_requests_keep_their_own_traces(telemetry: Telemetry, serve: type[Server], http: str) -> None:
    """Five requests pipelined on one HTTP/1.1 connection to a real uvicorn, which starts each request in the
    context of the one before: each task is in its own request's trace and reads its own baggage, and the last
    request, with neither header, starts a trace of its own with no baggage."""
    seen: list[tuple[int, Any, int, int | None]] = []

    async def place_order(request: Request) -> Response:
        tasks = BackgroundTasks()
        tasks.add_task(remember_order, request.path_params["order_id"], seen)
        return PlainTextResponse("ok", background=tasks)

    app = Starlette(routes=[Route("/orders/{order_id:int}", place_order, methods=["POST"])])
    app.add_middleware(traced_tasks.TraceContextMiddleware)
    server = serve(app, http=http)
    pipelined = b""
    for order in range(5):
        headers = f"POST /orders/{order} HTTP/1.1\r\nHost: shop\r\nContent-Length: 0\r\n"
        if order < 4:
            headers += f"traceparent: 00-{order + 1:032x}-{order + 1:016x}-01\r\nbaggage: tenant=t{order}\r\n"
        pipelined += (headers + "\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as connection:
        connection.sendall(pipelined)
        answers = b""
        while answers.count(b"HTTP/1.1 200") < 5:
            answers += connection.recv(65536)
    wait_until(lambda: len(seen) == 5)
    assert sorted(seen)[:4] == [(order, f"t{order}", order + 1, order + 1) for order in range(4)]
    last = sorted(seen)[4]
    assert last[:2] == (4, None)
    assert last[2] not in range(1, 5)
    assert last[3] is None  # a root span


@needs_starlette_routes
def test_route_template_on_the_task_span(telemetry: Telemetry) -> None:
    """The scheduling request's route template is the task span's http.route."""
    TestClient(orders([])).post("/orders/7")
    (task,) = telemetry.task_spans()
    assert (task.attributes or {})["http.route"] == "/orders/{order_id:int}"


def test_no_route_under_a_mount(telemetry: Telemetry) -> None:
    """Under a Mount, whose matched prefix holds values (/tenants/acme), no http.route is reported, rather than
    one holding a value."""
    app = Starlette(routes=[Mount("/tenants/{tenant}", orders([]))])
    TestClient(app).post("/tenants/acme/orders/7")
    (task,) = telemetry.task_spans()
    assert "http.route" not in (task.attributes or {})
    assert "acme" not in task.to_json()


@needs_starlette_routes
def test_beside_a_server_span_the_task_stays_under_it(telemetry: Telemetry) -> None:
    """Under OpenTelemetry's ASGI middleware, TraceContextMiddleware does not replace the server span: the task is
    the server span's child, with or without a traceparent, and still gets http.route."""
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.trace import SpanKind

    app = orders([])
    app.add_middleware(OpenTelemetryMiddleware, tracer_provider=telemetry.provider)
    client = TestClient(app)
    client.post("/orders/7", headers={"traceparent": TRACEPARENT})
    client.post("/orders/8")
    servers = [span for span in telemetry.spans() if span.kind is SpanKind.SERVER]
    tasks = telemetry.task_spans()
    assert len(servers) == len(tasks) == 2
    for server, task in zip(servers, tasks, strict=True):
        assert task.parent is not None
        assert task.parent.span_id == server.context.span_id
        assert (task.attributes or {})["http.route"] == "/orders/{order_id:int}"
    assert format(tasks[0].context.trace_id, "032x") == TRACE_ID


def test_route_template_under_the_instrumentor(telemetry: Telemetry) -> None:
    """With the instrumentor and no middleware, a FastAPI task span has the path operation's route template."""
    app = fastapi.FastAPI()

    @app.post("/orders/{order_id}")
    def place_order(order_id: int, tasks: fastapi.BackgroundTasks) -> str:
        tasks.add_task(remember, [])
        return "ok"

    instrumentor = traced_tasks.BackgroundTasksInstrumentor()
    instrumentor.instrument()
    try:
        TestClient(app).post("/orders/7")
    finally:
        instrumentor.uninstrument()
    (task,) = telemetry.task_spans()
    assert (task.attributes or {})["http.route"] == "/orders/{order_id}"


def test_no_route_outside_a_request(telemetry: Telemetry) -> None:
    """Tasks scheduled outside any known request carry no http.route at all."""
    TestClient(Starlette(routes=[Route("/", lambda request: PlainTextResponse("ok", background=_batch()))])).get("/")
    (task,) = telemetry.task_spans()
    assert "http.route" not in (task.attributes or {})


def _batch() -> BackgroundTasks:
    tasks = BackgroundTasks()
    tasks.add_task(remember, [])
    return tasks


def test_route_label_is_off_by_default(telemetry: Telemetry) -> None:
    """Without route_label, the series have only the task label, even when the route is known."""
    TestClient(orders([])).post("/orders/7")
    assert telemetry.value(names.SCHEDULED.total, task="tests.test_middleware.remember") == 1


@needs_starlette_routes
def test_route_label(telemetry: Telemetry, caplog: pytest.LogCaptureFixture) -> None:
    """With route_label, every family is split by the scheduling request's route template, "" when unknown, and
    past 100 routes further ones are counted under __overflow__ with one warning."""
    traced_tasks.configure(tracer_provider=telemetry.provider, registry=telemetry.registry, route_label=True)

    async def place_order(request: Request) -> Response:
        tasks = BackgroundTasks()
        tasks.add_task(remember, [])
        return PlainTextResponse("ok", background=tasks)

    routes = [Route(f"/r{index}/{{order_id:int}}", place_order) for index in range(102)]
    app = Starlette(routes=routes)
    app.add_middleware(traced_tasks.TraceContextMiddleware)
    client = TestClient(app)
    with caplog.at_level(logging.WARNING, logger="traced_tasks"):
        for index in range(102):
            client.get(f"/r{index}/7")
        client.get("/r0/8")
    asyncio.run(_batch()())  # outside any request

    task = "tests.test_middleware.remember"
    assert telemetry.value(names.SCHEDULED.total, task=task, route="/r0/{order_id:int}") == 2
    assert telemetry.value(names.WAIT.count, task=task, route="/r99/{order_id:int}") == 1
    labels = {"task": task, "route": "/r1/{order_id:int}", "status": "success"}
    assert telemetry.registry.get_sample_value(names.DURATION.count, labels) == 1
    assert telemetry.value(names.SCHEDULED.total, task=task, route="/r100/{order_id:int}") is None
    assert telemetry.value(names.SCHEDULED.total, task=task, route="__overflow__") == 2
    assert telemetry.value(names.SCHEDULED.total, task=task, route="") == 1
    assert telemetry.value(names.SCHEDULED.total, task=task) is None
    assert len([record for record in caplog.records if "routes seen" in record.getMessage()]) == 1


@needs_starlette_routes
def test_route_label_makes_no_unknown_route_series_for_routed_tasks(telemetry: Telemetry) -> None:
    """With route_label, a task only ever scheduled from known routes has no route="" series."""
    traced_tasks.configure(tracer_provider=telemetry.provider, registry=telemetry.registry, route_label=True)
    TestClient(orders([])).post("/orders/7")
    task = "tests.test_middleware.remember"
    assert telemetry.value(names.SCHEDULED.total, task=task, route="/orders/{order_id:int}") == 1
    assert telemetry.value(names.SCHEDULED.total, task=task, route="") is None


@needs_starlette_routes
def test_every_route_reaches_its_spans_and_the_cache_per_task_stays_bounded(telemetry: Telemetry) -> None:
    """A task scheduled from more routes than MAX_ROUTES still gets each request's route on its span, while
    what traced_tasks keeps per task and route stops growing at MAX_ROUTES entries."""

    async def place_order(request: Request) -> Response:
        tasks = BackgroundTasks()
        tasks.add_task(remember, [])
        return PlainTextResponse("ok", background=tasks)

    count = MAX_ROUTES + 20
    app = Starlette(routes=[Route(f"/r{index}/{{order_id:int}}", place_order) for index in range(count)])
    app.add_middleware(traced_tasks.TraceContextMiddleware)
    client = TestClient(app)
    for index in [*range(count), count - 1]:
        client.get(f"/r{index}/7")
    routes = [(span.attributes or {})["http.route"] for span in telemetry.task_spans()]
    assert routes == [f"/r{index}/{{order_id:int}}" for index in [*range(count), count - 1]]
    assert len(_config.current().profiles.routes(remember)) == MAX_ROUTES
    assert telemetry.value(names.SCHEDULED.total, task="tests.test_middleware.remember") == count + 1


def test_without_an_sdk_the_task_still_carries_the_callers_context() -> None:
    """Behind TraceContextMiddleware with the API's no-op tracer, the task runs with the caller's span context
    and baggage current, so its own outgoing calls propagate them; the run is counted, with no exemplar."""
    registry = CollectorRegistry()
    traced_tasks.configure(tracer_provider=trace.NoOpTracerProvider(), registry=registry)
    seen: list[Any] = []

    def propagate() -> None:
        context = trace.get_current_span().get_span_context()
        seen.append((format(context.trace_id, "032x"), format(context.span_id, "016x"), baggage.get_baggage("tenant")))

    async def place_order(request: Request) -> Response:
        tasks = BackgroundTasks()
        tasks.add_task(propagate)
        return PlainTextResponse("ok", background=tasks)

    app = Starlette(routes=[Route("/orders", place_order, methods=["POST"])])
    app.add_middleware(traced_tasks.TraceContextMiddleware)
    try:
        TestClient(app).post("/orders", headers={"traceparent": TRACEPARENT, "baggage": "tenant=acme"})
        exposition = generate_latest(registry).decode()  # read before configure() below unregisters it
    finally:
        traced_tasks.configure(registry=CollectorRegistry())
    assert seen == [(TRACE_ID, SPAN_ID, "acme")]
    name = f"{__name__}.test_without_an_sdk_the_task_still_carries_the_callers_context.<locals>.propagate"
    assert f'{names.DURATION.count}{{status="success",task="{name}"}} 1.0' in exposition
    assert "trace_id" not in exposition


def routers_app() -> fastapi.FastAPI:
    """Two routers with the same `/{id}` route, included with different prefixes, and a router in a router."""
    users, admins, items, api = (fastapi.APIRouter() for _ in range(4))

    @users.post("/{id}")
    @admins.post("/{id}")
    def touch(id: int, tasks: fastapi.BackgroundTasks) -> str:
        tasks.add_task(remember, [])
        return "ok"

    @items.post("/items/{item_id:int}")
    def touch_item(item_id: int, tasks: fastapi.BackgroundTasks) -> str:
        tasks.add_task(remember, [])
        return "ok"

    api.include_router(items, prefix="/orgs/{org}")
    app = fastapi.FastAPI()
    app.include_router(users, prefix="/users")
    app.include_router(admins, prefix="/admins")
    app.include_router(api, prefix="/api")
    return app


INCLUDED = {
    "/users/1": "/users/{id}",
    "/admins/2": "/admins/{id}",
    "/api/orgs/acme/items/5": "/api/orgs/{org}/items/{item_id:int}",
}


def test_route_of_an_included_router_keeps_its_prefixes(telemetry: Telemetry) -> None:
    """Behind TraceContextMiddleware, a task scheduled under include_router(prefix=...) gets the whole template,
    the one OpenTelemetry's FastAPI instrumentation reports on the server span, not the router's own `/{id}`; and
    with the route label, the two routers' endpoints stay two series."""
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    traced_tasks.configure(tracer_provider=telemetry.provider, registry=telemetry.registry, route_label=True)
    app = routers_app()
    app.add_middleware(traced_tasks.TraceContextMiddleware)
    FastAPIInstrumentor.instrument_app(app, tracer_provider=telemetry.provider)
    try:
        client = TestClient(app)
        for path in INCLUDED:
            assert client.post(path).status_code == 200
    finally:
        FastAPIInstrumentor.uninstrument_app(app)  # it patches Starlette's BackgroundTask for every app
    servers = [
        (span.attributes or {})["http.route"] for span in telemetry.spans() if span.kind is trace.SpanKind.SERVER
    ]
    tasks = [(span.attributes or {})["http.route"] for span in telemetry.task_spans()]
    assert tasks == servers == list(INCLUDED.values())
    for route in INCLUDED.values():
        assert telemetry.value(names.SCHEDULED.total, task="tests.test_middleware.remember", route=route) == 1


def test_route_of_an_included_router_under_the_instrumentor(telemetry: Telemetry) -> None:
    """Under the zero-code instrumentor, FastAPI's own injected tasks get the whole template too."""
    instance = traced_tasks.BackgroundTasksInstrumentor()
    instance.instrument()
    try:
        client = TestClient(routers_app())
        for path in INCLUDED:
            client.post(path)
    finally:
        instance.uninstrument()
    assert [(span.attributes or {})["http.route"] for span in telemetry.task_spans()] == list(INCLUDED.values())
