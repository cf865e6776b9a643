"""What a task handed to Celery or taskiq keeps, the same on both engines. The proof: a real redis-server, a real
uvicorn web process, a real worker (`celery worker -P prefork -c 2`, `taskiq worker --workers 2`), spans over
OTLP/HTTP to a receiver, and metrics scraped from both processes. What differs between the engines (retries,
redelivery, a broker that is down) is in test_celery.py and test_taskiq.py."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.engines import CELERY, TASKIQ, TRACE_ID, Engine, Shop, row, shape, spans_named, traceparent, value
from tests.support import Collector, attributes, wait_until
from traced_tasks import _conventions as names

pytestmark = pytest.mark.integration


@pytest.fixture(params=[CELERY, TASKIQ], ids=str)
def shop(request: pytest.FixtureRequest, tmp_path: Path, broker: str, collector: Collector) -> Iterator[Shop]:
    engine: Engine = request.param
    started = Shop(engine, tmp_path, broker, collector)
    try:
        yield started
    finally:
        started.stop()


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


def test_a_hung_task_is_flagged_on_the_workers_console(shop: Shop) -> None:
    """A run that goes on in a worker process: the worker's port serves it in the console's running list, from the
    process that runs it, flagged hung past TRACED_TASKS_HUNG_AFTER, and in /metrics as in progress since its
    start. With Celery, the main process answers for its children."""
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
    os.kill(run["pid"], signal.SIGKILL)  # a warm shutdown would wait for it
