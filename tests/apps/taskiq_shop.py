"""A taskiq broker for the taskiq tests: its workers run these tasks, and tests/apps/taskiq_web.py kicks them. The
broker is at TASKIQ_BROKER: redis streams, which acknowledge a message once its run ended, or with
TASKIQ_BROKER_KIND=list a Redis list; spans go where setup_tracing() sends them (OTEL_EXPORTER_OTLP_ENDPOINT)."""

from __future__ import annotations

import asyncio
import os
import time

from taskiq import Context, SimpleRetryMiddleware, TaskiqDepends, TaskiqScheduler
from taskiq.schedule_sources import LabelScheduleSource
from taskiq_redis import ListQueueBroker, RedisStreamBroker

import traced_tasks
import traced_tasks.taskiq

traced_tasks.setup_tracing("shop")

URL = os.environ.get("TASKIQ_BROKER", "redis://127.0.0.1:1/0")
if os.environ.get("TASKIQ_BROKER_KIND") == "list":
    # Its BRPOP waits with no timeout: redis-py 8's default socket timeout of 5 s would end every idle worker process.
    made: ListQueueBroker | RedisStreamBroker = ListQueueBroker(URL, socket_timeout=None)
else:
    # A message whose run did not end (its worker process was killed) is claimed again after this long.
    made = RedisStreamBroker(URL, idle_timeout=int(os.environ.get("TASKIQ_IDLE_TIMEOUT", "600000")))
broker = made.with_middlewares(SimpleRetryMiddleware(default_retry_count=2), traced_tasks.taskiq.Middleware())

SECRET = "card 4111-1111-1111-1111 of jane@example.com"


class Declined(Exception):
    pass


@broker.task
async def send_receipt(order_id: int) -> None:
    await asyncio.sleep(0.01)


@broker.task
def charge(order_id: int) -> None:
    raise Declined(f"{SECRET} declined for order {order_id}")


@broker.task(task_name="shop.reports.render")  # a taskiq name of its own: the task label stays module.qualname
async def render_report(seconds: float) -> None:
    await asyncio.sleep(seconds)


@broker.task(retry_on_error=True)
async def notify_partner(order_id: int, context: Context = TaskiqDepends()) -> None:  # noqa: B008  # taskiq's way
    if int(context.message.labels.get("_retries", 0)) == 0:
        raise ConnectionError("the partner's endpoint is down")


@broker.task
def reconcile(marker: str, context: Context = TaskiqDepends()) -> None:  # noqa: B008  # taskiq's way
    """Runs for a while, and notes each start in the file `marker`, so that a test can kill its worker mid-run."""
    note(marker, context.message.task_id)
    time.sleep(2)


@broker.task
def pause(seconds: float) -> None:
    """A sync task: taskiq runs it in its thread pool."""
    time.sleep(seconds)


def note(marker: str, task_id: str) -> None:
    """Note a run's start, its process and its task ID, in the file `marker`: a test then ends it its own way."""
    with open(marker, "a") as file:
        file.write(f"{os.getpid()} {task_id}\n")


@broker.task(timeout=1)
async def overrun(marker: str, context: Context = TaskiqDepends()) -> None:  # noqa: B008  # taskiq's way
    note(marker, context.message.task_id)
    await asyncio.sleep(30)


@broker.task
async def terminated(marker: str, context: Context = TaskiqDepends()) -> None:  # noqa: B008
    """Async: a worker process's graceful stop waits for every sync task's thread, whatever its timeout."""
    note(marker, context.message.task_id)
    await asyncio.sleep(60)


@broker.task
def killed(marker: str, context: Context = TaskiqDepends()) -> None:  # noqa: B008
    note(marker, context.message.task_id)
    time.sleep(60)


SCENARIOS = {
    task.original_func.__name__.removesuffix("__taskiq_original"): task for task in (overrun, terminated, killed)
}
SCENARIOS["reconcile"] = reconcile


@broker.task(schedule=[{"cron": "*/5 * * * *"}])
async def refresh_cache() -> None:
    """Sent by `taskiq scheduler tests.apps.taskiq_shop:scheduler` every five minutes."""


scheduler = TaskiqScheduler(broker, sources=[LabelScheduleSource(broker)])
