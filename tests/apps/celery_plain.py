"""A FastAPI service that knows nothing of traced_tasks but its Celery module's one line, for the zero-code test:
FastAPI's own BackgroundTasks and Starlette's own BackgroundTask."""

from __future__ import annotations

from fastapi import BackgroundTasks, FastAPI
from prometheus_client import make_asgi_app
from starlette.background import BackgroundTask
from starlette.responses import JSONResponse

from tests.apps.celery_shop import send_receipt

app = FastAPI()
app.mount("/metrics", make_asgi_app())


@app.post("/orders/{order_id}")
def place_order(order_id: int, tasks: BackgroundTasks) -> dict[str, int]:
    tasks.add_task(send_receipt, order_id)
    return {"order_id": order_id}


@app.post("/receipts/{order_id}")
def resend_receipt(order_id: int) -> JSONResponse:
    return JSONResponse({"order_id": order_id}, background=BackgroundTask(send_receipt, order_id))
