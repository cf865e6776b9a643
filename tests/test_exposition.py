from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

import traced_tasks
from tests.conftest import Telemetry
from tests.support import OPENMETRICS, Server, require_tool, run_python, start_workers, wait_until
from traced_tasks import BackgroundTasks
from traced_tasks import _conventions as names


def ok() -> None:
    pass


def fail() -> None:
    raise ValueError("boom")


def app_with_metrics(metrics_app: object = traced_tasks.metrics_app) -> Starlette:
    async def endpoint(request: Request) -> Response:
        tasks = BackgroundTasks()
        tasks.add_task(ok)
        tasks.add_task(fail)
        tasks.add_task(ok)
        return PlainTextResponse("ok", background=tasks)

    return Starlette(routes=[Route("/", endpoint), Mount("/metrics", metrics_app)])  # type: ignore[arg-type]


def test_text_format_by_default(telemetry: Telemetry) -> None:
    """/metrics serves the configured registry in the Prometheus text format, which carries no exemplars."""
    client = TestClient(app_with_metrics(), raise_server_exceptions=False)
    client.get("/")
    response = client.get("/metrics/")
    assert response.headers["content-type"].startswith("text/plain")
    assert f'{names.SCHEDULED.total}{{task="tests.test_exposition.ok"}} 2.0' in response.text
    assert f'{names.SKIPPED.total}{{task="tests.test_exposition.ok"}} 1.0' in response.text
    assert "trace_id" not in response.text


def test_openmetrics_with_exemplars_when_asked(telemetry: Telemetry) -> None:
    """A scraper that accepts OpenMetrics gets it, with the duration exemplar of the task span."""
    client = TestClient(app_with_metrics(), raise_server_exceptions=False)
    client.get("/")
    response = client.get("/metrics/", headers={"accept": OPENMETRICS})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    spans = {span.name: span for span in telemetry.task_spans()}
    failed = spans["BackgroundTask tests.test_exposition.fail"]
    exemplars = [
        sample.exemplar
        for family in parse_openmetrics(response.text)
        for sample in family.samples
        if sample.exemplar and sample.labels.get("status") == "error"
    ]
    assert [exemplar.labels for exemplar in exemplars] == [
        {"trace_id": format(failed.context.trace_id, "032x"), "span_id": format(failed.context.span_id, "016x")}
    ]
    assert response.text.rstrip().endswith("# EOF")


def test_make_metrics_app_serves_the_given_registry(telemetry: Telemetry) -> None:
    """make_metrics_app(registry) serves that registry, not the one traced_tasks counts in."""
    other = CollectorRegistry()
    Counter("shop_orders", "Orders placed.", registry=other).inc(2)
    client = TestClient(app_with_metrics(traced_tasks.make_metrics_app(other)), raise_server_exceptions=False)
    client.get("/")
    served = client.get("/metrics/").text
    assert "shop_orders_total 2.0" in served
    assert telemetry.value(names.SCHEDULED.total, task="tests.test_exposition.ok") == 2  # counted, elsewhere
    assert names.SCHEDULED.total not in served


def test_exposition_passes_promtool(telemetry: Telemetry) -> None:
    """promtool check metrics finds no problem with any metric name, type, unit or help text."""
    promtool = require_tool("promtool")
    client = TestClient(app_with_metrics(), raise_server_exceptions=False)
    client.get("/")
    text = client.get("/metrics/").text
    assert names.EXCEPTIONS.total in text
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[str]:
    with start_workers(tmp_path) as url:
        yield url


@pytest.mark.integration
def test_multiprocess_sums_every_worker(workers: str) -> None:
    """Under uvicorn --workers 2, /metrics counts the tasks of both workers, whichever worker is scraped."""
    pids: set[int] = set()
    sent = 0
    while len(pids) < 2 and sent < 5000:
        with httpx.Client() as client:  # a new connection each time, so the kernel spreads them over workers
            pids.add(client.post(f"{workers}/orders/{sent}").json()["pid"])
        sent += 1
    assert len(pids) == 2, "requests never reached the second worker"
    name = "tests.apps.workers.record_order"

    def finished() -> float:
        text = httpx.get(workers + "/metrics/").text
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }
        return samples.get((names.DURATION.count, (("status", "success"), ("task", name))), 0.0)

    wait_until(lambda: finished() == sent)
    text = httpx.get(workers + "/metrics/", headers={"accept": OPENMETRICS}).text
    assert f'{names.SCHEDULED.total}{{task="{name}"}} {float(sent)}' in text
    assert f'{names.IN_PROGRESS.name}{{task="{name}"}} 0.0' in text
    assert "trace_id" not in text  # multiprocess mode drops exemplars


class ThreadRecorder:
    """A collector that notes which thread collects it, and yields nothing."""

    def __init__(self) -> None:
        self.threads: list[int] = []

    def collect(self) -> list[object]:
        self.threads.append(threading.get_ident())
        return []


def test_rendering_runs_off_the_event_loop(telemetry: Telemetry) -> None:
    """/metrics renders in the threadpool, so a large scrape does not stall the requests the loop is serving."""
    recorder = ThreadRecorder()
    telemetry.registry.register(recorder)  # type: ignore[arg-type]
    loop_threads: list[int] = []

    async def endpoint(request: Request) -> Response:
        loop_threads.append(threading.get_ident())
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", endpoint), Mount("/metrics", traced_tasks.metrics_app)])
    # One event loop thread for both requests, alive while the worker thread runs, so their ids cannot collide.
    with TestClient(app) as client:
        client.get("/")
        assert client.get("/metrics/").status_code == 200
    assert recorder.threads
    assert loop_threads
    assert recorder.threads[0] != loop_threads[0]


def test_gzip_and_name_filter(telemetry: Telemetry) -> None:
    """Like prometheus_client's own app, /metrics gzips when asked and honours the name[] filter."""
    client = TestClient(app_with_metrics(), raise_server_exceptions=False)
    client.get("/")
    response = client.get("/metrics/", headers={"accept-encoding": "gzip"})
    assert response.headers["content-encoding"] == "gzip"
    assert names.SCHEDULED.total in response.text  # httpx decodes it
    filtered = client.get("/metrics/", params={"name[]": names.SKIPPED.total}).text
    assert names.SKIPPED.total in filtered
    assert names.SCHEDULED.total not in filtered


def test_metrics_app_serves_the_applications_metrics_beside_ours(telemetry: Telemetry) -> None:
    """The application's own metrics in the same registry are served with ours, in both formats, and the
    OpenMetrics body ends with exactly one # EOF."""
    from prometheus_client import Counter

    orders = Counter("shop_orders", "Orders placed.", registry=telemetry.registry)
    orders.inc(3)
    client = TestClient(app_with_metrics(), raise_server_exceptions=False)
    client.get("/")
    text = client.get("/metrics/").text
    assert "shop_orders_total 3.0" in text
    assert f'{names.SCHEDULED.total}{{task="tests.test_exposition.ok"}} 2.0' in text
    openmetrics = client.get("/metrics/", headers={"accept": OPENMETRICS}).text
    assert "shop_orders_total 3.0" in openmetrics
    assert openmetrics.count("# EOF") == 1
    assert openmetrics.endswith("# EOF\n")
    families = {family.name for family in parse_openmetrics(openmetrics)}
    assert {"shop_orders", names.SCHEDULED.name, names.DURATION.name} <= families


@pytest.mark.integration
def test_metrics_answer_while_sync_tasks_fill_the_threadpool(telemetry: Telemetry, serve: type[Server]) -> None:
    """With 45 sync tasks blocked (a mail server down), more than the 40 threads Starlette's threadpool allows,
    /metrics still answers through real uvicorn, and shows them running: it renders in threads of its own."""
    release = threading.Event()
    started = threading.Semaphore(0)

    def send_mail() -> None:
        started.release()
        release.wait(60)

    async def place_order(request: Request) -> Response:
        tasks = BackgroundTasks()
        tasks.add_task(send_mail)
        return PlainTextResponse("ok", background=tasks)

    server = serve(Starlette(routes=[Route("/orders", place_order), Mount("/metrics", traced_tasks.metrics_app)]))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for _ in range(45):
                client.get("/orders")
            for _ in range(40):  # the threadpool is full
                assert started.acquire(timeout=30)
            response = client.get("/metrics/")  # waits for nothing the tasks hold
            assert not release.is_set()
        name = "tests.test_exposition.test_metrics_answer_while_sync_tasks_fill_the_threadpool.<locals>.send_mail"
        assert f'{names.IN_PROGRESS.name}{{task="{name}"}} 40.0' in response.text
        assert f'{names.SCHEDULED.total}{{task="{name}"}} 45.0' in response.text
    finally:
        release.set()


def test_the_task_name_cap_holds_across_worker_restarts(tmp_path: Path) -> None:
    """In multiprocess mode, a worker that replaces another (gunicorn's max_requests) counts the task names already
    in the folder toward max_task_names: after four workers, each with new names, /metrics still holds three."""
    folder = tmp_path / "metrics"
    folder.mkdir()
    for worker in range(4):
        code = f"""
import asyncio
import traced_tasks
traced_tasks.configure(max_task_names=3)

async def main():
    for name in ["known", "new_{worker}_a", "new_{worker}_b", "new_{worker}_c"]:
        namespace = {{}}
        exec(f"def {{name}}():\\n    pass", namespace)
        await traced_tasks.BackgroundTask(namespace[name])()

asyncio.run(main())
"""
        result = run_python(code, PROMETHEUS_MULTIPROC_DIR=str(folder))
        assert result.returncode == 0, result.stderr
    registry = CollectorRegistry()
    MultiProcessCollector(registry, str(folder))
    served = {
        sample.labels["task"]
        for metric in registry.collect()
        for sample in metric.samples
        if sample.name == names.SCHEDULED.total
    }
    assert served == {"known", "new_0_a", "new_0_b", traced_tasks.OVERFLOW}


def test_the_route_cap_holds_across_worker_restarts(tmp_path: Path) -> None:
    """In multiprocess mode with the route label, a worker that replaces another counts the routes already in the
    folder toward the cap of 100: after two workers with 60 new routes each, /metrics holds 100 routes and the
    overflow, not 120."""
    folder = tmp_path / "metrics"
    folder.mkdir()
    for worker in range(2):
        code = f"""
from fastapi import FastAPI
from fastapi.testclient import TestClient
import traced_tasks
from traced_tasks import BackgroundTasks
traced_tasks.configure(route_label=True)

def send() -> None:
    pass

app = FastAPI()
app.add_middleware(traced_tasks.TraceContextMiddleware)  # which makes the route known
for number in range(60):
    @app.post(f"/w{worker}/r{{number}}/{{{{item}}}}")
    def route(item: int, tasks: BackgroundTasks) -> None:
        tasks.add_task(send)

client = TestClient(app)
for number in range(60):
    assert client.post(f"/w{worker}/r{{number}}/1").status_code == 200
"""
        result = run_python(code, PROMETHEUS_MULTIPROC_DIR=str(folder))
        assert result.returncode == 0, result.stderr
    registry = CollectorRegistry()
    MultiProcessCollector(registry, str(folder))
    served = {
        sample.labels["route"]
        for metric in registry.collect()
        for sample in metric.samples
        if sample.name == names.SCHEDULED.total
    }
    assert len(served - {traced_tasks.OVERFLOW}) == 100
    assert traced_tasks.OVERFLOW in served
