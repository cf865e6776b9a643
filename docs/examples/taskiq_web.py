"""The web process: its call sites do not change; it starts the broker, as taskiq asks."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

import traced_tasks
from docs.examples.taskiq_tasks import broker, send_receipt
from traced_tasks import BackgroundTasks


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await broker.startup()
    yield
    await broker.shutdown()


app = FastAPI(lifespan=lifespan)
app.mount("/metrics", traced_tasks.metrics_app)


@app.post("/orders/{order_id}")
async def place_order(order_id: int, tasks: BackgroundTasks) -> dict[str, int]:
    tasks.add_task(send_receipt, order_id)  # kicked to the broker when the response's tasks run
    return {"order_id": order_id}
