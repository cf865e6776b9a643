"""Tasks handed over to taskiq, where taskiq's ways differ from Celery's (what both keep is in test_contract.py): a
broker that is down, a hook taskiq skips, a sync task's thread. The proof: a real redis-server, a real uvicorn web
process, a real `taskiq worker` with two worker processes, spans over OTLP/HTTP to a receiver, and metrics
scraped from both processes. Beside it, unit tests with taskiq's InMemoryBroker, which run at the declared lower
bounds."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.trace import SpanKind

from tests.conftest import Telemetry
from tests.engines import TASKIQ, Shop, spans_named, value
from tests.support import Collector, attributes, redis_server, wait_until
from traced_tasks import BackgroundTasks
from traced_tasks import _conventions as names

TASKS = TASKIQ.tasks


@pytest.fixture
def shop(tmp_path: Path, broker: str, collector: Collector) -> Iterator[Shop]:
    started = Shop(TASKIQ, tmp_path, broker, collector)
    try:
        yield started
    finally:
        started.stop()


def task_spans(spans: list[Span], task: str) -> list[Span]:
    return spans_named(spans, TASKS + task)


async def succeeded(telemetry: Telemetry, task: str) -> None:
    """Wait, 10 s at most, for a run of `task` to succeed: the in-memory broker runs it in a task of this loop."""
    for _ in range(1000):
        if telemetry.value(names.DURATION.count, task=task, status="success"):
            return
        await asyncio.sleep(0.01)


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


# Unit tests: taskiq's InMemoryBroker, which runs its own receiver in this process.


@pytest.fixture
def memory_broker() -> Iterator[Any]:
    from taskiq import InMemoryBroker

    import traced_tasks.taskiq

    broker = InMemoryBroker().with_middlewares(traced_tasks.taskiq.Middleware())

    @broker.task(task_name="unit:receipts")
    async def send_receipt(order_id: int) -> str:
        return format(trace.get_current_span().get_span_context().trace_id, "032x")

    @broker.task(task_name="unit:quiet")
    async def quiet() -> None:
        from taskiq.exceptions import NoResultError

        raise NoResultError

    broker.send_receipt = send_receipt  # type: ignore[attr-defined]
    broker.quiet = quiet  # type: ignore[attr-defined]
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
        await succeeded(telemetry, name)

    asyncio.run(main())
    assert telemetry.value(names.DURATION.count, task=name, status="success") == 1
    assert telemetry.value(names.SCHEDULED.total, task=name) == 1
    (request,) = [span for span in telemetry.spans() if span.name == "POST /orders"]
    (run,) = telemetry.task_spans()
    assert run.kind is SpanKind.CONSUMER
    assert run.parent is not None
    assert run.parent.span_id == request.context.span_id


def test_a_task_that_keeps_no_result_succeeds(telemetry: Telemetry, memory_broker: Any) -> None:
    """A taskiq task that raises NoResultError, taskiq's way to keep no result, ran to its end: it counts as a
    success, not an error."""
    name = f"{__name__}.memory_broker.<locals>.quiet"

    async def main() -> None:
        await memory_broker.quiet.kiq()
        await succeeded(telemetry, name)

    asyncio.run(main())
    assert telemetry.value(names.DURATION.count, task=name, status="success") == 1
    assert not telemetry.value(names.DURATION.count, task=name, status="error")


def test_a_retried_run_is_an_error_and_its_retry_a_new_run(telemetry: Telemetry) -> None:
    """With taskiq's SimpleRetryMiddleware, which replaces a failed result's error with NoResultError when it
    retries: the run that failed counts as an error, with its own exception's class, and the retry as a new run, a
    success."""
    from taskiq import InMemoryBroker, SimpleRetryMiddleware

    import traced_tasks.taskiq

    broker = InMemoryBroker().with_middlewares(
        SimpleRetryMiddleware(default_retry_count=2), traced_tasks.taskiq.Middleware()
    )
    failures = [ConnectionError("partner down")]

    @broker.task(task_name="unit:flaky", retry_on_error=True)
    async def flaky() -> None:
        if failures:
            raise failures.pop()

    name = f"{__name__}.test_a_retried_run_is_an_error_and_its_retry_a_new_run.<locals>.flaky"

    async def main() -> None:
        await broker.startup()
        await flaky.kiq()
        await succeeded(telemetry, name)
        await broker.shutdown()

    asyncio.run(main())
    assert telemetry.value(names.DURATION.count, task=name, status="success") == 1
    assert telemetry.value(names.DURATION.count, task=name, status="error") == 1
    assert telemetry.value(names.EXCEPTIONS.total, task=name, exception="ConnectionError") == 1


def test_a_retry_that_runs_while_its_first_delivery_ends_keeps_its_own_run(telemetry: Telemetry) -> None:
    """A retry sent again under the same task ID, running while the delivery that failed is still being wound down
    (its asyncio task ends after post_execute), is a run of its own: the failed delivery's end never ends the retry's
    run, as lost or otherwise, and each run keeps its own outcome."""
    from taskiq import InMemoryBroker, SimpleRetryMiddleware

    import traced_tasks.taskiq

    broker = InMemoryBroker().with_middlewares(
        SimpleRetryMiddleware(default_retry_count=2), traced_tasks.taskiq.Middleware()
    )
    failures = [ConnectionError("partner down")]

    @broker.task(task_name="unit:flaky_slow", retry_on_error=True)
    async def flaky() -> None:
        if failures:
            raise failures.pop()
        await asyncio.sleep(0.2)  # still running when the first delivery's asyncio task ends

    name = f"{__name__}.test_a_retry_that_runs_while_its_first_delivery_ends_keeps_its_own_run.<locals>.flaky"

    async def main() -> None:
        await broker.startup()
        await flaky.kiq()
        await succeeded(telemetry, name)
        await broker.shutdown()

    asyncio.run(main())
    assert telemetry.value(names.DURATION.count, task=name, status="success") == 1
    assert telemetry.value(names.DURATION.count, task=name, status="error") == 1
    assert telemetry.value(names.EXCEPTIONS.total, task=name, exception="ConnectionError") == 1
    assert not telemetry.value(names.EXCEPTIONS.total, task=name, exception=names.LOST)


def test_a_retry_run_in_place_is_counted_as_scheduled_as_its_first_delivery_was(telemetry: Telemetry) -> None:
    """InMemoryBroker(await_inplace=True) runs a retry inside the publish of its first delivery, under the same task
    ID: both publishes are counted as scheduled, so that scheduled = started holds."""
    from taskiq import InMemoryBroker, SimpleRetryMiddleware

    import traced_tasks.taskiq

    broker = InMemoryBroker(await_inplace=True).with_middlewares(
        SimpleRetryMiddleware(default_retry_count=2), traced_tasks.taskiq.Middleware()
    )
    failures = [ConnectionError("partner down")]

    @broker.task(task_name="unit:flaky_in_place", retry_on_error=True)
    async def flaky() -> None:
        if failures:
            raise failures.pop()

    name = f"{__name__}.test_a_retry_run_in_place_is_counted_as_scheduled_as_its_first_delivery_was.<locals>.flaky"

    async def main() -> None:
        await broker.startup()
        await flaky.kiq()
        await broker.shutdown()

    asyncio.run(main())
    assert telemetry.value(names.WAIT.count, task=name) == 2
    assert telemetry.value(names.SCHEDULED.total, task=name) == 2
    assert telemetry.value(names.DURATION.count, task=name, status="success") == 1


def test_a_failure_at_the_brokers_startup_is_contained(
    telemetry: Telemetry, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """When traced_tasks cannot set itself up as the broker starts (here, declaring the tasks fails), the broker
    still starts, and its tasks still run; the failure is logged."""
    from taskiq import InMemoryBroker

    import traced_tasks.taskiq
    from traced_tasks import _config

    def fail(*tasks: Any) -> None:
        raise RuntimeError("cannot declare")

    monkeypatch.setattr(_config, "declare", fail)
    middleware = traced_tasks.taskiq.Middleware()
    broker = InMemoryBroker().with_middlewares(middleware)

    @broker.task(task_name="unit:contained")
    async def contained() -> int:
        return 7

    async def main() -> int:
        await broker.startup()
        middleware.startup()  # as a broker's startup calls it; InMemoryBroker at taskiq's lower bound does not
        result = await (await contained.kiq()).wait_result(timeout=10)
        await broker.shutdown()
        return int(result.return_value)

    with caplog.at_level(logging.ERROR, logger="traced_tasks"):
        assert asyncio.run(main()) == 7
    assert "cannot declare the tasks of an engine" in caplog.text


def test_a_run_whose_post_execute_never_comes_still_ends(telemetry: Telemetry) -> None:
    """taskiq skips post_execute when a dependency's teardown raises after the task returned, or when a task's
    ack_type label is not one: the run still ends, with the message's own end, an error by what it raised, and
    nothing is left in progress or hung."""
    from taskiq import InMemoryBroker, TaskiqDepends

    import traced_tasks.taskiq

    broker = InMemoryBroker().with_middlewares(traced_tasks.taskiq.Middleware())

    async def connection() -> AsyncIterator[int]:
        yield 1
        raise TeardownFailed()

    @broker.task(task_name="unit:torn")
    async def torn(order: int, db: Any = TaskiqDepends(connection)) -> None:  # noqa: B008  # taskiq's way
        pass

    @broker.task(task_name="unit:unacked", ack_type="never")
    async def unacked() -> None:
        pass

    async def main() -> None:
        await broker.startup()
        await torn.kiq(1)
        await unacked.kiq()
        # Their messages' tasks raise: taskiq leaves what they raised to whoever awaits them.
        await asyncio.gather(*asyncio.all_tasks() - {asyncio.current_task()}, return_exceptions=True)
        await broker.shutdown()

    asyncio.run(main())
    prefix = f"{__name__}.test_a_run_whose_post_execute_never_comes_still_ends.<locals>."

    assert telemetry.value(names.EXCEPTIONS.total, task=prefix + "torn", exception="TeardownFailed") == 1
    assert telemetry.value(names.IN_PROGRESS.name, task=prefix + "torn") == 0
    if ACK_TYPES:  # taskiq reads the ack_type label from 0.12.5 on
        assert telemetry.value(names.EXCEPTIONS.total, task=prefix + "unacked", exception="ValueError") == 1
        assert telemetry.value(names.IN_PROGRESS.name, task=prefix + "unacked") == 0
    assert [span.name.rsplit(".", 1)[-1] for span in telemetry.task_spans() if span.status.status_code.name == "ERROR"]


class TeardownFailed(Exception):
    pass


ACK_TYPES = tuple(int(part) for part in version("taskiq").split(".")[:3] if part.isdigit()) >= (0, 12, 5)


@pytest.mark.integration
def test_a_sync_tasks_wait_for_a_thread_is_wait_not_run_time(shop: Shop) -> None:
    """Three sync tasks of a second each on one thread (--max-threadpool-threads 1): each run starts when the thread
    starts it, so their run times add up to about three seconds and their waits to about three (0, 1 and 2), not six
    seconds of run time and none of wait."""
    from taskiq.kicker import AsyncKicker
    from taskiq_redis import ListQueueBroker

    shop.broker = shop.broker.rsplit("/", 1)[0] + "/4"  # a list, where other tests made a stream
    shop.start_worker("--workers", "1", "--max-threadpool-threads", "1", TASKIQ_BROKER_KIND="list")

    async def kick() -> None:
        broker = ListQueueBroker(shop.broker, socket_timeout=None)
        await broker.startup()
        for _ in range(3):
            kicker: Any = AsyncKicker("tests.apps.taskiq_shop:pause", broker, {})
            await kicker.kiq(1.0)
        await broker.shutdown()

    asyncio.run(kick())
    task = TASKS + "pause"
    wait_until(lambda: value(shop.worker_metrics(), names.DURATION.count, task=task, status="success") == 3)
    found = shop.worker_metrics()
    run_time = value(found, names.DURATION.sum, task=task, status="success") or 0
    waited = value(found, names.WAIT.sum, task=task) or 0
    assert run_time < 4.5, (run_time, waited)
    assert waited > 2.5, (run_time, waited)
