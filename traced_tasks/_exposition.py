"""The ASGI app that serves /metrics."""

from __future__ import annotations

import gzip
import hmac
import os

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from traced_tasks import _multiprocess
from traced_tasks._config import current
from traced_tasks._local import LocalMetrics
from traced_tasks._render import render

TOKEN_ENV = "TRACED_TASKS_METRICS_TOKEN"
_EOF = b"# EOF\n"


def make_metrics_app(registry: CollectorRegistry | None = None, *, bearer_token: str | None = None) -> ASGIApp:
    """An ASGI app that serves `registry` in the Prometheus text format, or OpenMetrics with exemplars
    when the scraper asks for it.

    With no registry it serves the one traced_tasks is configured with. When `PROMETHEUS_MULTIPROC_DIR`
    is set, it serves the sum of every worker process instead, read from that folder on each scrape.
    With a `bearer_token`, requests without `Authorization: Bearer <token>` get 401.

        app.mount("/metrics", make_metrics_app(my_registry, bearer_token=os.environ["METRICS_TOKEN"]))
    """
    expected = f"Bearer {bearer_token}".encode() if bearer_token else None
    unauthorized = PlainTextResponse("unauthorized\n", 401, {"WWW-Authenticate": 'Bearer realm="metrics"'})

    async def metrics_app(scope: Scope, receive: Receive, send: Send) -> None:
        if expected is not None:
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, expected):
                await unauthorized(scope, receive, send)
                return
        folder = _multiprocess.directory()
        if folder is not None:
            # A fresh registry per scrape, as prometheus_client's multiprocess mode requires.
            served = _multiprocess.registry(folder)
        else:
            served = registry if registry is not None else current().metrics.registry
        request = Request(scope, receive)
        # Rendering thousands of series takes long enough to stall every request if done on the event loop.
        body, headers = await run_in_threadpool(
            _render,
            served,
            request.headers.get("accept", ""),
            request.headers.get("accept-encoding", ""),
            request.query_params.getlist("name[]"),
        )
        await Response(body, headers=headers)(scope, receive, send)

    return metrics_app


def _render(
    registry: CollectorRegistry, accept: str, accept_encoding: str, names: list[str]
) -> tuple[bytes, dict[str, str]]:
    """What prometheus_client's own app does: content negotiation, the name[] filter, gzip; with traced_tasks'
    in-process counts written by traced_tasks, much faster, after whatever else the registry holds."""
    encoder, content_type = choose_encoder(accept)
    ours = current().metrics
    if names or not isinstance(ours, LocalMetrics) or ours.registry is not registry:
        body = encoder(registry.restricted_registry(names) if names else registry)
    else:
        openmetrics = content_type.startswith("application/openmetrics-text")
        with ours.left_out():
            rest = encoder(registry)
        if openmetrics:
            body = rest.removesuffix(_EOF) + render(ours, openmetrics=True) + _EOF
        else:
            body = rest + render(ours, openmetrics=False)
    headers = {"Content-Type": content_type}
    if gzip_accepted(accept_encoding):
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
    return body, headers


def default_metrics_app() -> ASGIApp:
    return make_metrics_app(bearer_token=os.environ.get(TOKEN_ENV) or None)
