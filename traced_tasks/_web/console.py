"""The task console: one page for people, and the JSON it reads, which scripts can read too (see `report`).

What it shows comes from the metrics backend: the counts, summed over every process in multiprocess mode as /metrics
is; and the runs in progress and the failures, of this process and, in multiprocess mode, of every live process
that shares the folder; with the queues and schedules this process watches.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import threading
import time
from collections.abc import Mapping
from importlib import resources

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from traced_tasks import _config
from traced_tasks._options import CONSOLE_URLS, HUNG_AFTER, HUNG_AFTER_SECONDS
from traced_tasks._web.access import Guard
from traced_tasks._web.report import TRACE_ID, report

# The console renders in a thread of its own, one request at a time: never in the threads /metrics renders in, so that
# a scrape never waits behind it.
CONSOLE = anyio.CapacityLimiter(1)

PAGE = resources.files("traced_tasks._web").joinpath("console.html").read_text(encoding="utf-8")


def _csp(page: str) -> str:
    """A Content-Security-Policy that allows the page's own inline script and style, and nothing else."""

    def digest(tag: str) -> str:
        (body,) = re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.DOTALL)
        return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"

    return (
        f"default-src 'none'; script-src {digest('script')}; style-src {digest('style')}; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


PAGE_HEADERS = {
    "Content-Security-Policy": _csp(PAGE),
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
JSON_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


def check_trace_url(trace_url: str | None) -> None:
    if trace_url is None:
        return
    if not isinstance(trace_url, str) or TRACE_ID not in trace_url or not trace_url.startswith(("http://", "https://")):
        raise ValueError(
            f"trace_url must be an http(s) URL template with {TRACE_ID}, such as "
            f"'http://jaeger:16686/trace/{TRACE_ID}', got {trace_url!r}"
        )


def check_engine_consoles(engine_consoles: object) -> None:
    if engine_consoles is None:
        return
    if not isinstance(engine_consoles, Mapping) or not all(
        isinstance(engine, str) and isinstance(url, str) and url.startswith(("http://", "https://", "/"))
        for engine, url in engine_consoles.items()
    ):
        raise ValueError(
            "engine_consoles must map an engine's name to the URL of its workers' console, such as "
            f"{{'celery': 'http://worker:9100/tasks/'}}, got {engine_consoles!r}"
        )


def make_console_app(
    *,
    trace_url: str | None = None,
    bearer_token: str | None = None,
    hung_after: float | None = None,
    engine_consoles: Mapping[str, str] | None = None,
) -> ASGIApp:
    """An ASGI app that serves the task console: what runs now and where it waits, what failed lately, what waits in
    the queues, the schedules, and each task's counts and run times, updated in place every few seconds. Mount it
    where people can reach it:

        app.mount("/tasks", traced_tasks.make_console_app(trace_url="http://jaeger:16686/trace/{trace_id}"))

    `trace_url`, with `{trace_id}`, links each failure to its trace. A run in progress for more than `hung_after`
    seconds is marked hung: by default TRACED_TASKS_HUNG_AFTER, read at each request, or 15 minutes, as the
    BackgroundTaskHung alert has it. `engine_consoles` maps an engine's name (`celery`, `taskiq`) to the console of
    its workers, which the tasks this process hands over link to; by default TRACED_TASKS_CONSOLE_URLS. Requests need
    `Authorization: Bearer <token>` when `bearer_token` is given, or else when TRACED_TASKS_METRICS_TOKEN is set at
    the time of the request, as for `/metrics`. `data.json`, beside the page, holds the same data for scripts.
    """
    check_trace_url(trace_url)
    if hung_after is not None and not _seconds(hung_after):
        raise ValueError(f"hung_after must be a positive, finite number of seconds, got {hung_after!r}")
    check_engine_consoles(engine_consoles)
    guard = Guard(bearer_token)

    async def console_app(scope: Scope, receive: Receive, send: Send) -> None:
        if not await guard.admit(scope, receive, send):
            return
        path = _route_path(scope)
        if path in ("", "/", "/index.html"):
            response = Response(PAGE, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)
        elif path == "/data.json":
            arrived = time.monotonic()
            stacks = Request(scope).query_params.get("stacks") == "1"
            body = await anyio.to_thread.run_sync(
                data_json, trace_url, hung_after, arrived, engine_consoles, stacks, limiter=CONSOLE
            )
            response = Response(body, media_type="application/json", headers=JSON_HEADERS)
        else:
            response = Response("not found\n", 404, media_type="text/plain")
        await response(scope, receive, send)

    return console_app


def _seconds(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value < math.inf


def _route_path(scope: Scope) -> str:
    """The path within this app: Starlette's Mount keeps the whole path in the scope and the prefix in root_path."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        return path[len(root_path) :]
    return path


def data_json(
    trace_url: str | None,
    hung_after: float | None = None,
    arrived: float | None = None,
    engine_consoles: Mapping[str, str] | None = None,
    stacks: bool = False,
) -> bytes:
    """data.json for a request that arrived at `arrived` (time.monotonic(); now by default). One render at a time: a
    request takes the last render when that began after the request arrived, so that many open tabs or a slow render
    cost one render more, not one each."""
    arrived = time.monotonic() if arrived is None else arrived
    hung_after = (HUNG_AFTER.value() or HUNG_AFTER_SECONDS) if hung_after is None else hung_after
    consoles = engine_consoles if engine_consoles is not None else CONSOLE_URLS.value()
    key = (_config.current(), trace_url, hung_after, tuple(sorted((consoles or {}).items())), stacks)
    with _rendering:
        if _rendered.key == key and _rendered.began >= arrived:
            return _rendered.body
        began = time.monotonic()
        answer = report(trace_url, hung_after, consoles, stacks)
        body = json.dumps(answer, separators=(",", ":"), allow_nan=False).encode()
        _rendered.key, _rendered.began, _rendered.body = key, began, body
        return body


class _Rendered:
    key: tuple[object, ...] | None = None
    began = 0.0
    body = b""


_rendering = threading.Lock()
_rendered = _Rendered()
