"""Getting started with FastAPI: one changed import, and two mounts."""

from __future__ import annotations

# --8<-- [start:readme]
from fastapi import FastAPI

import traced_tasks
from traced_tasks import BackgroundTasks  # instead of fastapi's or starlette's

app = FastAPI()
app.mount("/metrics", traced_tasks.metrics_app)  # Prometheus scrapes this
app.mount("/tasks", traced_tasks.console_app)  # and people read this


def send_receipt(order_id: int, email: str) -> None: ...


@app.post("/orders/{order_id}")
async def place_order(order_id: int, tasks: BackgroundTasks) -> dict[str, int]:
    tasks.add_task(send_receipt, order_id, email="customer@example.com")
    return {"order_id": order_id}


# --8<-- [end:readme]
