"""The module that makes the taskiq broker: the web process and the workers both import it."""

from __future__ import annotations

import os

from taskiq import AsyncBroker, InMemoryBroker
from taskiq_redis import ListQueueBroker

import traced_tasks.taskiq

url = os.environ.get("TASKIQ_BROKER", "redis://localhost:6379/0")
broker: AsyncBroker = InMemoryBroker() if url == "memory://" else ListQueueBroker(url)
broker = broker.with_middlewares(traced_tasks.taskiq.Middleware())  # the one line


@broker.task
async def send_receipt(order_id: int) -> None: ...
