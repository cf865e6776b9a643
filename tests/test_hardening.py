"""Bad input, odd names, exposure, a broken span pipeline, and shutdown."""

from __future__ import annotations

import ast
import asyncio
import logging
import os
import re
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio
import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

import traced_tasks
from tests.apps.tasks import ok
from tests.conftest import Telemetry
from tests.support import OPENMETRICS, Collector, Server, require_tool, run_python, start_workers, wait_until
from traced_tasks import BackgroundTask, BackgroundTasks
from traced_tasks import _conventions as names

ODD = 'quote" back\\slash\nnewline ünïcødé ✓'


@pytest.mark.parametrize("problem", ["missing", "a file"])
def test_unusable_multiprocess_directory_fails_at_import(tmp_path: Path, problem: str) -> None:
    """A PROMETHEUS_MULTIPROC_DIR that is missing or not a directory stops the service at startup, saying what to do."""
    path = tmp_path / "metrics"
    if problem == "a file":
        path.write_text("")
    result = run_python("import traced_tasks", PROMETHEUS_MULTIPROC_DIR=str(path))
    assert result.returncode == 1
    assert f"RuntimeError: PROMETHEUS_MULTIPROC_DIR={str(path)!r} is not a directory: create it" in result.stderr


UNREADABLE_FILES = """
import logging
logging.basicConfig(format="%(name)s|%(levelname)s|%(message)s")
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient
import traced_tasks
from traced_tasks import _conventions as names

def send_receipt():
    pass

async def order(request):
    tasks = traced_tasks.BackgroundTasks()
    tasks.add_task(send_receipt)
    return PlainTextResponse("ok", background=tasks)

app = Starlette(routes=[Route("/orders", order, methods=["POST"]), Mount("/metrics", traced_tasks.metrics_app)])
client = TestClient(app)
print(client.post("/orders").status_code, client.post("/orders").status_code)
for _ in range(2):
    page = client.get("/metrics/")
    lines = page.text.splitlines()
    print(page.status_code, [line for line in lines if line.startswith(names.SCHEDULED.total)])
"""


def test_unreadable_files_in_the_multiprocess_folder_are_skipped(tmp_path: Path) -> None:
    """An empty file (a worker killed while it made it) and a garbled one in the multiprocess folder break neither
    add_task nor /metrics: the tasks run and are counted, the other files are served, and each unreadable file is
    logged once."""
    folder = tmp_path / "metrics"
    folder.mkdir()
    (folder / "counter_999991.db").write_bytes(b"")
    # 64 bytes in use, then an entry whose key would be 1,000 bytes long.
    (folder / "gauge_all_999992.db").write_bytes(struct.pack("<ii", 64, 0) + struct.pack("<i", 1000) + bytes(52))
    result = run_python(UNREADABLE_FILES, PROMETHEUS_MULTIPROC_DIR=str(folder))
    assert result.returncode == 0, result.stderr
    scheduled = [f'{names.SCHEDULED.total}{{task="__main__.send_receipt"}} 2.0']
    assert result.stdout.splitlines() == ["200 200", f"200 {scheduled}", f"200 {scheduled}"]
    logged = re.findall(r"^traced_tasks\|WARNING\|traced_tasks: cannot read (\S+),", result.stderr, re.MULTILINE)
    assert sorted(logged) == [
        str(folder / "counter_999991.db"),
        str(folder / "gauge_all_999992.db"),
    ], result.stderr


def test_odd_task_and_exception_names_keep_the_exposition_valid(telemetry: Telemetry) -> None:
    """Quotes, backslashes, newlines and non-ASCII in task and exception names survive both formats exactly."""

    def task() -> None:
        raise OddError()

    task.__qualname__ = ODD
    OddError = type("OddError", (Exception,), {"__qualname__": ODD})

    async def main() -> None:
        tasks = BackgroundTasks()
        tasks.add_task(task)
        with pytest.raises(OddError):
            await tasks()

    asyncio.run(main())
    name = f"tests.test_hardening.{ODD}"
    assert telemetry.value(names.EXCEPTIONS.total, task=name, exception=ODD) == 1

    text = TestClient(traced_tasks.make_metrics_app(telemetry.registry)).get("/").text
    openmetrics = generate_openmetrics(telemetry.registry).decode()
    for families in (parse_text(text), parse_openmetrics(openmetrics)):
        samples = [sample for family in families for sample in family.samples]
        assert {"task": name, "exception": ODD} in [sample.labels for sample in samples]
    # The exemplar of the failed run, whatever the names: its labels are the IDs only, within OpenMetrics' 128.
    (span,) = telemetry.task_spans()
    exemplars = [
        sample.exemplar.labels
        for family in parse_openmetrics(openmetrics)
        for sample in family.samples
        if sample.exemplar and sample.labels.get("task") == name
    ]
    assert exemplars == [
        {"trace_id": format(span.context.trace_id, "032x"), "span_id": format(span.context.span_id, "016x")}
    ]
    assert sum(len(key) + len(value) for key, value in exemplars[0].items()) <= 128
    promtool = require_tool("promtool")
    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stderr


def test_names_that_are_not_utf8_break_neither_scrape_nor_span_export(telemetry: Telemetry) -> None:
    """A task whose name and file hold lone surrogates (as os.fsdecode makes from a file name that is not UTF-8),
    failing with an exception class named the same way: /metrics answers in both formats with the names escaped,
    and its span reaches an OTLP collector with the ten spans around it."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    def odd() -> None:
        raise Odd()

    odd.__qualname__ = "send_\udcff"
    odd.__code__ = odd.__code__.replace(co_filename="/srv/\udce9t\udce9/tasks.py")
    Odd = type("Odd", (Exception,), {"__qualname__": "Err\udcff"})

    with Collector() as collector:
        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=collector.endpoint + "/v1/traces")))
        traced_tasks.configure(tracer_provider=provider, registry=telemetry.registry)

        async def main() -> None:
            for _ in range(5):
                await BackgroundTask(ok)()
            with pytest.raises(Odd):
                await BackgroundTask(odd)()
            for _ in range(5):
                await BackgroundTask(ok)()

        asyncio.run(main())
        provider.force_flush()
        spans = collector.spans()
        provider.shutdown()
    assert len(spans) == 11
    (span,) = [span for span in spans if "send_" in span.name]
    assert span.name == "BackgroundTask tests.test_hardening.send_\\udcff"
    attributes = {attribute.key: attribute.value for attribute in span.attributes}
    assert attributes[names.ATTR_FILE].string_value == "/srv/\\udce9t\\udce9/tasks.py"
    assert attributes[names.ATTR_ERROR_TYPE].string_value == "Err\\udcff"
    client = TestClient(traced_tasks.make_metrics_app(telemetry.registry))
    for accept, parse in (("text/plain", parse_text), (OPENMETRICS, parse_openmetrics)):
        page = client.get("/", headers={"accept": accept})
        assert page.status_code == 200
        labels = [sample.labels for family in parse(page.text) for sample in family.samples]
        assert {"task": "tests.test_hardening.send_\\udcff", "exception": "Err\\udcff"} in labels


def test_bearer_token(telemetry: Telemetry) -> None:
    """With a bearer token, /metrics answers 401 without it or with a wrong one, and the metrics with it."""
    client = TestClient(traced_tasks.make_metrics_app(telemetry.registry, bearer_token="s3cret"))
    traced_tasks.BackgroundTask(print)  # something to serve
    assert client.get("/").status_code == 401
    assert client.get("/", headers={"authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/", headers={"authorization": "s3cret"}).status_code == 401
    served = client.get("/", headers={"authorization": "Bearer s3cret"})
    assert served.status_code == 200
    assert names.SCHEDULED.total in served.text


@pytest.mark.parametrize("token", [b"s3cret", 1234, ["s3cret"]], ids=["bytes", "int", "list"])
@pytest.mark.parametrize("make", [traced_tasks.make_metrics_app, traced_tasks.make_console_app])
def test_a_token_that_is_not_text_is_refused_at_the_call(make: Callable[..., object], token: object) -> None:
    """A bearer token that is not a str fails where the app is made, with a TypeError naming the argument, rather
    than with a 500 on every request."""
    with pytest.raises(TypeError, match="bearer_token must be a str"):
        make(bearer_token=token)


def test_a_registry_that_is_not_one_is_refused_at_the_call() -> None:
    """make_metrics_app() refuses something that is not a prometheus_client registry, naming the argument."""
    with pytest.raises(TypeError, match="registry must be a prometheus_client CollectorRegistry"):
        traced_tasks.make_metrics_app("REGISTRY")  # type: ignore[arg-type]


def test_the_token_is_read_when_serving(telemetry: Telemetry, monkeypatch: pytest.MonkeyPatch) -> None:
    """A token set after the imports (load_dotenv() in the app) still protects metrics_app: it is read at each
    request. The scheme is case-insensitive, and a secret file's trailing newline is ignored."""
    client = TestClient(traced_tasks.metrics_app)
    monkeypatch.delenv("TRACED_TASKS_METRICS_TOKEN", raising=False)
    assert client.get("/").status_code == 200
    monkeypatch.setenv("TRACED_TASKS_METRICS_TOKEN", "t0ken\n")
    assert client.get("/").status_code == 401
    assert client.get("/", headers={"authorization": "Bearer t0ken2"}).status_code == 401
    assert client.get("/", headers={"authorization": "Basic t0ken"}).status_code == 401
    for given in ("Bearer t0ken", "bearer t0ken", "BEARER  t0ken "):
        assert client.get("/", headers={"authorization": given}).status_code == 200, given


def test_a_blank_token_lets_no_one_in(
    telemetry: Telemetry, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A token variable that is set but blank (an empty secret file) refuses every request and says so once, rather
    than leaving /metrics open; a blank bearer_token is refused when the app is made."""
    client = TestClient(traced_tasks.make_metrics_app())
    monkeypatch.setenv("TRACED_TASKS_METRICS_TOKEN", "\n")
    with caplog.at_level(logging.ERROR, logger="traced_tasks"):
        assert client.get("/").status_code == 401
        assert client.get("/", headers={"authorization": "Bearer "}).status_code == 401
    assert len([record for record in caplog.records if "blank" in record.getMessage()]) == 1
    with pytest.raises(ValueError, match="bearer_token"):
        traced_tasks.make_metrics_app(bearer_token=" ")


def test_a_websocket_to_metrics_is_refused_cleanly(telemetry: Telemetry) -> None:
    """A websocket connection to /metrics is closed with a policy-violation code before it is accepted, instead of
    failing an assertion in the server."""
    from starlette.websockets import WebSocketDisconnect

    app = Starlette(routes=[Mount("/metrics", traced_tasks.metrics_app)])
    with (
        TestClient(app) as client,
        pytest.raises(WebSocketDisconnect) as refused,
        client.websocket_connect("/metrics/"),
    ):
        pass
    assert refused.value.code == 1008


def test_default_metrics_app_takes_its_token_from_the_environment() -> None:
    """TRACED_TASKS_METRICS_TOKEN at startup protects traced_tasks.metrics_app."""
    code = """
from starlette.testclient import TestClient
import traced_tasks
client = TestClient(traced_tasks.metrics_app)
print(client.get("/").status_code, client.get("/", headers={"authorization": "Bearer t0ken"}).status_code)
"""
    result = run_python(code, TRACED_TASKS_METRICS_TOKEN="t0ken")
    assert result.stdout.split() == ["401", "200"], result.stderr


class HangingExporter(SpanExporter):
    """An exporter stuck on a dead collector until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.calls += 1
        self.release.wait()
        return SpanExportResult.SUCCESS


class RaisingExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        raise ConnectionRefusedError("collector down")


def test_an_ending_worker_process_waits_for_a_hung_collector_a_few_seconds_only(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker process that ends (a Celery prefork child, a taskiq worker process) exports its spans first, but a
    collector that hangs holds it up PROCESS_FLUSH_SECONDS at most, not the exporter's timeout (ten minutes here):
    its pool replaces it only once it has ended. It says so once."""
    from traced_tasks import _shutdown

    exporter = HangingExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=60_000))
    provider.get_tracer("test").start_span("queued").end()
    monkeypatch.setattr(_shutdown, "_providers", [provider])
    monkeypatch.setattr(_shutdown, "_stalled", threading.Event())
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "600")
    outcome: list[bool] = []
    flushing = threading.Thread(target=lambda: outcome.append(_shutdown.flush_process()), daemon=True)
    try:
        with caplog.at_level(logging.WARNING, logger="traced_tasks"):
            flushing.start()
            wait_until(lambda: not flushing.is_alive())  # well past PROCESS_FLUSH_SECONDS, far from 600 s
        assert outcome == [False]
        assert exporter.calls == 1  # it did try
        assert caplog.text.count("were not all exported in time") == 1
    finally:
        exporter.release.set()


@pytest.mark.parametrize("exporter_class", [HangingExporter, RaisingExporter])
def test_broken_exporter_never_holds_up_tasks(
    exporter_class: type[SpanExporter], caplog: pytest.LogCaptureFixture
) -> None:
    """Behind a BatchSpanProcessor, an exporter that hangs or raises runs in its own thread: all 3,000 tasks run and
    are counted while it is stuck, its small queue drops spans instead of blocking, and traced_tasks logs nothing."""
    exporter = exporter_class()
    provider = TracerProvider()
    provider.add_span_processor(
        BatchSpanProcessor(exporter, max_queue_size=16, max_export_batch_size=4, schedule_delay_millis=1)
    )
    registry = CollectorRegistry()
    traced_tasks.configure(tracer_provider=provider, registry=registry)
    ran: list[int] = []

    async def main() -> None:
        for index in range(3000):
            tasks = BackgroundTasks()
            tasks.add_task(ran.append, index)
            await tasks()

    try:
        with caplog.at_level(logging.DEBUG, logger="traced_tasks"):
            asyncio.run(main())
        assert len(ran) == 3000
        labels = {"task": "builtins.list.append", "status": "success"}
        assert registry.get_sample_value(names.DURATION.count, labels) == 3000
        assert [record for record in caplog.records if record.name == "traced_tasks"] == []
        if isinstance(exporter, HangingExporter):
            assert exporter.calls == 1  # still stuck in its first export
    finally:
        if isinstance(exporter, HangingExporter):
            exporter.release.set()
        provider.shutdown()
        traced_tasks.configure(registry=CollectorRegistry())


def shutdown_app(started: threading.Event) -> Starlette:
    async def quick() -> None:
        await asyncio.sleep(0.05)

    async def slow() -> None:
        started.set()
        await asyncio.sleep(3600)

    async def endpoint(request: Request) -> Response:
        tasks = BackgroundTasks()
        tasks.add_task(quick)
        if request.query_params.get("slow"):
            tasks.add_task(slow)
            tasks.add_task(quick)
        return PlainTextResponse("ok", background=tasks)

    return Starlette(routes=[Route("/", endpoint), Mount("/metrics", traced_tasks.metrics_app)])


def test_graceful_shutdown_finishes_or_cancels(telemetry: Telemetry, serve: type[Server]) -> None:
    """A graceful uvicorn shutdown while tasks run lets quick tasks finish and records the one it cuts as cancelled;
    the task after it counts as skipped, nothing is left in progress, and the counts add up."""
    started = threading.Event()
    server = serve(shutdown_app(started), timeout_graceful_shutdown=1)
    httpx.get(server.url + "/", params={"slow": "1"})
    wait_until(started.is_set)
    server.stop()

    def value(name: str, task: str, **labels: str) -> float:
        sample = telemetry.value(name, task=f"tests.test_hardening.shutdown_app.<locals>.{task}", **labels)
        assert sample is not None
        return sample

    assert value(names.DURATION.count, "quick", status="success") == 1
    assert value(names.DURATION.count, "slow", status="cancelled") == 1
    assert value(names.SKIPPED.total, "quick") == 1
    assert value(names.IN_PROGRESS.name, "slow") == 0
    assert value(names.SCHEDULED.total, "quick") == 2
    (span,) = [span for span in telemetry.task_spans() if span.name.endswith(".slow")]
    assert (span.attributes or {})["background_task.status"] == "cancelled"


@pytest.mark.integration
def test_dead_worker_stops_counting_as_running(tmp_path: Path) -> None:
    """Under uvicorn --workers 2, a worker killed mid-task stops counting in the in-progress gauge at the next
    scrape, and its run counts as an error, WorkerLostError, while its counters stay. Without the cleanup, the dead
    worker's 1 would stay forever, and the run would have no outcome."""

    with start_workers(tmp_path) as url:
        long = "tests.apps.workers.long_job"

        def metric(name: str, labels: str = "") -> str | None:
            text = httpx.get(url + "/metrics/", headers={"accept": OPENMETRICS}).text
            lines = [line for line in text.splitlines() if line.startswith(f'{name}{{{labels}task="{long}"}}')]
            return lines[0].rsplit(" ", 1)[1] if lines else None

        pid = httpx.post(url + "/long").json()["pid"]
        wait_until(lambda: metric(names.IN_PROGRESS.name) == "1.0")
        os.kill(pid, 9)
        wait_until(lambda: metric(names.IN_PROGRESS.name) in (None, "0.0"))
        assert metric(names.EXCEPTIONS.total, f'exception="{names.LOST}",') == "1.0"
        assert metric(names.SCHEDULED.total) == "1.0"


@pytest.mark.integration
def test_oldest_running_start_across_workers(tmp_path: Path) -> None:
    """Under uvicorn --workers 2, with a hung run in each worker, the in-progress-since gauge is the oldest start of
    any live worker; when that worker dies it moves to the other's start, and when both are gone it is absent."""
    with start_workers(tmp_path) as url:
        long = "tests.apps.workers.long_job"

        def since() -> float | None:
            text = httpx.get(url + "/metrics/", headers={"accept": OPENMETRICS}).text
            prefix = f'{names.IN_PROGRESS_SINCE.name}{{task="{long}"}} '
            lines = [line for line in text.splitlines() if line.startswith(prefix)]
            return float(lines[0].rsplit(" ", 1)[1]) if lines else None

        started: dict[int, float] = {}
        for _ in range(1000):  # a connection each, until the kernel gave both workers a run
            before = time.time()
            with httpx.Client() as client:
                started.setdefault(client.post(url + "/long").json()["pid"], before)
            if len(started) == 2:
                break
        assert len(started) == 2, "requests never reached the second worker"
        (first, first_at), (second, second_at) = sorted(started.items(), key=lambda item: item[1])
        wait_until(lambda: since() is not None)
        assert first_at <= (since() or 0) < second_at
        os.kill(first, 9)
        wait_until(lambda: (since() or 0) >= second_at)
        os.kill(second, 9)
        wait_until(lambda: since() is None)


def hang(release: threading.Event) -> None:
    release.wait(30)


def test_in_progress_since_is_the_oldest_start_and_absent_when_nothing_runs(telemetry: Telemetry) -> None:
    """In one process, the gauge holds the Unix time the oldest run still in progress started, follows the next one
    when it ends, and is absent once none runs."""
    task = "tests.test_hardening.hang"
    releases = [threading.Event(), threading.Event()]
    marks: list[float] = []
    seen: list[float | None] = []

    async def main() -> None:
        async with anyio.create_task_group() as group:
            for running, release in enumerate(releases, start=1):
                marks.append(time.time())
                group.start_soon(BackgroundTask(hang, release))
                while telemetry.value(names.IN_PROGRESS.name, task=task) != running:
                    await anyio.sleep(0.001)
            seen.append(telemetry.value(names.IN_PROGRESS_SINCE.name, task=task))
            releases[0].set()
            while telemetry.value(names.IN_PROGRESS.name, task=task) != 1:
                await anyio.sleep(0.001)
            seen.append(telemetry.value(names.IN_PROGRESS_SINCE.name, task=task))
            releases[1].set()

    asyncio.run(main())
    first, then = seen
    assert first is not None
    assert then is not None
    assert marks[0] <= first < marks[1] <= then
    assert telemetry.value(names.IN_PROGRESS_SINCE.name, task=task) is None


def test_worker_folder_is_cleaned_for_dead_pids_only(tmp_path: Path) -> None:
    """Only live-gauge files of processes that are gone are removed; this process's and counters' files stay."""
    from prometheus_client import CollectorRegistry

    from traced_tasks._activity import Activity
    from traced_tasks._backends.multiprocess import MultiprocessBackend
    from traced_tasks._options import Options

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    names = [
        f"gauge_livesum_{dead_pid}.db",
        f"gauge_livesum_{os.getpid()}.db",
        f"counter_{dead_pid}.db",
        f"gauge_max_{dead_pid}.db",
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    MultiprocessBackend(Options(registry=CollectorRegistry()), str(tmp_path), Activity()).reap()
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(names[1:])


RECONFIGURED_MIDWAY = """
import asyncio, os
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
import traced_tasks
from traced_tasks import _conventions as names

def counts():
    registry = CollectorRegistry()
    MultiProcessCollector(registry, os.environ["PROMETHEUS_MULTIPROC_DIR"])
    labels = {"task": "__main__.work"}
    return (
        registry.get_sample_value(names.DURATION.count, {**labels, "status": "success"}),
        registry.get_sample_value(names.IN_PROGRESS.name, labels),
    )

async def work(released=None):
    if released is not None:
        await released.wait()

async def main():
    traced_tasks.configure(buckets=(60,))  # every run in the first bucket, so that each one updates the same value
    seen = []
    for _ in range(5):
        await traced_tasks.BackgroundTask(work)()
        seen.append(counts())
    released = asyncio.Event()
    running = asyncio.create_task(traced_tasks.BackgroundTask(work, released)())
    await asyncio.sleep(0.01)
    traced_tasks.configure(buckets=(60,))  # again, while a task runs
    await traced_tasks.BackgroundTask(work)()
    seen.append(counts())
    released.set()
    await running
    seen.append(counts())
    print(seen)

asyncio.run(main())
"""


def test_configuring_again_while_a_task_runs_keeps_multiprocess_counts(tmp_path: Path) -> None:
    """In multiprocess mode, configure() while a task runs, then more runs: the run-time count climbs 1 to 7 without
    a dip (a dip reads as a counter reset), and nothing is left in progress."""
    folder = tmp_path / "metrics"
    folder.mkdir()
    result = run_python(RECONFIGURED_MIDWAY, PROMETHEUS_MULTIPROC_DIR=str(folder))
    assert result.returncode == 0, result.stderr
    seen = ast.literal_eval(result.stdout.strip())
    assert seen == [(1.0, 0.0), (2.0, 0.0), (3.0, 0.0), (4.0, 0.0), (5.0, 0.0), (6.0, 1.0), (7.0, 0.0)]
