"""The taskiq page's shop/web.py: the web process, whose call sites do not change; it starts the broker, as taskiq
asks."""

from __future__ import annotations

# --8<-- [start:example]
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

import traced_tasks
from traced_tasks import BackgroundTasks

from .tasks import broker, send_receipt


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await broker.startup()
    yield
    await broker.shutdown()


app = FastAPI(lifespan=lifespan)
app.mount("/metrics", traced_tasks.metrics_app)
app.mount("/tasks", traced_tasks.console_app)


@app.post("/orders/{order_id}")
async def place_order(order_id: int, tasks: BackgroundTasks) -> dict[str, int]:
    tasks.add_task(send_receipt, order_id)  # kicked to the broker when the response's tasks run
    return {"order_id": order_id}


# --8<-- [end:example]
