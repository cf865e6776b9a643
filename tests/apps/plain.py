"""A FastAPI service that knows nothing of traced_tasks, for zero-code instrumentation tests."""

from __future__ import annotations

from fastapi import BackgroundTasks, FastAPI
from starlette.background import BackgroundTask
from starlette.responses import PlainTextResponse

app = FastAPI()


def send_receipt(order_id: int) -> None:
    pass


async def notify_warehouse(order_id: int) -> None:
    pass


@app.post("/orders/{order_id}")
def place_order(order_id: int, tasks: BackgroundTasks) -> dict[str, int]:
    tasks.add_task(send_receipt, order_id)
    tasks.add_task(notify_warehouse, order_id)
    return {"order_id": order_id}


@app.get("/ping")
async def ping() -> PlainTextResponse:
    return PlainTextResponse("pong", background=BackgroundTask(notify_warehouse, 0))
