"""The web process: its call sites do not change."""

from __future__ import annotations

from fastapi import FastAPI

import traced_tasks
from docs.examples.celery_tasks import send_receipt
from traced_tasks import BackgroundTasks

app = FastAPI()
app.mount("/metrics", traced_tasks.metrics_app)


@app.post("/orders/{order_id}")
async def place_order(order_id: int, tasks: BackgroundTasks) -> dict[str, int]:
    tasks.add_task(send_receipt, order_id)  # published to the broker when the response's tasks run
    return {"order_id": order_id}
