"""A taskiq broker for the taskiq tests: its workers run these tasks, and tests/apps/taskiq_web.py kicks them. The
broker is TASKIQ_BROKER (redis streams, which acknowledge a message once its run ended); spans go where
setup_tracing() sends them (OTEL_EXPORTER_OTLP_ENDPOINT)."""

from __future__ import annotations

import asyncio
import os
import time

from taskiq import Context, SimpleRetryMiddleware, TaskiqDepends
from taskiq_redis import RedisStreamBroker

import traced_tasks
import traced_tasks.taskiq

traced_tasks.setup_tracing("shop")

broker = RedisStreamBroker(
    os.environ.get("TASKIQ_BROKER", "redis://127.0.0.1:1/0"),
    # A message whose run did not end (its worker process was killed) is claimed again after this long.
    idle_timeout=int(os.environ.get("TASKIQ_IDLE_TIMEOUT", "600000")),
).with_middlewares(SimpleRetryMiddleware(default_retry_count=2), traced_tasks.taskiq.Middleware())

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
def reconcile(marker: str) -> None:
    """Runs for a while, and notes each start in the file `marker`, so that a test can kill its worker mid-run."""
    with open(marker, "a") as file:
        file.write(f"{os.getpid()}\n")
    time.sleep(2)
