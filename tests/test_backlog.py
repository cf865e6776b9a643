"""The work that waits: queue depth, the time the oldest waiting task was scheduled, consumers and the time of the
last read, for Celery on Redis (its priority lists included) and on RabbitMQ, and taskiq's Redis list and stream
brokers. The proof: a real redis-server, a real RabbitMQ node, real uvicorn web processes that read the queues when
scraped, and real workers, started once the backlog was read."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.engines import CELERY, TASKIQ, Engine, Shop, value
from tests.support import Collector, rabbitmq_server, redis_server, wait_until
from traced_tasks import _conventions as names
from traced_tasks import _queues, _sampled

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with rabbitmq_server(tmp_path_factory.mktemp("rabbitmq")) as url:
        yield url


@dataclass(frozen=True)
class Broker:
    """A broker an engine's queue lives on, as the shop's environment names it."""

    name: str
    engine: Engine
    queue: str
    kind: str = ""  # taskiq's: list or stream
    consumers: int | None = None  # what a started worker reads, where the broker tells


BROKERS = [
    Broker("celery on redis", CELERY, "celery"),
    Broker("celery on rabbitmq", CELERY, "celery", consumers=1),
    Broker("taskiq list", TASKIQ, "taskiq", kind="list"),
    # A stream's consumers are those of its group that read lately; a process that has read nothing yet is none.
    Broker("taskiq stream", TASKIQ, "taskiq", kind="stream", consumers=1),
]


def read(shop: Shop, family: names.Family, queue: str) -> float | None:
    return value(shop.web_metrics(shop.web), family.name, engine=shop.engine.name, queue=queue)


@pytest.mark.parametrize("where", BROKERS, ids=lambda broker: broker.name)
def test_the_backlog_of_a_queue_with_no_worker(
    where: Broker, tmp_path: Path, broker: str, rabbitmq: str, collector: Collector
) -> None:
    """With no worker running, five tasks scheduled through add_task (on Redis, one of them published at priority 9,
    to its own list) read exactly five in depth from the web process's /metrics, within one interval; the oldest
    waiting was scheduled when the first of them was, within a second. Once a worker starts, every one of them runs
    (reading took none), the depth reads 0, the oldest is absent, and the consumers read what the broker reports."""
    url = rabbitmq if "rabbitmq" in where.name else f"{broker.rsplit('/', 1)[0]}/{BROKERS.index(where) + 5}"
    shop = Shop(where.engine, tmp_path, url, collector)
    try:
        shop.web = shop.start_web(TRACED_TASKS_QUEUE_EVERY="1", TASKIQ_BROKER_KIND=where.kind)
        assert read(shop, names.QUEUE_DEPTH, where.queue) == 0  # an empty queue reads 0, not absent
        first = time.time()
        for order in range(4):
            assert httpx.post(f"{shop.web}/orders/{order}").status_code == 200
        if where.engine is CELERY and "redis" in where.name:
            assert httpx.post(f"{shop.web}/urgent/4").status_code == 200
        else:
            assert httpx.post(f"{shop.web}/orders/4").status_code == 200
        wait_until(lambda: read(shop, names.QUEUE_DEPTH, where.queue) == 5)
        oldest = read(shop, names.QUEUE_OLDEST, where.queue)
        if "rabbitmq" in where.name:
            assert oldest is None  # AMQP cannot look at a message without taking it
        else:
            assert oldest is not None
            assert abs(oldest - first) < 1.0
        sampled = read(shop, names.QUEUE_SAMPLED, where.queue)
        assert sampled is not None
        assert time.time() - 5 < sampled <= time.time()
        shop.start_worker(TASKIQ_BROKER_KIND=where.kind)
        task = where.engine.tasks + "send_receipt"
        wait_until(lambda: value(shop.worker_metrics(), names.DURATION.count, task=task, status="success") == 5)
        wait_until(lambda: read(shop, names.QUEUE_DEPTH, where.queue) == 0)
        assert read(shop, names.QUEUE_OLDEST, where.queue) is None
        expected = where.consumers
        if expected is None:
            assert read(shop, names.QUEUE_CONSUMERS, where.queue) is None  # Redis lists cannot tell
        else:
            wait_until(lambda: (read(shop, names.QUEUE_CONSUMERS, where.queue) or 0) >= expected)
    finally:
        shop.stop()


def test_a_queue_no_worker_reads_has_work_and_no_consumer(tmp_path: Path, rabbitmq: str, collector: Collector) -> None:
    """A task routed (task_routes) to a queue that no worker consumes: the web process discovers the queue from the
    application, and reads its work and its lack of consumers while the worker on the default queue has one."""
    shop = Shop(CELERY, tmp_path, rabbitmq, collector)
    try:
        shop.web = shop.start_web(TRACED_TASKS_QUEUE_EVERY="1")
        shop.start_worker()
        httpx.post(f"{shop.web}/invoices/1")
        httpx.post(f"{shop.web}/invoices/2")
        wait_until(lambda: read(shop, names.QUEUE_DEPTH, "invoices") == 2)
        assert read(shop, names.QUEUE_CONSUMERS, "invoices") == 0
        wait_until(lambda: read(shop, names.QUEUE_CONSUMERS, "celery") == 1)
    finally:
        shop.stop()


def test_a_broker_that_is_down_never_holds_metrics_up(tmp_path: Path, collector: Collector) -> None:
    """Once the broker stops, /metrics answers as it did, at once, and never fails: the queue's last read time stops
    advancing, and its other samples stay as last read, which the unread-queue alert tells."""
    with redis_server(tmp_path / "redis") as doomed:
        shop = Shop(CELERY, tmp_path, doomed, collector)
        shop.web = shop.start_web(TRACED_TASKS_QUEUE_EVERY="1")
        wait_until(lambda: read(shop, names.QUEUE_DEPTH, "celery") == 0)
    try:
        time.sleep(1.5)  # the broker is gone: the next reads fail
        for _ in range(5):
            response = httpx.get(shop.web + "/metrics/", timeout=10)  # a read waits 2 s at most
            assert response.status_code == 200
        last = read(shop, names.QUEUE_SAMPLED, "celery")
        assert last is not None
        time.sleep(2)
        assert read(shop, names.QUEUE_SAMPLED, "celery") == last
        assert read(shop, names.QUEUE_DEPTH, "celery") == 0
    finally:
        shop.stop()


class _MeetingReader:
    """A reader whose read returns only once the reads of two others have begun too: three such readers are read
    only if a collection begins every read before it waits for any."""

    def __init__(self, name: str, meeting: threading.Barrier) -> None:
        self.engine = name
        self.meeting = meeting

    def queues(self) -> list[str]:
        return ["work"]

    def read(self, queues: list[str]) -> list[_queues.Queue]:
        self.meeting.wait()
        return [_queues.Queue(name, 3.0, None, None) for name in queues]

    def close(self) -> None:
        pass


def test_a_collection_waits_for_every_brokers_read_together() -> None:
    """Three applications' queues are read at once, not one after another: a collection begins every due read, then
    waits for them all within one shared wait (_sampled.WAIT_SECONDS), so three brokers that hang hold a scrape up
    for that wait once, not three times. Each read here returns only when all three have begun, within 1.5 waits:
    read one after another, the first would give up before the third began."""
    meeting = threading.Barrier(3, timeout=_sampled.WAIT_SECONDS * 1.5)
    watchers = [_queues.watch(_MeetingReader(f"engine{index}", meeting)) for index in range(3)]
    try:
        depths = {sample.labels[0]: sample.value for sample in _sampled.collect() if sample.family is names.QUEUE_DEPTH}
    finally:
        for watcher in watchers:
            _queues.unwatch(watcher)
    assert depths == {"engine0": 3.0, "engine1": 3.0, "engine2": 3.0}


def test_a_transport_that_a_read_would_change_is_not_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """kombu's transports other than Redis and AMQP answer a passive declare by making the queue it names (SQS,
    Azure Service Bus): a Celery application on one of them (here the filesystem transport) has its queues left
    unread, with no series, and a warning naming the transport, once."""
    from celery import Celery

    folder = str(tmp_path / "broker")
    app = Celery("unread", broker="filesystem://", set_as_current=False)
    app.conf.broker_transport_options = {"data_folder_in": folder, "data_folder_out": folder}
    watcher = _queues.watch(_queues.CeleryQueues(app, None))
    try:
        with caplog.at_level(logging.WARNING, logger="traced_tasks"):
            first = [sample for sample in _sampled.collect() if sample.labels[:1] == ("celery",)]
            watcher._tried = 0.0  # a read due again
            second = [sample for sample in _sampled.collect() if sample.labels[:1] == ("celery",)]
    finally:
        _queues.unwatch(watcher)
    assert first == second == []
    assert caplog.text.count("the queues of Celery's 'filesystem' transport are not read") == 1


def test_queues_added_to_a_taskiq_stream_brokers_own_are_all_read() -> None:
    """`queues=` a function of the names found adds to a RedisStreamBroker's stream: both are read, the broker's own
    and the one added, as for every other reader."""
    from taskiq_redis import RedisStreamBroker

    broker = RedisStreamBroker("redis://127.0.0.1:1/0", queue_name="taskiq")
    reader = _queues.taskiq_reader(broker, lambda found: found | {"alerts"})
    assert reader is not None
    assert reader.queues() == ["alerts", "taskiq"]
