from __future__ import annotations

import asyncio
import random
import threading
import time

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from tests.conftest import Telemetry
from tests.support import Server, wait_until
from traced_tasks import BackgroundTasks
from traced_tasks import _conventions as names

pytestmark = pytest.mark.integration  # real servers and processes: slow

REQUESTS = 300


def test_no_task_lands_in_another_requests_trace(telemetry: Telemetry, serve: type[Server]) -> None:
    """300 concurrent requests through real uvicorn, each with its own traceparent: every task span is in its own trace.

    Half the endpoints are sync (run in the threadpool) and every request schedules one sync and one async task
    that sleep a random while, so tasks of different requests interleave on the loop and in the threads.
    """
    seen: dict[tuple[int, str], trace.SpanContext] = {}
    lock = threading.Lock()

    def note(request_id: int, kind: str) -> None:
        with lock:
            seen[request_id, kind] = trace.get_current_span().get_span_context()

    def sync_task(request_id: int) -> None:
        time.sleep(random.uniform(0, 0.01))
        note(request_id, "sync")

    async def async_task(request_id: int) -> None:
        await asyncio.sleep(random.uniform(0, 0.01))
        note(request_id, "async")

    def schedule(request: Request) -> Response:
        request_id = int(request.query_params["id"])
        tasks = BackgroundTasks()
        tasks.add_task(async_task, request_id)
        tasks.add_task(sync_task, request_id)
        return PlainTextResponse("ok", background=tasks)

    async def async_endpoint(request: Request) -> Response:
        await asyncio.sleep(random.uniform(0, 0.01))
        return schedule(request)

    app = Starlette(routes=[Route("/async", async_endpoint), Route("/sync", schedule)])
    app.add_middleware(OpenTelemetryMiddleware, tracer_provider=telemetry.provider)
    server = serve(app)

    trace_ids = {request_id: random.getrandbits(128) | 1 for request_id in range(REQUESTS)}

    async def send_all() -> None:
        limits = httpx.Limits(max_connections=REQUESTS)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=60) as client:
            responses = await asyncio.gather(
                *(
                    client.get(
                        "/sync" if request_id % 2 else "/async",
                        params={"id": request_id},
                        headers={"traceparent": f"00-{trace_id:032x}-{random.getrandbits(64) | 1:016x}-01"},
                    )
                    for request_id, trace_id in trace_ids.items()
                )
            )
        assert {response.status_code for response in responses} == {200}

    asyncio.run(send_all())
    wait_until(lambda: len(seen) == 2 * REQUESTS and len(telemetry.task_spans()) == 2 * REQUESTS)

    servers = {span.context.trace_id: span for span in telemetry.spans() if span.kind is SpanKind.SERVER}
    tasks = {span.context.span_id: span for span in telemetry.task_spans()}
    for (request_id, _kind), context in seen.items():
        assert context.trace_id == trace_ids[request_id]
        span = tasks[context.span_id]
        assert span.context.trace_id == trace_ids[request_id]
        assert span.parent is not None
        assert span.parent.span_id == servers[trace_ids[request_id]].context.span_id
    assert telemetry.value(names.IN_PROGRESS.name, task="tests.test_concurrency." + _qualname("sync_task")) == 0


def _qualname(name: str) -> str:
    return f"test_no_task_lands_in_another_requests_trace.<locals>.{name}"
