"""Getting started with Starlette."""

from __future__ import annotations

# --8<-- [start:readme]
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

import traced_tasks
from traced_tasks import BackgroundTasks


def send_welcome_email(to: str) -> None: ...


async def signup(request: Request) -> JSONResponse:
    tasks = BackgroundTasks()
    tasks.add_task(send_welcome_email, to="new@example.com")
    return JSONResponse({"ok": True}, background=tasks)


app = Starlette(
    routes=[
        Route("/signup", signup, methods=["POST"]),
        Mount("/metrics", traced_tasks.metrics_app),
    ]
)
# --8<-- [end:readme]
