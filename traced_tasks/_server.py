"""/metrics on a port of its own, for applications that do not mount metrics_app."""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import Metric

from traced_tasks import _config
from traced_tasks._multiprocess import MultiprocessBackend

PORT_ENV = "TRACED_TASKS_METRICS_PORT"
ADDR_ENV = "TRACED_TASKS_METRICS_ADDR"

logger = logging.getLogger("traced_tasks")


def port_from_environment() -> int | None:
    port = os.environ.get(PORT_ENV)
    if not port:
        return None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{PORT_ENV} must be a TCP port number, got {port!r}")
    return int(port)


class _Configured:
    """What traced_tasks' /metrics serves, looked up at each scrape, since configure() may come later."""

    def collect(self) -> Iterable[Metric]:
        return _config.current().backend.registry().collect()


class MetricsServer:
    """prometheus_client's HTTP server on one port, started by the first ASGI call a process serves
    (its lifespan startup, or its first request).

    Not at instrument(): supervisors (gunicorn's master, uvicorn's reloader) load the instrumentation too,
    and would hold the port while serving nothing. In multiprocess mode every worker tries the port, and
    the first one serves the sum of all.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self._pid: int | None = None
        self._server: Any = None
        self._lock = threading.Lock()

    def ensure_started(self) -> None:
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()  # one attempt per process, whatever comes of it
            registry = CollectorRegistry()
            registry.register(_Configured())
            try:
                self._server, _thread = start_http_server(self.port, os.environ.get(ADDR_ENV, "127.0.0.1"), registry)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE and isinstance(_config.current().backend, MultiprocessBackend):
                    logger.debug("traced_tasks: another worker serves metrics on port %s", self.port)
                else:
                    logger.exception("traced_tasks: cannot serve metrics on port %s", self.port)

    def stop(self) -> None:
        with self._lock:
            # In a forked child the serving thread does not exist, and shutdown() would wait for it forever.
            if self._server is not None and self._pid == os.getpid():
                self._server.shutdown()
                self._server.server_close()
            self._server = None
            self._pid = None
