"""Tasks handed over to Celery, where Celery's ways differ from taskiq's (what both keep is in test_contract.py): a
broker that is down, a prefork worker without a multiprocess folder, zero-code instrumentation. The proof: a real
redis-server, a real uvicorn web process, a real `celery worker -P prefork -c 2`, spans over OTLP/HTTP to a receiver,
and metrics scraped from both processes. Beside it, unit tests with Celery's in-memory transport and a worker in a
thread, which run at the declared lower bounds."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.trace import SpanKind

from tests.conftest import Telemetry
from tests.engines import BIN, CELERY, Shop, spans_named, value
from tests.support import (
    Collector,
    Process,
    attributes,
    free_port,
    wait_until,
)
from traced_tasks import BackgroundTasks
from traced_tasks import _conventions as names

TASKS = CELERY.tasks


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
def test_a_prefork_worker_without_a_multiprocess_folder_says_so_and_serves_nothing(shop: Shop) -> None:
    """A prefork worker with one child (-c 1) and TRACED_TASKS_METRICS_PORT but no PROMETHEUS_MULTIPROC_DIR: its
    main process, which runs no task, logs an error saying what to set once it is ready, and does not serve the
    port, rather than serve zeros a dashboard would take for an idle worker."""
    port = free_port()
    command = [*CELERY.worker, "-c", "1"]
    worker = Process(
        command, shop.folder / "lonely.log", **shop.environment("shop-worker", TRACED_TASKS_METRICS_PORT=str(port))
    )
    shop.processes.append(worker)
    wait_until(lambda: "ready." in worker.output())
    wait_until(lambda: "traced_tasks" in worker.output())
    assert "with PROMETHEUS_MULTIPROC_DIR set to an empty folder before the worker starts" in worker.output()
    assert f"it does not serve port {port}" in worker.output()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/metrics")


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
