"""The contract every engine integration keeps, proven the same way over each engine: what a handed-over task keeps,
every way a run ends and the one outcome it gets, malformed metadata, a direct publish, add_task's skips, the console
and the counts identity, in eager and in-memory modes too. An integration that passes it is correct.

The proof: a real redis-server, a real uvicorn web process, a real worker (`celery worker -P prefork -c 2`, `taskiq
worker --workers 2`), spans over OTLP/HTTP to a receiver, and metrics scraped from both processes. What only one
engine has (a broker that is down, zero-code) is in test_celery.py and test_taskiq.py."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.conftest import Telemetry
from tests.engines import BIN, CELERY, TASKIQ, TRACE_ID, Engine, Shop, row, shape, spans_named, traceparent, value
from tests.support import Collector, Process, attributes, wait_until
from traced_tasks import BackgroundTasks
from traced_tasks import _conventions as names

integration = pytest.mark.integration


@pytest.fixture(params=[CELERY, TASKIQ], ids=str)
def shop(request: pytest.FixtureRequest, tmp_path: Path, broker: str, collector: Collector) -> Iterator[Shop]:
    engine: Engine = request.param
    started = Shop(engine, tmp_path, broker, collector)
    try:
        yield started
    finally:
        started.stop()


@integration
def test_a_task_runs_on_the_worker_in_the_trace_that_scheduled_it(shop: Shop) -> None:
    """Three orders scheduled while no worker runs, the worker started two seconds later: each run is a CONSUMER
    span of a worker process, named and attributed as in process (its module.qualname and file, not the engine's
    names), a child of the request's server span in its trace, with its route; its wait, measured across the broker,
    is over a second; the web process counts three scheduled and makes no span of that name; the worker counts three
    starts and three successes; and both expose the same families, label keys and buckets. The web process's console
    marks the task as run by the engine, with no count of runs not started; the worker's console counts its runs."""
    web = shop.start_web()
    for order in range(3):
        assert httpx.post(f"{web}/orders/{order}", headers={"traceparent": traceparent(order)}).status_code == 200
    time.sleep(2)
    shop.start_worker()
    task = shop.engine.tasks + "send_receipt"
    wait_until(lambda: value(shop.worker_metrics(), names.DURATION.count, task=task, status="success") == 3)
    wait_until(lambda: len(shop.task_spans("send_receipt")) == 3)
    servers = {
        span.trace_id: span for span in shop.collector.spans_of("shop-web") if span.kind == Span.SPAN_KIND_SERVER
    }
    for span in shop.task_spans("send_receipt"):
        assert span.kind == Span.SPAN_KIND_CONSUMER
        assert span.trace_id.hex()[:-4] == TRACE_ID[:-4]
        assert span.parent_span_id == servers[span.trace_id].span_id
        found = attributes(span)
        assert found[names.ATTR_ROUTE] == "/orders/{order_id}"
        assert found[names.ATTR_FUNCTION] == task
        assert found[names.ATTR_FILE].endswith(f"tests/apps/{shop.engine.name}_shop.py")
    assert spans_named(shop.collector.spans_of("shop-web"), task) == []
    worker, web_side = shop.worker_metrics(), shop.web_metrics(web)
    assert value(web_side, names.SCHEDULED.total, task=task) == 3
    assert value(worker, names.SCHEDULED.total, task=task) == 0  # declared at the worker's start
    assert value(worker, names.WAIT.count, task=task) == 3
    assert value(worker, names.WAIT.bucket, task=task, le="1.0") == 0  # every wait over a second
    assert value(worker, names.IN_PROGRESS.name, task=task) == 0
    assert shape(worker, task) == shape(web_side, task)
    web_row = row(httpx.get(f"{web}/tasks/data.json").json(), task)
    worker_row = row(httpx.get(shop.worker_url + "/tasks/data.json").json(), task)
    assert (web_row["runs_on"], web_row["not_started"]) == (shop.engine.name, None)  # not "3 not started"
    assert (worker_row["runs_on"], worker_row["finished"], worker_row["not_started"]) == (None, 3, 0)


@integration
def test_a_failure_in_the_worker_a_skip_in_the_web_process(shop: Shop) -> None:
    """A sync task that fails in the worker is an error there, by exception class, with an ERROR span and an
    exception event but its message nowhere: not in spans, metrics or either console. A task skipped behind a
    failure in the web process is counted skipped there and never published. A task whose arguments the engine
    cannot serialize fails at add_task with the engine's own error, and is not counted."""
    web = shop.start_web()
    shop.start_worker()
    httpx.post(f"{web}/charges/7")
    httpx.post(f"{web}/backorders/8", headers={"connection": "close"})
    assert httpx.post(f"{web}/unserializable").status_code == 500
    charge = shop.engine.tasks + "charge"
    wait_until(lambda: value(shop.worker_metrics(), names.DURATION.count, task=charge, status="error") == 1)
    worker, web_side = shop.worker_metrics(), shop.web_metrics(web)
    assert value(worker, names.EXCEPTIONS.total, task=charge, exception="Declined") == 1
    receipt = shop.engine.tasks + "send_receipt"
    assert value(web_side, names.SKIPPED.total, task=receipt) == 1
    assert value(web_side, names.SCHEDULED.total, task=receipt) == 1  # the backorder's; not the unserializable one
    assert value(worker, names.WAIT.count, task=receipt) == 0  # never published
    assert shop.engine.rejects in "".join(process.output() for process in shop.processes)
    wait_until(lambda: shop.task_spans("charge"))
    (span,) = shop.task_spans("charge")
    assert span.status.code == span.status.STATUS_CODE_ERROR
    assert attributes(span)[names.ATTR_ERROR_TYPE] == "Declined"
    (event,) = span.events
    assert attributes(event)[names.ATTR_EXCEPTION_TYPE] == shop.engine.tasks + "Declined"
    console: dict[str, Any] = {}

    def failures() -> list[tuple[str, str]]:
        console.update(httpx.get(shop.worker_url + "/tasks/data.json").json())
        return [(run["task"], run["exception"]) for run in console["failures"]]

    wait_until(lambda: failures() == [(charge, "Declined")])  # a worker process writes them every second
    everything = (
        str(shop.collector.traces)
        + json.dumps(console)
        + httpx.get(shop.worker_url + "/metrics").text
        + httpx.get(f"{web}/metrics/").text
        + httpx.get(f"{web}/tasks/data.json").text
    )
    assert "4111-1111" not in everything
    assert "jane@example.com" not in everything


@integration
def test_a_direct_publish_is_traced_the_same_way(shop: Shop) -> None:
    """A task published with the engine's own call while serving a request (Celery's delay(), taskiq's kiq()) is
    counted as scheduled once the engine published it, and carries the request's trace and route to the worker."""
    web = shop.start_web()
    shop.start_worker()
    httpx.post(f"{web}/direct/3", headers={"traceparent": traceparent(3)})
    task = shop.engine.tasks + "send_receipt"
    wait_until(lambda: value(shop.worker_metrics(), names.DURATION.count, task=task, status="success") == 1)
    assert value(shop.web_metrics(web), names.SCHEDULED.total, task=task) == 1
    wait_until(lambda: shop.task_spans("send_receipt"))
    (span,) = shop.task_spans("send_receipt")
    assert span.trace_id.hex()[:-4] == TRACE_ID[:-4]
    assert attributes(span)[names.ATTR_ROUTE] == "/direct/{order_id}"


@integration
def test_the_spans_of_a_worker_process_that_ends_are_exported(shop: Shop) -> None:
    """A worker process that ends after each task (--max-tasks-per-child=1) ends with os._exit, without the SDK's
    export at exit: with a batch delay of a minute, only the export at the process's stop brings each run's span to
    the collector, one span per run."""
    web = shop.start_web()
    shop.start_worker("--max-tasks-per-child=1", OTEL_BSP_SCHEDULE_DELAY="60000")
    for order in range(3):  # one at a time: a process that stops drops the message it prefetched, until redelivery
        assert httpx.post(f"{web}/orders/{order}").status_code == 200
        wait_until(lambda: len(shop.task_spans("send_receipt")) == order + 1)  # noqa: B023
    assert len({span.span_id for span in shop.task_spans("send_receipt")}) == 3


@integration
def test_the_failures_of_a_worker_process_that_ends_stay_on_the_console(shop: Shop) -> None:
    """A worker process that fails a run and ends right after (--max-tasks-per-child=1), with os._exit: its failure
    reaches the worker's console and stays there once the process is gone, grouped by task and exception class."""
    web = shop.start_web()
    shop.start_worker("--max-tasks-per-child=1")
    httpx.post(f"{web}/charges/7")
    task = shop.engine.tasks + "charge"
    wait_until(lambda: ended(shop, task, names.STATUS_ERROR))

    def listed() -> list[tuple[str, str | None, int]]:
        try:
            data = httpx.get(shop.worker_url + "/tasks/data.json").json()
        except httpx.TransportError:
            return []
        return [(group["task"], group["exception"], group["count"]) for group in data["failures"]]

    wait_until(lambda: listed() == [(task, "Declined", 1)])
    time.sleep(3)  # the process ended by now, and a read of the folder has reaped it
    assert listed() == [(task, "Declined", 1)]


@integration
def test_the_counts_of_a_worker_process_that_ends_are_exported(shop: Shop) -> None:
    """With metrics through OpenTelemetry (opentelemetry-instrument, an OTLP exporter that pushes once a minute), a
    worker process that ends after each task (--max-tasks-per-child=1) exports its counts as it ends: the collector
    has the run's duration long before the exporter's minute."""
    instrument = str(BIN / "opentelemetry-instrument")
    environment = shop.environment(
        "shop-worker",
        TRACED_TASKS_METRICS="opentelemetry",
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_METRICS_EXPORTER="otlp",
        OTEL_LOGS_EXPORTER="none",
        OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
        OTEL_METRIC_EXPORT_INTERVAL="60000",
    )
    web = shop.start_web()
    worker = Process(
        [instrument, *shop.engine.worker, "--max-tasks-per-child=1"], shop.folder / "otel.log", **environment
    )
    shop.processes.append(worker)
    wait_until(lambda: "ready" in worker.output() or "Listening started" in worker.output(), 60)
    httpx.post(f"{web}/orders/1")
    task = shop.engine.tasks + "send_receipt"
    wait_until(lambda: exported_runs(shop.collector, task) == 1, 30)


def exported_runs(collector: Collector, task: str) -> int:
    """The runs of `task` in the run-time histograms the collector received."""
    found = 0
    for request in collector.metrics:
        for resource in request.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name != names.DURATION.instrument:
                        continue
                    for point in metric.histogram.data_points:
                        labels = {attribute.key: attribute.value.string_value for attribute in point.attributes}
                        if labels.get(names.LABEL_TASK) == task:
                            found = max(found, int(point.count))
    return found


@integration
def test_a_hung_task_is_flagged_on_the_workers_console(shop: Shop) -> None:
    """A run that goes on in a worker process: the worker's port serves it in the console's running list, from the
    process that runs it, flagged hung past TRACED_TASKS_HUNG_AFTER, and in /metrics as in progress since its
    start; asked with stacks=1, it says where the run waits, as the process that runs it wrote it. With Celery, the
    main process answers for its children."""
    web = shop.start_web()
    shop.start_worker()
    before = time.time()
    httpx.post(f"{web}/reports", params={"seconds": 60})
    task = shop.engine.tasks + "render_report"

    def hung() -> dict[str, Any] | None:
        data: dict[str, Any] = httpx.get(shop.worker_url + "/tasks/data.json").json()
        return data if data["running"] and data["running"][0]["hung"] else None

    wait_until(hung)
    data = hung()
    assert data is not None
    (run,) = data["running"]
    assert run["task"] == task
    assert shop.worker is not None
    if shop.engine.main_serves:
        assert run["pid"] != data["pid"] == shop.worker.pid
    assert row(data, task)["hung"] is True
    worker = shop.worker_metrics()
    assert value(worker, names.IN_PROGRESS.name, task=task) == 1
    since = value(worker, names.IN_PROGRESS_SINCE.name, task=task)
    assert since is not None
    assert before <= since <= time.time()

    def waits() -> list[str] | None:
        time.sleep(0.2)  # the process that runs it writes where it waits at its next write, within a second
        (listed,) = httpx.get(shop.worker_url + "/tasks/data.json?stacks=1").json()["running"]
        found: list[str] | None = listed["where"]
        return found

    wait_until(waits)
    where = waits()
    assert where is not None
    assert any(frame.endswith(" in render_report") for frame in where), where
    os.kill(run["pid"], signal.SIGKILL)  # a warm shutdown would wait for it


# Every way a run ends: one worker per engine, shared by these tests, each with a task of its own.


@pytest.fixture(scope="module", params=[CELERY, TASKIQ], ids=str)
def running(request: pytest.FixtureRequest, broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    """A web process and a worker that the scenario tests share; a taskiq worker process gives up on its runs a second
    into a graceful stop, and reads a Redis list: its redis-streams worker can hang on SIGTERM while it waits."""
    engine: Engine = request.param
    with Collector() as collector:
        # A Redis database of its own: the tests that start their own worker never share its queues.
        shop = Shop(
            engine, tmp_path_factory.mktemp(engine.name), database(broker, 1 if engine is CELERY else 2), collector
        )
        try:
            shop.web = shop.start_web(TASKIQ_BROKER_KIND="list")
            shop.start_worker(*(("--wait-tasks-timeout", "1") if engine is TASKIQ else ()), TASKIQ_BROKER_KIND="list")
            yield shop
        finally:
            shop.stop()


@dataclass(frozen=True)
class Ending:
    """A way a run ends: the scenario task that runs, what the test does to it, and the outcome it must get."""

    task: str
    end: Callable[[Shop, int, str], None]  # (shop, the pid that runs it, its task ID)
    status: str
    exception: str | None


def _wait(shop: Shop, pid: int, task_id: str) -> None:
    pass


def _revoke(shop: Shop, pid: int, task_id: str) -> None:
    from celery import Celery

    Celery(broker=shop.broker, set_as_current=False).control.revoke(task_id, terminate=True)


def _signal(number: int) -> Callable[[Shop, int, str], None]:
    def send(shop: Shop, pid: int, task_id: str) -> None:
        os.kill(pid, number)

    return send


ENDINGS: dict[str, dict[str, Ending | None]] = {
    "celery": {
        "time limit": Ending("overrun", _wait, names.STATUS_ERROR, "TimeLimitExceeded"),
        "revoke": Ending("revoked", _revoke, names.STATUS_ERROR, "Terminated"),
        "SIGTERM": Ending("terminated", _signal(signal.SIGTERM), names.STATUS_ERROR, "Terminated"),
        "SIGKILL": Ending("killed", _signal(signal.SIGKILL), names.STATUS_ERROR, names.LOST),
    },
    "taskiq": {
        "time limit": Ending("overrun", _wait, names.STATUS_ERROR, "TimeoutError"),
        "revoke": None,  # taskiq has no revoke
        # A worker process's graceful stop, which gives up on its runs after --wait-tasks-timeout.
        "SIGTERM": Ending("terminated", _signal(signal.SIGTERM), names.STATUS_CANCELLED, None),
        "SIGKILL": Ending("killed", _signal(signal.SIGKILL), names.STATUS_ERROR, names.LOST),
    },
}


def database(broker: str, number: int) -> str:
    """The URL of another database of the same redis-server."""
    return f"{broker.rsplit('/', 1)[0]}/{number}"


def start(shop: Shop, name: str) -> tuple[int, str, Path]:
    """Hand the scenario task `name` over, and wait for its run to start: the pid of the process that runs it, its
    task ID, and its marker file."""
    marker = shop.folder / f"{name}-{time.monotonic_ns()}"
    assert httpx.post(f"{shop.web}/run/{name}", params={"marker": str(marker)}).status_code == 200
    wait_until(lambda: marker.is_file() and marker.read_text().strip())
    pid, task_id = marker.read_text().split()[:2]
    return int(pid), task_id, marker


def counted(shop: Shop, task: str, key: str) -> float | None:
    """The worker's count of `task`'s runs under `key` (an outcome, started or in progress); None while its port moves
    to another of its processes (taskiq's first process to bind it serves it, and a process that stops gives it up)."""
    try:
        return outcomes(shop.worker_metrics(), task)[key]
    except httpx.TransportError:
        return None


def ended(shop: Shop, task: str, status: str) -> bool:
    return counted(shop, task, status) == 1


def outcomes(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], task: str) -> dict[str, float]:
    """A task's runs in a process, by outcome, with its starts and runs in progress."""
    counted = {status: value(found, names.DURATION.count, task=task, status=status) or 0.0 for status in STATUSES}
    counted["started"] = value(found, names.WAIT.count, task=task) or 0.0
    counted["in progress"] = value(found, names.IN_PROGRESS.name, task=task) or 0.0
    return counted


STATUSES = (names.STATUS_SUCCESS, names.STATUS_ERROR, names.STATUS_CANCELLED)


def assert_identity(shop: Shop, task: str, redelivered: int = 0) -> dict[str, float]:
    """started = success + error + cancelled + in progress, in the worker; and every schedule, in the web process and
    the worker, started, or skipped, or is still waiting, where a message delivered again is one more start. The
    worker's counts."""
    worker = outcomes(shop.worker_metrics(), task)
    assert worker["started"] == sum(worker[status] for status in STATUSES) + worker["in progress"], worker
    web, at_worker = shop.web_metrics(shop.web), shop.worker_metrics()
    scheduled = (value(web, names.SCHEDULED.total, task=task) or 0) + (
        value(at_worker, names.SCHEDULED.total, task=task) or 0
    )
    skipped = value(web, names.SKIPPED.total, task=task) or 0
    assert scheduled + redelivered >= worker["started"] + skipped, (scheduled, worker)
    return worker


@integration
@pytest.mark.parametrize("how", ["time limit", "revoke", "SIGTERM", "SIGKILL"])
def test_a_run_its_engine_ends_gets_one_true_outcome(running: Shop, how: str) -> None:
    """A run that its engine, or a signal, ends mid-task gets exactly one outcome, the one the engine reports: an
    error by Celery's TimeLimitExceeded or Terminated, or taskiq's TimeoutError; a taskiq worker process that stops
    gracefully gives up on it, cancelled; a process killed with SIGKILL (the OOM killer) leaves it to the next read of
    the metrics folder, an error, WorkerLostError. Never a success, nothing left in progress, the counts identity
    holds, and the worker's console lists the failure."""
    ending = ENDINGS[running.engine.name][how]
    if ending is None:
        pytest.skip(f"{running.engine.name} has no {how}")
    task = running.engine.tasks + ending.task
    pid, task_id, _ = start(running, ending.task)
    ending.end(running, pid, task_id)
    wait_until(lambda: ended(running, task, ending.status), 60)
    worker = assert_identity(running, task)
    assert (worker["started"], worker[names.STATUS_SUCCESS], worker["in progress"]) == (1, 0, 0), running.logs()
    found = running.worker_metrics()
    assert not value(found, names.LAST_SUCCESS.name, task=task)
    if ending.exception is not None:
        assert value(found, names.EXCEPTIONS.total, task=task, exception=ending.exception) == 1

    def listed() -> list[tuple[str, str | None, int]]:
        data = httpx.get(running.worker_url + "/tasks/data.json").json()
        return [
            (group["status"], group["exception"], group["count"]) for group in data["failures"] if group["task"] == task
        ]

    wait_until(lambda: listed() == [(ending.status, ending.exception, 1)])


@integration
def test_a_graceful_worker_stop(tmp_path: Path, broker: str, collector: Collector, engine: Engine) -> None:
    """A worker stopped gracefully (SIGTERM) with a run in progress: Celery's warm shutdown lets it end, a success;
    a taskiq worker gives up on it after --wait-tasks-timeout, and the run ends cancelled, its span exported with
    the cancelled status. Either way one outcome, nothing left in progress, read from the worker's folder once it
    stopped."""
    shop = Shop(engine, tmp_path, database(broker, 3), collector)  # a list, where other tests made a stream
    try:
        # taskiq's redis-streams worker can hang on SIGTERM while it waits for messages: a Redis list here.
        shop.web = shop.start_web(TASKIQ_BROKER_KIND="list")
        shop.start_worker(*(("--wait-tasks-timeout", "1") if engine is TASKIQ else ()), TASKIQ_BROKER_KIND="list")
        httpx.post(f"{shop.web}/reports", params={"seconds": 2})
        task = engine.tasks + "render_report"
        wait_until(lambda: counted(shop, task, "in progress") == 1)
        assert shop.worker is not None
        os.kill(shop.worker.pid, signal.SIGTERM)  # its main process, as a container's stop does
        shop.worker.process.wait(timeout=30)
        folder = merged(tmp_path / "worker-metrics")
        expected = names.STATUS_SUCCESS if engine is CELERY else names.STATUS_CANCELLED
        stopped = outcomes(folder, task)
        assert (stopped["started"], stopped[expected], stopped["in progress"]) == (1, 1, 0), shop.logs()
        if engine is TASKIQ:
            wait_until(lambda: shop.task_spans("render_report"))
            (span,) = shop.task_spans("render_report")
            assert attributes(span)[names.ATTR_STATUS] == names.STATUS_CANCELLED
    finally:
        shop.stop()


def merged(folder: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of a multiprocess folder, summed as prometheus_client's own collector sums them."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, str(folder))
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for metric in registry.collect()
        for sample in metric.samples
    }


@integration
def test_a_message_delivered_again_after_its_process_was_killed(
    tmp_path: Path, broker: str, collector: Collector, engine: Engine
) -> None:
    """The process running a task is killed (SIGKILL) and the engine delivers its message again (Celery's acks_late
    with reject_on_worker_lost; taskiq's redis streams, once the message was idle past idle_timeout): the first start
    is an error, WorkerLostError, the second a success. The web process scheduled it once; the worker started it
    twice: started = success + error, nothing in progress."""
    shop = Shop(engine, tmp_path, broker, collector)
    try:
        shop.web = shop.start_web()
        shop.start_worker(TASKIQ_IDLE_TIMEOUT="3000")
        pid, _, marker = start(shop, "reconcile")
        os.kill(pid, signal.SIGKILL)
        task = engine.tasks + "reconcile"
        if engine is TASKIQ:
            time.sleep(3.5)
            httpx.post(f"{shop.web}/orders/1")  # redis streams claim idle messages when the next one arrives
        wait_until(lambda: ended(shop, task, names.STATUS_SUCCESS), 60)
        assert len(marker.read_text().splitlines()) == 2, shop.logs()
        worker = assert_identity(shop, task, redelivered=1)
        assert (worker["started"], worker[names.STATUS_ERROR], worker["in progress"]) == (2, 1, 0)
        assert value(shop.worker_metrics(), names.EXCEPTIONS.total, task=task, exception=names.LOST) == 1
        assert value(shop.web_metrics(shop.web), names.SCHEDULED.total, task=task) == 1
    finally:
        shop.stop()


@pytest.fixture(params=[CELERY, TASKIQ], ids=str)
def engine(request: pytest.FixtureRequest) -> Engine:
    found: Engine = request.param
    return found


BAD_VALUES: list[object] = [
    123,
    1e300,
    -1,
    0,
    True,
    "nan",
    "inf",
    "-inf",
    "-1",
    "0",
    "-1e300",
    "1e300",
    "garbage",
    "x" * 20_000,
    [1, 2],
    {"a": 1},
]


def publish_plainly(shop: Shop, task: str, metadata: list[dict[str, object]]) -> None:
    """Publish one message of `task` per metadata, from a process without traced_tasks: a plain Celery app, or a
    plain taskiq broker with no middleware, as any producer could."""
    if shop.engine is CELERY:
        from celery import Celery

        producer = Celery(broker=shop.broker, set_as_current=False)
        for headers in metadata:
            producer.send_task(task, args=[1], headers=headers)
        return
    from taskiq.kicker import AsyncKicker
    from taskiq_redis import ListQueueBroker

    async def kick() -> None:
        broker = ListQueueBroker(shop.broker, socket_timeout=None)
        await broker.startup()
        for labels in metadata:
            kicker: Any = AsyncKicker(task, broker, dict(labels))
            await kicker.kiq(1)
        await broker.shutdown()

    asyncio.run(kick())


@integration
def test_a_malformed_header_is_ignored_as_a_missing_one_and_the_run_counted(running: Shop) -> None:
    """Messages from a producer without traced_tasks, or a hostile one, whose carried trace context, time of
    scheduling or route is of the wrong type, huge, nan, inf, negative, ancient or garbage: each run is counted and
    ends, in a span of its own trace, its wait unknown and so 0 (never 57 years, nor anything that wrecks the sum),
    and the worker goes on counting the messages after them."""
    keys = ["traceparent", "tracestate", "baggage", "traced_tasks_scheduled_at", "traced_tasks_route"]
    metadata = [{key: bad} for key in keys for bad in BAD_VALUES]
    name = "tests.apps.celery_shop.send_receipt" if running.engine is CELERY else "tests.apps.taskiq_shop:send_receipt"
    task = running.engine.tasks + "send_receipt"
    before = counted(running, task, names.STATUS_SUCCESS) or 0
    waited = value(running.worker_metrics(), names.WAIT.sum, task=task) or 0
    publish_plainly(running, name, metadata)
    wait_until(lambda: counted(running, task, names.STATUS_SUCCESS) == before + len(metadata), 60)
    found = running.worker_metrics()
    assert value(found, names.IN_PROGRESS.name, task=task) == 0
    assert (value(found, names.WAIT.sum, task=task) or 0) - waited < 60  # no ancient time of scheduling believed
    assert outcomes(found, task)[names.STATUS_ERROR] == 0
    httpx.post(f"{running.web}/orders/1")  # and the next message, from the web process, is counted as ever
    wait_until(lambda: counted(running, task, names.STATUS_SUCCESS) == before + len(metadata) + 1)


# Eager and in-memory: Celery's task_always_eager and taskiq's InMemoryBroker, in this process, as people test.


@dataclass
class InMemory:
    """An engine run in this process: a task that sends a receipt, one that publishes it directly, and how to wait
    for what the engine still runs."""

    name: str
    send: Any
    outer: Any
    publish: Callable[[Any], Awaitable[None]]  # a direct publish of a task, with argument 7
    settle: Callable[[], Awaitable[None]]


def eager_celery() -> InMemory:
    from celery import Celery

    import traced_tasks.celery

    app = Celery("eager", broker="memory://", set_as_current=False)
    app.conf.task_always_eager = True
    traced_tasks.celery.instrument(app)

    @app.task(name="eager.send", shared=False)  # not in every later application of the process
    def send(order: int) -> None:
        pass

    @app.task(name="eager.outer", shared=False)
    def outer(order: int) -> None:
        send.delay(order)

    async def publish(task: Any) -> None:
        task.delay(7)

    async def settle() -> None:
        pass

    return InMemory("celery", send, outer, publish, settle)


def in_memory_taskiq(await_inplace: bool = False) -> InMemory:
    from taskiq import InMemoryBroker

    import traced_tasks.taskiq

    broker = InMemoryBroker(await_inplace=await_inplace).with_middlewares(traced_tasks.taskiq.Middleware())

    @broker.task(task_name="memory:send")
    async def send(order: int) -> None:
        pass

    @broker.task(task_name="memory:outer")
    async def outer(order: int) -> None:
        await send.kiq(order)

    async def publish(task: Any) -> None:
        await task.kiq(7)

    async def settle() -> None:
        await broker.wait_all()

    return InMemory("taskiq", send, outer, publish, settle)


@pytest.fixture(params=["celery eager", "taskiq in memory", "taskiq in place"])
def in_memory(request: pytest.FixtureRequest) -> InMemory:
    if request.param == "celery eager":
        return eager_celery()
    return in_memory_taskiq(await_inplace=request.param == "taskiq in place")


def spans_of(telemetry: Telemetry, func: Any) -> list[Any]:
    name = names.SPAN_NAME_PREFIX + label_of(func)
    return [span for span in telemetry.spans() if span.name == name]


def label_of(func: Any) -> str:
    from traced_tasks import _config

    return _config.current().profiles.get(func, None).task


def test_a_direct_publish_in_memory_is_a_child_of_the_current_span(telemetry: Telemetry, in_memory: InMemory) -> None:
    """In eager mode and with an in-memory broker, a direct publish (delay(), kiq()) runs its task in a CONSUMER span
    that is a child of the span current at the publish, and is counted as scheduled once and run once."""
    tracer = telemetry.provider.get_tracer("test")

    async def main() -> None:
        with tracer.start_as_current_span("POST /orders"):
            await in_memory.publish(in_memory.send)
        await in_memory.settle()

    asyncio.run(main())
    task = label_of(in_memory.send)
    assert telemetry.value(names.SCHEDULED.total, task=task) == 1
    assert telemetry.value(names.DURATION.count, task=task, status="success") == 1
    (request,) = [span for span in telemetry.spans() if span.name == "POST /orders"]
    (run,) = spans_of(telemetry, in_memory.send)
    assert run.parent is not None
    assert run.parent.span_id == request.context.span_id


def test_what_a_handed_over_task_publishes_is_counted_in_its_trace(telemetry: Telemetry, in_memory: InMemory) -> None:
    """A task handed over from a batch that publishes another one itself, in eager mode and with an in-memory broker
    (run later, or in place): the other is counted as scheduled, once, and runs in a span that is a child of the
    first one's run, in the request's trace; both end, and nothing is left in progress."""
    tracer = telemetry.provider.get_tracer("test")

    async def main() -> None:
        with tracer.start_as_current_span("POST /orders"):
            tasks = BackgroundTasks()
            tasks.add_task(in_memory.outer, 7)
        await tasks()
        await in_memory.settle()

    asyncio.run(main())
    outer, send = label_of(in_memory.outer), label_of(in_memory.send)
    for task in (outer, send):
        assert telemetry.value(names.SCHEDULED.total, task=task) == 1, task
        assert telemetry.value(names.DURATION.count, task=task, status="success") == 1, task
        assert telemetry.value(names.IN_PROGRESS.name, task=task) == 0, task
    (request,) = [span for span in telemetry.spans() if span.name == "POST /orders"]
    (outer_run,) = spans_of(telemetry, in_memory.outer)
    (send_run,) = spans_of(telemetry, in_memory.send)
    assert outer_run.parent is not None
    assert outer_run.parent.span_id == request.context.span_id
    assert send_run.parent is not None
    assert send_run.parent.span_id == outer_run.context.span_id
    assert send_run.context.trace_id == request.context.trace_id


@integration
def test_a_retry_is_an_error_and_a_new_run_scheduled_by_the_worker(running: Shop) -> None:
    """A task that fails once and is retried (Celery's autoretry_for with a countdown of a second, taskiq's
    SimpleRetryMiddleware): the first run is an error by the exception that made it retry, the worker counts the
    retry as scheduled and its run as a success, so that scheduled in both processes (1 + 1) adds up to the runs; a
    countdown is no wait; the retry's span is a child of the run that retried, in its trace, with the route of the
    first."""
    httpx.post(f"{running.web}/partners/5")
    task = running.engine.tasks + "notify_partner"
    wait_until(lambda: ended(running, task, names.STATUS_SUCCESS))
    worker = running.worker_metrics()
    assert value(worker, names.DURATION.count, task=task, status="error") == 1
    assert value(worker, names.EXCEPTIONS.total, task=task, exception="ConnectionError") == 1
    assert value(worker, names.SCHEDULED.total, task=task) == 1
    assert value(running.web_metrics(running.web), names.SCHEDULED.total, task=task) == 1
    assert value(worker, names.WAIT.bucket, task=task, le="1.0") == 2
    wait_until(lambda: len(running.task_spans("notify_partner")) == 2)
    first, second = sorted(running.task_spans("notify_partner"), key=lambda span: span.start_time_unix_nano)
    assert second.parent_span_id == first.span_id
    assert second.trace_id == first.trace_id
    assert attributes(second)[names.ATTR_ROUTE] == "/partners/{order_id}"


def test_a_time_of_scheduling_is_believed_within_bounds() -> None:
    """A carried time of scheduling is believed from 30 days before the run's start (a queue with no consumer for
    weeks is still a wait) to 5 minutes after it (the hosts' clocks disagree, and the wait is then 0); anything else
    (0, milliseconds for seconds, nan, inf, text, another type) is unknown, as a missing one."""
    from traced_tasks import _wire

    now = 1_800_000_000.0
    assert _wire.scheduled_at(repr(now - 29 * 86_400), now) == now - 29 * 86_400
    assert _wire.scheduled_at(now - 2.5, now) == now - 2.5
    assert _wire.scheduled_at(repr(now + 60), now) == now  # a clock ahead: no wait, not a negative one
    for unbelievable in (0, "0", now - 31 * 86_400, now + 600, now * 1000, "nan", "inf", "-inf", "1e309", "x", None):
        assert _wire.scheduled_at(unbelievable, now) is None, unbelievable
    assert _wire.scheduled_at(True, now) is None
    assert _wire.scheduled_at([now], now) is None
