from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import fastapi
import httpx
import pytest
from fastapi.testclient import TestClient
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from prometheus_client import CollectorRegistry
from starlette import background
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import traced_tasks
from tests.conftest import Telemetry
from tests.support import (
    FASTAPI_NATIVE_TELEMETRY,
    ROOT,
    STARLETTE_RECORDS_ROUTES,
    clean_environment,
    free_port,
    wait_for_http,
    wait_until,
)
from traced_tasks import _conventions as names
from traced_tasks.testing import capture_tasks

TASK = "tests.test_instrumentor.audit"


def audit() -> None:
    pass


def fail() -> None:
    raise LookupError()


@pytest.fixture
def instrumentor() -> Iterator[traced_tasks.BackgroundTasksInstrumentor]:
    instance = traced_tasks.BackgroundTasksInstrumentor()
    instance.instrument()
    yield instance
    instance.uninstrument()


def starlette_app() -> Starlette:
    async def batch(request: Request) -> Response:
        tasks = background.BackgroundTasks()
        tasks.add_task(audit)
        tasks.add_task(fail)
        tasks.add_task(audit)
        return PlainTextResponse("ok", background=tasks)

    async def single(request: Request) -> Response:
        return PlainTextResponse("ok", background=background.BackgroundTask(audit))

    return Starlette(routes=[Route("/batch", batch), Route("/single", single)])


def fastapi_app() -> fastapi.FastAPI:
    app = fastapi.FastAPI()

    @app.get("/")
    def endpoint(tasks: fastapi.BackgroundTasks) -> str:
        tasks.add_task(audit)
        return "ok"

    return app


def test_plain_starlette_classes_are_traced(telemetry: Telemetry, instrumentor: object) -> None:
    """Instrumented, Starlette's own BackgroundTasks and BackgroundTask are traced and counted like ours, skips too."""
    client = TestClient(starlette_app(), raise_server_exceptions=False)
    client.get("/batch")
    client.get("/single")
    assert telemetry.value(names.SCHEDULED.total, task=TASK) == 3
    assert telemetry.value(names.DURATION.count, task=TASK, status="success") == 2
    assert telemetry.value(names.SKIPPED.total, task=TASK) == 1
    assert telemetry.value(names.EXCEPTIONS.total, task="tests.test_instrumentor.fail", exception="LookupError") == 1
    assert sorted(span.name for span in telemetry.task_spans()) == sorted(
        ["BackgroundTask " + TASK] * 2 + ["BackgroundTask tests.test_instrumentor.fail"]
    )


def test_fastapi_injection_is_traced(telemetry: Telemetry, instrumentor: object) -> None:
    """Instrumented, a path operation annotated with fastapi.BackgroundTasks gets traced tasks."""
    TestClient(fastapi_app()).get("/")
    assert telemetry.value(names.DURATION.count, task=TASK, status="success") == 1


def test_instrument_is_idempotent_and_uninstrument_reverses_it(telemetry: Telemetry) -> None:
    """instrument() twice still gives one span per task; after uninstrument(), twice, Starlette's classes are its own
    again and their tasks are neither traced nor counted, while FastAPI's injected tasks stay as importing
    traced_tasks makes them, traced: the state before instrument()."""
    instance = traced_tasks.BackgroundTasksInstrumentor()
    originals = (
        background.BackgroundTask.__init__,
        background.BackgroundTask.__call__,
        background.BackgroundTasks.__call__,
    )
    instance.instrument()
    instance.instrument()
    client = TestClient(starlette_app(), raise_server_exceptions=False)
    client.get("/single")
    assert len(telemetry.task_spans()) == 1
    instance.uninstrument()
    instance.uninstrument()
    assert (
        background.BackgroundTask.__init__,
        background.BackgroundTask.__call__,
        background.BackgroundTasks.__call__,
    ) == originals
    assert not hasattr(background.BackgroundTask, "_otel_original_call")
    client.get("/single")
    assert len(telemetry.task_spans()) == 1
    assert telemetry.value(names.SCHEDULED.total, task=TASK) == 1
    TestClient(fastapi_app()).get("/")
    assert len(telemetry.task_spans()) == 2
    assert telemetry.value(names.SCHEDULED.total, task=TASK) == 2


def test_bad_metrics_port_never_stops_instrumentation(
    telemetry: Telemetry, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bad TRACED_TASKS_METRICS_PORT is logged, instrument() does not raise (opentelemetry-instrument would skip
    the instrumentations after it), tasks are still traced, and uninstrument() restores Starlette."""
    monkeypatch.setenv("TRACED_TASKS_METRICS_PORT", "99999")
    original = Starlette.__call__
    instance = traced_tasks.BackgroundTasksInstrumentor()
    instance.instrument()
    try:
        TestClient(starlette_app(), raise_server_exceptions=False).get("/single")
    finally:
        instance.uninstrument()
    assert len(telemetry.task_spans()) == 1
    assert Starlette.__call__ is original
    assert "TRACED_TASKS_METRICS_PORT='99999': it takes a TCP port number" in caplog.text


@pytest.mark.parametrize("order", ["ours-first", "theirs-first"])
def test_one_span_per_task_beside_otel_fastapi_instrumentation(telemetry: Telemetry, order: str) -> None:
    """With opentelemetry-instrumentation-fastapi instrumented before or after ours, each task is one span, ours;
    uninstrumenting both in reverse order leaves Starlette's own method."""
    ours = traced_tasks.BackgroundTasksInstrumentor()
    app = fastapi_app()

    @app.get("/plain")
    async def plain() -> PlainTextResponse:
        return PlainTextResponse("ok", background=background.BackgroundTask(audit))

    if order == "ours-first":
        ours.instrument()
        FastAPIInstrumentor.instrument_app(app, tracer_provider=telemetry.provider)
    else:
        FastAPIInstrumentor.instrument_app(app, tracer_provider=telemetry.provider)
        ours.instrument()
    try:
        client = TestClient(app)
        client.get("/")
        client.get("/plain")
    finally:  # last in, first out
        if order == "ours-first":
            FastAPIInstrumentor.uninstrument_app(app)
            ours.uninstrument()
        else:
            ours.uninstrument()
            FastAPIInstrumentor.uninstrument_app(app)
    named = [span.name for span in telemetry.spans() if "audit" in span.name]
    assert named == ["BackgroundTask " + TASK] * 2
    assert background.BackgroundTask.__call__.__qualname__ == "BackgroundTask.__call__"


def run_instrumented(tmp_path: Path, **env: str) -> tuple[str, str]:
    """`opentelemetry-instrument uvicorn tests.apps.plain:app` with the console exporter; returns its output and
    the metrics it served on TRACED_TASKS_METRICS_PORT after two requests."""
    port, metrics_port = free_port(), free_port()
    variables = clean_environment(
        OTEL_TRACES_EXPORTER="console",
        OTEL_METRICS_EXPORTER="none",
        OTEL_LOGS_EXPORTER="none",
        OTEL_BSP_SCHEDULE_DELAY="100",
        TRACED_TASKS_METRICS_PORT=str(metrics_port),
        **env,
    )
    instrument = str(Path(sys.executable).parent / "opentelemetry-instrument")
    command = [instrument, sys.executable, "-m", "uvicorn", "tests.apps.plain:app", "--port", str(port)]
    output = (tmp_path / "output.txt").open("w")
    process = subprocess.Popen(command, cwd=ROOT, env=variables, stdout=output, stderr=subprocess.STDOUT)
    metrics = ""
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping")
        httpx.post(f"http://127.0.0.1:{port}/orders/7")
        if env.get("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS") != "traced_tasks":
            wait_until(lambda: "send_receipt" in _metrics(metrics_port))
            metrics = _metrics(metrics_port)
    finally:
        process.terminate()
        process.wait(timeout=30)
        output.close()
    return (tmp_path / "output.txt").read_text(), metrics


def _metrics(port: int) -> str:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics").text
    except httpx.TransportError:
        return ""


@pytest.mark.integration
def test_opentelemetry_instrument_command(tmp_path: Path) -> None:
    """Under the real opentelemetry-instrument command, with FastAPI's instrumentation loaded too, unmodified code's
    tasks are each one span of ours, under the request's server span, and /metrics is served on its own port."""
    output, metrics = run_instrumented(tmp_path)
    assert output.count('"name": "BackgroundTask tests.apps.plain.send_receipt"') == 1
    # /ping's task plus the order's
    assert output.count('"name": "BackgroundTask tests.apps.plain.notify_warehouse"') == 2
    assert '"name": "BackgroundTask send_receipt"' not in output  # no second span from the FastAPI instrumentation
    assert '"name": "POST /orders/{order_id}"' in output
    assert f'{names.DURATION.count}{{status="success",task="tests.apps.plain.send_receipt"}} 1.0' in metrics


@pytest.mark.integration
def test_disabled_by_environment(tmp_path: Path) -> None:
    """OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=traced_tasks keeps it out: FastAPI's instrumentation spans the tasks."""
    output, _ = run_instrumented(tmp_path, OTEL_PYTHON_DISABLED_INSTRUMENTATIONS="traced_tasks")
    assert "BackgroundTask tests.apps.plain" not in output
    assert '"name": "BackgroundTask send_receipt"' in output


def test_metrics_port_serves_the_registry_configured_later(
    telemetry: Telemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The metrics port starts with the app's first ASGI call (lifespan included) and serves whatever registry
    traced_tasks is configured with at scrape time, so configure() in the app's startup code is honoured."""
    port = free_port()
    monkeypatch.setenv("TRACED_TASKS_METRICS_PORT", str(port))
    monkeypatch.setenv("TRACED_TASKS_METRICS_ADDR", "127.0.0.1")
    instance = traced_tasks.BackgroundTasksInstrumentor()
    instance.instrument()
    try:
        with TestClient(starlette_app(), raise_server_exceptions=False) as client:  # runs the lifespan
            assert httpx.get(f"http://127.0.0.1:{port}/metrics").status_code == 200
            later = CollectorRegistry()
            traced_tasks.configure(tracer_provider=telemetry.provider, registry=later)
            client.get("/single")
            text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        instance.uninstrument()
    assert f'{names.SCHEDULED.total}{{task="{TASK}"}} 1.0' in text
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/metrics")


def test_instrument_sends_spans_to_the_given_tracer_provider(telemetry: Telemetry) -> None:
    """instrument(tracer_provider=...) sends task spans to that provider, as OpenTelemetry's instrumentations do,
    and keeps the other options of the configuration in force."""
    traced_tasks.configure(registry=telemetry.registry, route_label=True)  # spans would go to the global provider
    instance = traced_tasks.BackgroundTasksInstrumentor()
    instance.instrument(tracer_provider=telemetry.provider)
    try:
        TestClient(starlette_app()).get("/single")
    finally:
        instance.uninstrument()
    assert [span.name for span in telemetry.task_spans()] == [f"BackgroundTask {TASK}"]
    route = "/single" if STARLETTE_RECORDS_ROUTES else ""
    assert telemetry.value(names.SCHEDULED.total, task=TASK, route=route) == 1


def listening_addresses(port: int) -> set[str]:
    """The local addresses listening on `port`, as the kernel lists them (IPv4)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, local_port = local.split(":")
        if int(local_port, 16) == port and state == "0A":  # LISTEN
            found.add(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def test_metrics_port_listens_on_loopback_by_default(telemetry: Telemetry, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without TRACED_TASKS_METRICS_ADDR the metrics port is bound to 127.0.0.1 only; the variable opens it."""
    for addr, expected in ((None, {"127.0.0.1"}), ("0.0.0.0", {"0.0.0.0"})):
        port = free_port()
        monkeypatch.setenv("TRACED_TASKS_METRICS_PORT", str(port))
        if addr is None:
            monkeypatch.delenv("TRACED_TASKS_METRICS_ADDR", raising=False)
        else:
            monkeypatch.setenv("TRACED_TASKS_METRICS_ADDR", addr)
        instance = traced_tasks.BackgroundTasksInstrumentor()
        instance.instrument()
        try:
            TestClient(starlette_app()).get("/single")  # the first ASGI call starts the server
            assert listening_addresses(port) == expected
        finally:
            instance.uninstrument()


class OwnLoop(background.BackgroundTasks):
    """A batch class with a loop of its own, defined before instrument()."""

    async def __call__(self) -> None:
        for task in self.tasks:
            await task()


@pytest.mark.parametrize("kind", ["fastapi", "defined-before", "defined-after"])
def test_skips_are_counted_whichever_class_runs_the_batch(telemetry: Telemetry, kind: str) -> None:
    """Under the instrumentor, a batch whose class has a __call__ of its own (FastAPI's, made by hand, or any
    subclass, defined before or after instrument()) counts the tasks after a failure as skipped; FastAPI's native
    `fastapi.background_task` spans keep working alongside. uninstrument() gives each class its own method back."""
    originals = (fastapi.BackgroundTasks.__call__, OwnLoop.__call__)
    instance = traced_tasks.BackgroundTasksInstrumentor()
    instance.instrument()
    try:
        if kind == "fastapi":
            batch_class: type[background.BackgroundTasks] = fastapi.BackgroundTasks
        elif kind == "defined-before":
            batch_class = OwnLoop
        else:

            class Later(background.BackgroundTasks):
                async def __call__(self) -> None:
                    for task in self.tasks:
                        await task()

            batch_class = Later
        app = fastapi.FastAPI(telemetry={"tracer_provider": telemetry.provider})

        @app.get("/")
        def endpoint() -> PlainTextResponse:
            tasks = batch_class()
            tasks.add_task(audit)
            tasks.add_task(fail)
            tasks.add_task(audit)
            return PlainTextResponse("ok", background=tasks)

        TestClient(app, raise_server_exceptions=False).get("/")
    finally:
        instance.uninstrument()
    assert telemetry.value(names.SCHEDULED.total, task=TASK) == 2
    assert telemetry.value(names.DURATION.count, task=TASK, status="success") == 1
    assert telemetry.value(names.SKIPPED.total, task=TASK) == 1
    assert telemetry.value(names.EXCEPTIONS.total, task="tests.test_instrumentor.fail", exception="LookupError") == 1
    native = [span for span in telemetry.spans() if span.name == "fastapi.background_task"]
    assert len(native) == (2 if kind == "fastapi" and FASTAPI_NATIVE_TELEMETRY else 0)
    assert (fastapi.BackgroundTasks.__call__, OwnLoop.__call__) == originals


def test_metrics_port_serves_the_console_too(telemetry: Telemetry, monkeypatch: pytest.MonkeyPatch) -> None:
    """The zero-code port serves the task console at /tasks/ and its data beside /metrics, and both take the token
    of TRACED_TASKS_METRICS_TOKEN, read at each request."""
    port = free_port()
    monkeypatch.setenv("TRACED_TASKS_METRICS_PORT", str(port))
    instance = traced_tasks.BackgroundTasksInstrumentor()
    instance.instrument()
    base = f"http://127.0.0.1:{port}"
    try:
        TestClient(starlette_app(), raise_server_exceptions=False).get("/batch")
        page = httpx.get(base + "/tasks/")
        assert page.status_code == 200
        assert "<title>traced_tasks</title>" in page.text
        assert page.headers["content-security-policy"].startswith("default-src 'none'")
        data = httpx.get(base + "/tasks/data.json").json()
        assert {task["task"] for task in data["tasks"]} == {TASK, "tests.test_instrumentor.fail"}
        assert [failure["exception"] for failure in data["failures"]] == ["LookupError"]
        assert httpx.get(base + "/tasks").headers["location"] == "/tasks/"
        monkeypatch.setenv("TRACED_TASKS_METRICS_TOKEN", "t0ken")
        for path in ("/metrics", "/tasks/", "/tasks/data.json"):
            assert httpx.get(base + path).status_code == 401
            assert httpx.get(base + path, headers={"authorization": "Bearer t0ken"}).status_code == 200
    finally:
        instance.uninstrument()


class Delegating(background.BackgroundTasks):
    """A batch class whose own __call__ hands over to Starlette's loop, as one that logs or closes a session does."""

    async def __call__(self) -> None:
        try:
            await super().__call__()
        finally:
            pass


def test_skips_count_once_however_batch_classes_nest(telemetry: Telemetry) -> None:
    """A batch class whose __call__ calls Starlette's, and FastAPI's class holding a nested batch, count each task
    that never ran once, as capture_tasks() sees it too: the counts still add up."""
    instance = traced_tasks.BackgroundTasksInstrumentor()
    instance.instrument()

    async def delegating(request: Request) -> Response:
        tasks = Delegating()
        tasks.add_task(fail)
        tasks.add_task(audit)
        return PlainTextResponse("ok", background=tasks)

    async def nested(request: Request) -> Response:
        outer, inner = fastapi.BackgroundTasks(), background.BackgroundTasks()
        inner.add_task(fail)
        inner.add_task(audit)
        outer.add_task(inner)
        return PlainTextResponse("ok", background=outer)

    try:
        app = Starlette(routes=[Route("/delegating", delegating), Route("/nested", nested)])
        client = TestClient(app, raise_server_exceptions=False)
        with capture_tasks() as runs:
            client.get("/delegating")
            client.get("/nested")
    finally:
        instance.uninstrument()
    assert [(run.task, run.status) for run in runs] == [
        ("tests.test_instrumentor.fail", "error"),
        (TASK, "skipped"),
    ] * 2
    assert telemetry.value(names.SCHEDULED.total, task=TASK) == 2
    assert telemetry.value(names.SKIPPED.total, task=TASK) == 2
