"""The taskiq page's shop/tasks.py: the module that makes the broker, which the web process and the workers both
import."""

from __future__ import annotations

# --8<-- [start:example]
import os

from taskiq import AsyncBroker, InMemoryBroker
from taskiq_redis import RedisStreamBroker

import traced_tasks.taskiq

url = os.environ.get("REDIS_URL", "redis://localhost:6379/0")
# memory://: no Redis, the tasks run in the process; for tests, as taskiq's guide to testing does
broker: AsyncBroker = InMemoryBroker() if url == "memory://" else RedisStreamBroker(url)
broker = broker.with_middlewares(traced_tasks.taskiq.Middleware())  # the one line


@broker.task
async def send_receipt(order_id: int) -> None: ...


# --8<-- [end:example]
