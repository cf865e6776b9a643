"""A service whose /metrics is prometheus_client's own ASGI app over its MultiProcessCollector, as
prometheus-fastapi-instrumentator and others serve the multiprocess folder, not traced_tasks.metrics_app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, make_asgi_app
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route

from traced_tasks import BackgroundTasks

registry = CollectorRegistry()
MultiProcessCollector(registry)


def send_receipt() -> None:
    pass


async def place_order(request: Request) -> Response:
    tasks = BackgroundTasks()
    tasks.add_task(send_receipt)
    return PlainTextResponse("ok", background=tasks)


app = Starlette(routes=[Route("/orders", place_order, methods=["POST"]), Mount("/metrics", make_asgi_app(registry))])
