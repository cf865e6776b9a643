"""The Celery page's shop/web.py: the web process, whose call sites do not change."""

from __future__ import annotations

# --8<-- [start:example]
from fastapi import FastAPI

import traced_tasks
from traced_tasks import BackgroundTasks

from .tasks import send_receipt

app = FastAPI()
app.mount("/metrics", traced_tasks.metrics_app)
app.mount("/tasks", traced_tasks.console_app)


@app.post("/orders/{order_id}")
async def place_order(order_id: int, tasks: BackgroundTasks) -> dict[str, int]:
    tasks.add_task(send_receipt, order_id)  # published to the broker when the response's tasks run
    return {"order_id": order_id}


# --8<-- [end:example]
