"""/metrics and the task console on a port of their own, for applications that mount neither."""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.metrics_core import Metric
from starlette.datastructures import QueryParams

from traced_tasks import _config
from traced_tasks._options import ADDR, PORT
from traced_tasks._web import console
from traced_tasks._web.access import CHALLENGE, Guard

logger = logging.getLogger("traced_tasks")

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def from_environment() -> MetricsServer | None:
    """The server TRACED_TASKS_METRICS_PORT asks for, not started yet; None when it is unset, or not a port (logged)."""
    port = PORT.value()
    return None if port is None else MetricsServer(port)


class _Configured:
    """What traced_tasks' /metrics serves, looked up at each scrape, since configure() may come later."""

    def collect(self) -> Iterable[Metric]:
        return _config.current().backend.registry().collect()


def wsgi_app() -> WSGIApp:
    """The task console at /tasks/ and its data.json, prometheus_client's own app for everything else, as its
    start_http_server does; both behind the token of TRACED_TASKS_METRICS_TOKEN, read at each request."""
    registry = CollectorRegistry()
    registry.register(_Configured())
    metrics = make_wsgi_app(registry)
    guard = Guard(None)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if not guard.allows(environ.get("HTTP_AUTHORIZATION", "").encode("latin-1")):
            start_response("401 Unauthorized", [("Content-Type", "text/plain"), *CHALLENGE.items()])
            return [b"unauthorized\n"]
        path = environ.get("PATH_INFO", "/")
        if path == "/tasks":
            start_response("308 Permanent Redirect", [("Location", "/tasks/")])
            return [b""]
        if path in ("/tasks/", "/tasks/index.html"):
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"), *console.PAGE_HEADERS.items()])
            return [console.PAGE.encode()]
        if path == "/tasks/data.json":
            headers = [("Content-Type", "application/json"), *console.JSON_HEADERS.items()]
            stacks = QueryParams(environ.get("QUERY_STRING", "")).get("stacks") == "1"
            body = console.data_json(None, stacks=stacks)
            start_response("200 OK", headers)
            return [body]
        return metrics(environ, start_response)  # type: ignore[no-any-return]

    return app


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class MetricsServer:
    """/metrics and /tasks/ on one port. A web process starts it at the first ASGI call it serves (its lifespan
    startup, or its first request); an engine's worker when it is ready (Celery's main process, each taskiq worker
    process).

    Not at instrument(): supervisors (gunicorn's master, uvicorn's reloader) load the instrumentation too, and would
    hold the port while serving nothing. In multiprocess mode every worker tries the port, and the first one serves
    the sum of all.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self._pid: int | None = None
        self._server: _ThreadingServer | None = None
        self._lock = threading.Lock()

    def ensure_started(self) -> None:
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()  # one attempt per process, whatever comes of it
            address = str(ADDR.value())
            try:
                kind = _ThreadingServer6 if ":" in address else _ThreadingServer
                server = make_server(address, self.port, wsgi_app(), kind, _QuietHandler)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE and _config.current().backend.sees_all_processes:
                    logger.debug("traced_tasks: another worker serves metrics on port %s", self.port)
                else:
                    logger.exception("traced_tasks: cannot serve metrics on port %s", self.port)
                return
            self._server = server
            threading.Thread(target=server.serve_forever, name="traced_tasks-metrics", daemon=True).start()

    def stop(self) -> None:
        with self._lock:
            # In a forked child the serving thread does not exist, and shutdown() would wait for it forever.
            if self._server is not None and self._pid == os.getpid():
                self._server.shutdown()
                self._server.server_close()
            self._server = None
            self._pid = None
