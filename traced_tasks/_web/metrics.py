"""The ASGI app that serves /metrics."""

from __future__ import annotations

import gzip

import anyio
import anyio.to_thread
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from traced_tasks import _config
from traced_tasks._web.access import Guard

# Threads of their own for rendering /metrics: the application's threadpool limiter (40 tokens) is shared by sync
# endpoints and sync tasks, and when they fill it during an incident, /metrics must answer.
RENDERING = anyio.CapacityLimiter(4)


def make_metrics_app(registry: CollectorRegistry | None = None, *, bearer_token: str | None = None) -> ASGIApp:
    """An ASGI app that serves `registry` in the Prometheus text format, or OpenMetrics with exemplars
    when the scraper asks for it.

    With no registry it serves the one traced_tasks is configured with: in multiprocess mode
    (`PROMETHEUS_MULTIPROC_DIR`), the sum of every worker process, read from that folder on each scrape.
    Requests need `Authorization: Bearer <token>` when `bearer_token` is given, or else when
    TRACED_TASKS_METRICS_TOKEN is set at the time of the request.

        app.mount("/metrics", make_metrics_app(my_registry, bearer_token=os.environ["METRICS_TOKEN"]))
    """
    if registry is not None and not isinstance(registry, CollectorRegistry):
        raise TypeError(f"registry must be a prometheus_client CollectorRegistry (or None), got {registry!r}")
    guard = Guard(bearer_token)

    async def metrics_app(scope: Scope, receive: Receive, send: Send) -> None:
        if not await guard.admit(scope, receive, send):
            return
        served = registry if registry is not None else _config.current().backend.registry()
        request = Request(scope, receive)
        # Rendering thousands of series takes long enough to stall every request if done on the event loop.
        body, headers = await anyio.to_thread.run_sync(
            render,
            served,
            request.headers.get("accept", ""),
            request.headers.get("accept-encoding", ""),
            request.query_params.getlist("name[]"),
            limiter=RENDERING,
        )
        await Response(body, headers=headers)(scope, receive, send)

    return metrics_app


def render(
    registry: CollectorRegistry, accept: str, accept_encoding: str, names: list[str]
) -> tuple[bytes, dict[str, str]]:
    """What prometheus_client's own app does: content negotiation, the name[] filter, gzip."""
    encoder, content_type = choose_encoder(accept)
    body = encoder(registry.restricted_registry(names) if names else registry)
    headers = {"Content-Type": content_type}
    if gzip_accepted(accept_encoding):
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
    return body, headers
