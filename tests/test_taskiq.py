"""Tasks handed over to taskiq. The proof: a real redis-server (redis streams), a real uvicorn web process, a real
`taskiq worker` with two worker processes, spans over OTLP/HTTP to a receiver, and metrics scraped from both
processes. Beside it, unit tests with taskiq's InMemoryBroker, which run at the declared lower bounds."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.trace import SpanKind

from tests.conftest import Telemetry
from tests.engines import BIN, TRACE_ID, Engine, Shop, row, shape, spans_named, traceparent, value
from tests.support import Collector, attributes, redis_server, wait_until
from traced_tasks import BackgroundTasks
from traced_tasks import _conventions as names

TASKS = "tests.apps.taskiq_shop."

TASKIQ = Engine(
    web="tests.apps.taskiq_web:app",
    worker=[str(BIN / "taskiq"), "worker", "tests.apps.taskiq_shop:broker", "--workers", "2"],
    broker_variable="TASKIQ_BROKER",
    # taskiq's redis streams worker does not stop on SIGTERM under Python 3.11 while it waits for messages (a
    # CPython bug it meets): the tests kill it, once they have read what they check.
    grace=0.5,
)


@pytest.fixture
def shop(tmp_path: Path, broker: str, collector: Collector) -> Iterator[Shop]:
    started = Shop(TASKIQ, tmp_path, broker, collector)
    try:
        yield started
    finally:
        started.stop()


def task_spans(spans: list[Span], task: str) -> list[Span]:
    return spans_named(spans, TASKS + task)


@pytest.mark.integration
def test_a_task_runs_on_the_worker_in_the_trace_that_scheduled_it(shop: Shop) -> None:
    """Three orders kicked while no worker runs, the workers started two seconds later: each run is a CONSUMER span
    of a worker process, named and attributed as in process (its module.qualname, not taskiq's names), a child of
    the request's server span in its trace, with its route; its wait, measured across the broker, is over a second;
    the web process counts three scheduled and makes no span of that name; the workers count three starts and three
    successes; and both expose the same families, label keys and buckets. The web process's console marks the task
    as run by the engine, with no count of runs not started; the workers' console counts their runs."""
    web = shop.start_web()
    for order in range(3):
        assert httpx.post(f"{web}/orders/{order}", headers={"traceparent": traceparent(order)}).status_code == 200
    time.sleep(2)
    shop.start_worker()
    task = TASKS + "send_receipt"
    wait_until(lambda: value(shop.worker_metrics(), names.DURATION.count, task=task, status="success") == 3)
    wait_until(lambda: len(task_spans(shop.collector.spans_of("shop-worker"), "send_receipt")) == 3)
    servers = {
        span.trace_id: span for span in shop.collector.spans_of("shop-web") if span.kind == Span.SPAN_KIND_SERVER
    }
    for span in task_spans(shop.collector.spans_of("shop-worker"), "send_receipt"):
        assert span.kind == Span.SPAN_KIND_CONSUMER
        assert span.trace_id.hex()[:-4] == TRACE_ID[:-4]
        assert span.parent_span_id == servers[span.trace_id].span_id
        found = attributes(span)
        assert found[names.ATTR_ROUTE] == "/orders/{order_id}"
        assert found[names.ATTR_FUNCTION] == task
    assert task_spans(shop.collector.spans_of("shop-web"), "send_receipt") == []
    worker, web_side = shop.worker_metrics(), shop.web_metrics(web)
    assert value(web_side, names.SCHEDULED.total, task=task) == 3
    assert value(worker, names.SCHEDULED.total, task=task) == 0  # declared at the workers' start
    assert value(worker, names.WAIT.count, task=task) == 3
    assert value(worker, names.WAIT.bucket, task=task, le="1.0") == 0  # every wait over a second
    assert value(worker, names.IN_PROGRESS.name, task=task) == 0
    assert shape(worker, task) == shape(web_side, task)
    web_row = row(httpx.get(f"{web}/tasks/data.json").json(), task)
    worker_row = row(httpx.get(shop.worker_url + "/tasks/data.json").json(), task)
    assert (web_row["runs_on"], web_row["not_started"]) == ("taskiq", None)  # not "3 not started"
    assert (worker_row["runs_on"], worker_row["finished"], worker_row["not_started"]) == (None, 3, 0)


@pytest.mark.integration
def test_a_failure_in_the_worker_a_skip_in_the_web_process(shop: Shop) -> None:
    """A sync task that fails in a worker is an error there, by exception class, with an ERROR span and an exception
    event but its message nowhere: not in spans, metrics or either console. A task skipped behind a failure in the
    web process is counted skipped there and never kicked. A task whose arguments taskiq cannot serialize fails at
    add_task with taskiq's own error, and is not counted."""
    web = shop.start_web()
    shop.start_worker()
    httpx.post(f"{web}/charges/7")
    httpx.post(f"{web}/backorders/8", headers={"connection": "close"})
    assert httpx.post(f"{web}/unserializable").status_code == 500
    charge = TASKS + "charge"
    wait_until(lambda: value(shop.worker_metrics(), names.DURATION.count, task=charge, status="error") == 1)
    worker, web_side = shop.worker_metrics(), shop.web_metrics(web)
    assert value(worker, names.EXCEPTIONS.total, task=charge, exception="Declined") == 1
    receipt = TASKS + "send_receipt"
    assert value(web_side, names.SKIPPED.total, task=receipt) == 1
    assert value(web_side, names.SCHEDULED.total, task=receipt) == 1  # the backorder's; not the unserializable one
    assert value(worker, names.WAIT.count, task=receipt) == 0  # never kicked
    assert "SendTaskError" in "".join(process.output() for process in shop.processes)
    wait_until(lambda: task_spans(shop.collector.spans_of("shop-worker"), "charge"))
    (span,) = task_spans(shop.collector.spans_of("shop-worker"), "charge")
    assert span.status.code == span.status.STATUS_CODE_ERROR
    assert attributes(span)[names.ATTR_ERROR_TYPE] == "Declined"
    console: dict[str, Any] = {}

    def failures() -> list[tuple[str, str]]:
        console.update(httpx.get(shop.worker_url + "/tasks/data.json").json())
        return [(run["task"], run["exception"]) for run in console["failures"]]

    wait_until(lambda: failures() == [(charge, "Declined")])
    everything = (
        str(shop.collector.traces)
        + json.dumps(console)
        + httpx.get(shop.worker_url + "/metrics").text
        + httpx.get(f"{web}/metrics/").text
        + httpx.get(f"{web}/tasks/data.json").text
    )
    assert "4111" not in everything
    assert "jane@example.com" not in everything


@pytest.mark.integration
def test_a_kick_to_a_broker_that_is_down_fails_in_the_web_process(shop: Shop) -> None:
    """With the broker down, the hand-off is a run of the web process that failed with taskiq's exception class: a
    PRODUCER span `publish <task>` with ERROR status, an error, started and scheduled, on the console."""
    with redis_server(shop.folder / "redis") as doomed:
        web = shop.start_web(TASKIQ_BROKER=doomed)  # the web process starts its broker with it up
    httpx.post(f"{web}/orders/1")
    task = TASKS + "send_receipt"
    wait_until(lambda: value(shop.web_metrics(web), names.DURATION.count, task=task, status="error") == 1)
    found = shop.web_metrics(web)
    assert value(found, names.EXCEPTIONS.total, task=task, exception="SendTaskError") == 1
    assert value(found, names.SCHEDULED.total, task=task) == 1
    assert value(found, names.WAIT.count, task=task) == 1
    wait_until(lambda: [span for span in shop.collector.spans_of("shop-web") if span.name == "publish " + task])
    (span,) = [span for span in shop.collector.spans_of("shop-web") if span.name == "publish " + task]
    assert span.kind == Span.SPAN_KIND_PRODUCER
    assert attributes(span)[names.ATTR_ERROR_TYPE] == "SendTaskError"
    failures = httpx.get(f"{web}/tasks/data.json").json()["failures"]
    assert [(run["task"], run["exception"]) for run in failures] == [(task, "SendTaskError")]


@pytest.mark.integration
def test_a_direct_kiq_is_traced_the_same_way(shop: Shop) -> None:
    """send_receipt.kiq() awaited while serving a request is counted as scheduled when taskiq sent it, and carries
    the request's trace and route to the worker."""
    web = shop.start_web()
    shop.start_worker()
    httpx.post(f"{web}/direct/3", headers={"traceparent": traceparent(3)})
    task = TASKS + "send_receipt"
    wait_until(lambda: value(shop.worker_metrics(), names.DURATION.count, task=task, status="success") == 1)
    assert value(shop.web_metrics(web), names.SCHEDULED.total, task=task) == 1
    wait_until(lambda: task_spans(shop.collector.spans_of("shop-worker"), "send_receipt"))
    (span,) = task_spans(shop.collector.spans_of("shop-worker"), "send_receipt")
    assert span.trace_id.hex()[:-4] == TRACE_ID[:-4]
    assert attributes(span)[names.ATTR_ROUTE] == "/direct/{order_id}"


@pytest.mark.integration
def test_a_retry_is_a_new_run_scheduled_by_the_worker(shop: Shop) -> None:
    """A task that fails once and is retried by taskiq's SimpleRetryMiddleware: the first run is an error, the
    worker counts the retry as scheduled and its run as a success, so that scheduled in both processes (1 + 1) adds
    up to the runs; the retry's span is a child of the run that retried, with the route of the first."""
    web = shop.start_web()
    shop.start_worker()
    httpx.post(f"{web}/partners/5")
    task = TASKS + "notify_partner"
    wait_until(lambda: value(shop.worker_metrics(), names.DURATION.count, task=task, status="success") == 1)
    worker = shop.worker_metrics()
    assert value(worker, names.DURATION.count, task=task, status="error") == 1
    assert value(worker, names.EXCEPTIONS.total, task=task, exception="ConnectionError") == 1
    assert value(worker, names.SCHEDULED.total, task=task) == 1
    assert value(shop.web_metrics(web), names.SCHEDULED.total, task=task) == 1
    wait_until(lambda: len(task_spans(shop.collector.spans_of("shop-worker"), "notify_partner")) == 2)
    first, second = sorted(
        task_spans(shop.collector.spans_of("shop-worker"), "notify_partner"), key=lambda span: span.start_time_unix_nano
    )
    assert second.parent_span_id == first.span_id
    assert attributes(second)[names.ATTR_ROUTE] == "/partners/{order_id}"


@pytest.mark.integration
def test_a_run_whose_worker_process_was_killed_is_delivered_again(shop: Shop) -> None:
    """With redis streams, the worker process running the task is SIGKILLed; once the message has been idle past
    idle_timeout, another worker process claims it and runs it to success. The web process scheduled it once; the
    workers started it twice and count one success, and nothing is left in progress."""
    web = shop.start_web()
    shop.start_worker(TASKIQ_IDLE_TIMEOUT="3000")
    marker = shop.folder / "reconcile-starts"
    httpx.post(f"{web}/reconcile", params={"marker": str(marker)})
    wait_until(lambda: marker.is_file() and marker.read_text().strip())
    os.kill(int(marker.read_text().split()[0]), signal.SIGKILL)
    time.sleep(3.5)
    httpx.post(f"{web}/orders/1")  # redis streams claim idle messages when the next one arrives
    task = TASKS + "reconcile"
    wait_until(lambda: value(shop.worker_metrics(), names.DURATION.count, task=task, status="success") == 1, 60)
    assert len(marker.read_text().split()) == 2, shop.logs()
    worker = shop.worker_metrics()
    assert value(worker, names.WAIT.count, task=task) == 2
    assert value(worker, names.IN_PROGRESS.name, task=task) == 0
    assert value(shop.web_metrics(web), names.SCHEDULED.total, task=task) == 1


@pytest.mark.integration
def test_a_hung_task_is_flagged_on_the_workers_console(shop: Shop) -> None:
    """A run that goes on in a worker process: the port the workers serve lists it in the console from whichever
    process answers, flagged hung past TRACED_TASKS_HUNG_AFTER, and /metrics has it in progress since its start."""
    web = shop.start_web()
    shop.start_worker()
    before = time.time()
    httpx.post(f"{web}/reports", params={"seconds": 60})
    task = TASKS + "render_report"

    def hung() -> dict[str, Any] | None:
        data: dict[str, Any] = httpx.get(shop.worker_url + "/tasks/data.json").json()
        return data if data["running"] and data["running"][0]["hung"] else None

    wait_until(hung)
    data = hung()
    assert data is not None
    (run,) = data["running"]
    assert run["task"] == task
    assert [row["hung"] for row in data["tasks"] if row["task"] == task] == [True]
    worker = shop.worker_metrics()
    assert value(worker, names.IN_PROGRESS.name, task=task) == 1
    since = value(worker, names.IN_PROGRESS_SINCE.name, task=task)
    assert since is not None
    assert before <= since <= time.time()


# Unit tests: taskiq's InMemoryBroker, which runs its own receiver in this process.


@pytest.fixture
def memory_broker() -> Iterator[Any]:
    from taskiq import InMemoryBroker

    import traced_tasks.taskiq

    broker = InMemoryBroker().with_middlewares(traced_tasks.taskiq.Middleware())

    @broker.task(task_name="unit:receipts")
    async def send_receipt(order_id: int) -> str:
        return format(trace.get_current_span().get_span_context().trace_id, "032x")

    broker.send_receipt = send_receipt  # type: ignore[attr-defined]
    asyncio.run(broker.startup())
    yield broker
    asyncio.run(broker.shutdown())


def test_a_taskiq_task_is_labelled_by_its_function(telemetry: Telemetry, memory_broker: Any) -> None:
    """A taskiq task counts under its function's module.qualname: not taskiq's task name, nor the name taskiq gives
    the function it wraps (`<name>__taskiq_original`)."""
    from traced_tasks import _config

    profile = _config.current().profiles.get(memory_broker.send_receipt, None)
    assert profile.name == f"{__name__}.memory_broker.<locals>.send_receipt"


def test_arguments_taskiq_cannot_serialize_fail_at_add_task(telemetry: Telemetry, memory_broker: Any) -> None:
    """add_task with arguments taskiq cannot serialize raises taskiq's own SendTaskError at once."""
    from taskiq.exceptions import SendTaskError

    tasks = BackgroundTasks()
    with pytest.raises(SendTaskError):
        tasks.add_task(memory_broker.send_receipt, object())
    assert tasks.tasks == []


def test_a_handed_over_task_runs_in_the_worker_under_its_scheduling_span(
    telemetry: Telemetry, memory_broker: Any
) -> None:
    """A taskiq task added to a batch is kicked when the batch runs, not called: the receiver runs it in a CONSUMER
    span of its name, a child of the span current at add_task, and it is counted scheduled once and run once."""
    tracer = telemetry.provider.get_tracer("test")

    name = f"{__name__}.memory_broker.<locals>.send_receipt"

    async def main() -> None:
        with tracer.start_as_current_span("POST /orders"):
            tasks = BackgroundTasks()
            tasks.add_task(memory_broker.send_receipt, 7)
        await tasks()
        for _ in range(1000):  # the in-memory broker runs it in a task of this loop
            if telemetry.value(names.DURATION.count, task=name, status="success"):
                break
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert telemetry.value(names.DURATION.count, task=name, status="success") == 1
    assert telemetry.value(names.SCHEDULED.total, task=name) == 1
    (request,) = [span for span in telemetry.spans() if span.name == "POST /orders"]
    (run,) = telemetry.task_spans()
    assert run.kind is SpanKind.CONSUMER
    assert run.parent is not None
    assert run.parent.span_id == request.context.span_id
