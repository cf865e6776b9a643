"""Tasks handed over to Celery. The proof: a real redis-server, a real uvicorn web process, a real
`celery worker -P prefork -c 2`, spans over OTLP/HTTP to a receiver, and metrics scraped from both processes. Beside
it, unit tests with Celery's in-memory transport and a worker in a thread, which run at the declared lower bounds."""

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
from tests.support import (
    Collector,
    attributes,
    free_port,
    wait_until,
)
from traced_tasks import BackgroundTasks
from traced_tasks import _conventions as names

TASKS = "tests.apps.celery_shop."


CELERY = Engine(
    web="tests.apps.celery_web:app",
    worker=[
        *(str(BIN / "celery"), "-A", "tests.apps.celery_shop", "worker", "-P", "prefork", "-c", "2"),
        *("--loglevel=INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"),
    ],
    broker_variable="CELERY_BROKER",
    grace=15,
)


@pytest.fixture
def shop(tmp_path: Path, broker: str, collector: Collector) -> Iterator[Shop]:
    started = Shop(CELERY, tmp_path, broker, collector)
    try:
        yield started
    finally:
        started.stop()


def task_spans(spans: list[Span], task: str) -> list[Span]:
    return spans_named(spans, TASKS + task)


@pytest.mark.integration
def test_a_task_runs_on_the_worker_in_the_trace_that_scheduled_it(shop: Shop) -> None:
    """Three orders scheduled while no worker runs, the worker started two seconds later: each run is a CONSUMER
    span of the worker, named and attributed as in process, a child of the request's server span in its trace,
    with its route; its wait, measured across the broker, is over a second; the web process counts three scheduled
    and makes no span of that name; the worker counts three starts and three successes; and both expose the same
    families, label keys and buckets. The web process's console marks the task as run by the engine, with no count of
    runs not started; the worker's console counts its runs."""
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
        assert found[names.ATTR_FILE].endswith("tests/apps/celery_shop.py")
    assert task_spans(shop.collector.spans_of("shop-web"), "send_receipt") == []
    worker, web_side = shop.worker_metrics(), shop.web_metrics(web)
    assert value(web_side, names.SCHEDULED.total, task=task) == 3
    assert value(worker, names.SCHEDULED.total, task=task) == 0  # declared at the worker's start
    assert value(worker, names.WAIT.count, task=task) == 3
    assert value(worker, names.WAIT.bucket, task=task, le="1.0") == 0  # every wait over a second
    assert value(worker, names.IN_PROGRESS.name, task=task) == 0
    assert shape(worker, task) == shape(web_side, task)
    web_row = row(httpx.get(f"{web}/tasks/data.json").json(), task)
    worker_row = row(httpx.get(shop.worker_url + "/tasks/data.json").json(), task)
    assert (web_row["runs_on"], web_row["not_started"]) == ("celery", None)  # not "3 not started"
    assert (worker_row["runs_on"], worker_row["finished"], worker_row["not_started"]) == (None, 3, 0)


@pytest.mark.integration
def test_a_failure_in_the_worker_a_skip_in_the_web_process(shop: Shop) -> None:
    """A task that fails in the worker is an error there, by exception class, with an ERROR span and an exception
    event but its message nowhere: not in spans, metrics or either console. A task skipped behind a failure in the
    web process is counted skipped there and never published. A task whose arguments Celery cannot serialize fails
    at add_task with Celery's own error, and is not counted."""
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
    assert value(worker, names.WAIT.count, task=receipt) == 0  # never published
    assert "EncodeError" in "".join(process.output() for process in shop.processes)
    wait_until(lambda: task_spans(shop.collector.spans_of("shop-worker"), "charge"))
    (span,) = task_spans(shop.collector.spans_of("shop-worker"), "charge")
    assert span.status.code == span.status.STATUS_CODE_ERROR
    assert attributes(span)[names.ATTR_ERROR_TYPE] == "Declined"
    (event,) = span.events
    assert attributes(event)[names.ATTR_EXCEPTION_TYPE] == "tests.apps.celery_shop.Declined"
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
    assert "4111" not in everything
    assert "jane@example.com" not in everything


@pytest.mark.integration
def test_a_publish_to_a_broker_that_is_down_fails_in_the_web_process(shop: Shop) -> None:
    """With the broker down, the hand-off is a run of the web process that failed with Celery's exception class: a
    PRODUCER span `publish <task>` with ERROR status, an error, started and scheduled, on the console; and no span of
    the task's name."""
    web = shop.start_web(CELERY_BROKER=f"redis://127.0.0.1:{free_port()}/0")
    httpx.post(f"{web}/orders/1")
    task = TASKS + "send_receipt"
    wait_until(lambda: value(shop.web_metrics(web), names.DURATION.count, task=task, status="error") == 1)
    found = shop.web_metrics(web)
    assert value(found, names.EXCEPTIONS.total, task=task, exception="OperationalError") == 1
    assert value(found, names.SCHEDULED.total, task=task) == 1
    assert value(found, names.WAIT.count, task=task) == 1
    wait_until(lambda: shop.collector.spans_of("shop-web"))
    wait_until(lambda: [s for s in shop.collector.spans_of("shop-web") if s.name == "publish " + task])
    (span,) = [span for span in shop.collector.spans_of("shop-web") if span.name == "publish " + task]
    assert span.kind == Span.SPAN_KIND_PRODUCER
    assert attributes(span)[names.ATTR_ERROR_TYPE] == "OperationalError"
    assert task_spans(shop.collector.spans_of("shop-web"), "send_receipt") == []
    failures = httpx.get(f"{web}/tasks/data.json").json()["failures"]
    assert [(run["task"], run["exception"]) for run in failures] == [(task, "OperationalError")]


@pytest.mark.integration
def test_a_direct_delay_is_traced_the_same_way(shop: Shop) -> None:
    """send_receipt.delay() called while serving a request is counted as scheduled when Celery published it, and
    carries the request's trace and route to the worker."""
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
    """A task that fails once and retries (autoretry_for, countdown 1 s): the first run is an error by the
    exception that made it retry, the worker counts the retry as scheduled and its run as a success, so that
    scheduled in both processes (1 + 1) adds up to the runs (an error and a success). The retry's wait starts at its
    countdown's end, and its span is a child of the run that retried."""
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
    assert value(worker, names.WAIT.bucket, task=task, le="1.0") == 2  # the retry's countdown is no wait
    wait_until(lambda: len(task_spans(shop.collector.spans_of("shop-worker"), "notify_partner")) == 2)
    first, second = sorted(
        task_spans(shop.collector.spans_of("shop-worker"), "notify_partner"), key=lambda span: span.start_time_unix_nano
    )
    assert second.parent_span_id == first.span_id
    assert second.trace_id == first.trace_id


@pytest.mark.integration
def test_a_run_whose_worker_process_was_killed_is_delivered_again(shop: Shop) -> None:
    """acks_late with reject_on_worker_lost: the worker process running the task is SIGKILLed; Celery delivers the
    message again and it runs to success. The web process scheduled it once; the worker started it twice and counts
    one success, and nothing is left in progress."""
    web = shop.start_web()
    shop.start_worker()
    marker = shop.folder / "reconcile-starts"
    httpx.post(f"{web}/reconcile", params={"marker": str(marker)})
    wait_until(lambda: marker.is_file() and marker.read_text().strip())
    os.kill(int(marker.read_text().split()[0]), signal.SIGKILL)
    task = TASKS + "reconcile"
    wait_until(lambda: value(shop.worker_metrics(), names.DURATION.count, task=task, status="success") == 1, 60)
    assert len(marker.read_text().split()) == 2, shop.logs()
    worker = shop.worker_metrics()
    assert value(worker, names.WAIT.count, task=task) == 2
    assert value(worker, names.IN_PROGRESS.name, task=task) == 0
    assert value(shop.web_metrics(web), names.SCHEDULED.total, task=task) == 1


@pytest.mark.integration
def test_a_hung_task_is_flagged_on_the_workers_console(shop: Shop) -> None:
    """A run that goes on in a worker process: the worker's own port serves it in the console's running list, from
    the process that runs it (not the main one that answers), flagged hung past TRACED_TASKS_HUNG_AFTER, and in
    /metrics as in progress since its start."""
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
    assert run["pid"] != data["pid"]
    assert shop.worker is not None
    assert data["pid"] == shop.worker.pid
    assert [row["hung"] for row in data["tasks"] if row["task"] == task] == [True]
    worker = shop.worker_metrics()
    assert value(worker, names.IN_PROGRESS.name, task=task) == 1
    since = value(worker, names.IN_PROGRESS_SINCE.name, task=task)
    assert since is not None
    assert before <= since <= time.time()
    os.kill(run["pid"], signal.SIGKILL)  # the warm shutdown would wait for it


@pytest.mark.integration
def test_zero_code_hands_over_the_tasks_of_fastapis_and_starlettes_own_classes(shop: Shop) -> None:
    """Under opentelemetry-instrument, an app that imports nothing of traced_tasks hands Celery tasks passed to
    FastAPI's injected BackgroundTasks and to Starlette's BackgroundTask over to the worker, counted and traced."""
    zero_code = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
    }
    instrument = (str(BIN / "opentelemetry-instrument"),)
    web = shop.start_web("tests.apps.celery_plain:app", command=instrument, **zero_code)
    shop.start_worker()
    httpx.post(f"{web}/orders/1")
    httpx.post(f"{web}/receipts/2")
    task = TASKS + "send_receipt"
    wait_until(lambda: value(shop.worker_metrics(), names.DURATION.count, task=task, status="success") == 2)
    assert value(shop.web_metrics(web), names.SCHEDULED.total, task=task) == 2
    routes = {"/orders/{order_id}", "/receipts/{order_id}"}
    wait_until(lambda: len(task_spans(shop.collector.spans_of("shop-worker"), "send_receipt")) == 2)
    spans = task_spans(shop.collector.spans_of("shop-worker"), "send_receipt")
    assert {attributes(span)[names.ATTR_ROUTE] for span in spans} == routes


# Unit tests: Celery's in-memory transport, and its worker in a thread of this process.


@pytest.fixture(scope="module")
def memory_app() -> Iterator[Any]:
    from celery import Celery
    from celery.contrib.testing.worker import start_worker

    import traced_tasks.celery

    app = Celery("unit", broker="memory://", set_as_current=False)
    traced_tasks.celery.instrument(app)

    @app.task(name="unit.receipts.send")
    def send_receipt(order_id: int) -> str:
        return trace.get_current_span().get_span_context().trace_id.to_bytes(16, "big").hex()

    @app.task(bind=True)
    def bound(self: Any, order_id: int) -> None:
        pass

    app.send_receipt = send_receipt  # type: ignore[attr-defined]
    app.bound = bound  # type: ignore[attr-defined]
    with start_worker(app, pool="solo", perform_ping_check=False):
        yield app


def test_a_celery_task_is_labelled_by_its_function(telemetry: Telemetry, memory_app: Any) -> None:
    """A Celery task counts under its function's module.qualname, whatever Celery names it (name=...) and with
    bind=True, as the function would in process."""
    from traced_tasks import _config

    receipts = memory_app.send_receipt
    profile = _config.current().profiles.get(receipts, None)
    assert profile.name == f"{__name__}.memory_app.<locals>.send_receipt"
    assert _config.current().profiles.get(memory_app.bound, None).name == f"{__name__}.memory_app.<locals>.bound"


def test_arguments_celery_cannot_serialize_fail_at_add_task(telemetry: Telemetry, memory_app: Any) -> None:
    """add_task with arguments Celery's serializer refuses raises Celery's own EncodeError at once, and counts
    nothing."""
    from kombu.exceptions import EncodeError

    tasks = BackgroundTasks()
    with pytest.raises(EncodeError):
        tasks.add_task(memory_app.send_receipt, object())
    assert tasks.tasks == []
    assert not telemetry.value(names.SCHEDULED.total, task=f"{__name__}.memory_app.<locals>.send_receipt")


def test_a_handed_over_task_runs_in_the_worker_under_its_scheduling_span(telemetry: Telemetry, memory_app: Any) -> None:
    """A Celery task added to a batch is published when the batch runs, not called: the worker runs it in a span of
    its name, a child of the span current at add_task, and both sides count it once."""
    tracer = telemetry.provider.get_tracer("test")

    async def main() -> None:
        with tracer.start_as_current_span("POST /orders"):
            tasks = BackgroundTasks()
            tasks.add_task(memory_app.send_receipt, 7)
        await tasks()

    asyncio.run(main())
    name = f"{__name__}.memory_app.<locals>.send_receipt"
    wait_until(lambda: telemetry.value(names.DURATION.count, task=name, status="success") == 1)
    assert telemetry.value(names.SCHEDULED.total, task=name) == 1
    assert telemetry.value(names.WAIT.count, task=name) == 1
    (request,) = [span for span in telemetry.spans() if span.name == "POST /orders"]
    wait_until(lambda: telemetry.task_spans())
    (run,) = telemetry.task_spans()
    assert run.name == names.SPAN_NAME_PREFIX + name
    assert run.kind is SpanKind.CONSUMER
    assert run.parent is not None
    assert run.parent.span_id == request.context.span_id
