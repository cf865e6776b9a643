"""The ASGI app that serves /metrics."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, make_asgi_app
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.types import ASGIApp, Receive, Scope, Send

from traced_tasks._config import current


def make_metrics_app(registry: CollectorRegistry | None = None) -> ASGIApp:
    """An ASGI app that serves `registry` in the Prometheus text format, or OpenMetrics with exemplars
    when the scraper asks for it.

    With no registry it serves the one traced_tasks is configured with. When `PROMETHEUS_MULTIPROC_DIR`
    is set, it serves the sum of every worker process instead, read from that folder on each scrape.

        app.mount("/metrics", make_metrics_app(my_registry))
    """

    async def metrics_app(scope: Scope, receive: Receive, send: Send) -> None:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # A fresh registry per scrape, as prometheus_client's multiprocess mode requires.
            served = CollectorRegistry()
            MultiProcessCollector(served)  # type: ignore[no-untyped-call]
        else:
            served = registry if registry is not None else current().registry
        await make_asgi_app(served)(scope, receive, send)

    return metrics_app
