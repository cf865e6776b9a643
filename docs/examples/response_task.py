"""A task attached to a response directly: traced when it is traced_tasks' BackgroundTask."""

from __future__ import annotations

# --8<-- [start:example]
from fastapi import FastAPI
from starlette.responses import JSONResponse

from traced_tasks import BackgroundTask

app = FastAPI()


def send_receipt(order_id: int, email: str) -> None: ...


@app.post("/orders/{order_id}/resend")
async def resend_receipt(order_id: int) -> JSONResponse:
    task = BackgroundTask(send_receipt, order_id, email="customer@example.com")
    return JSONResponse({"order_id": order_id}, background=task)


# --8<-- [end:example]
