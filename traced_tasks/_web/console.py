"""The task console: one page for people, and the JSON it reads, which scripts can read too.

What it shows comes from the metrics backend: the counts, summed over every process in multiprocess mode as /metrics
is; and the runs in progress and the last failures, of this process and, in multiprocess mode, of every live
process that shares the folder.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import json
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from importlib import resources
from typing import Any

import anyio.to_thread
from opentelemetry import trace
from prometheus_client.metrics_core import Metric
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from traced_tasks import _config
from traced_tasks import _conventions as names
from traced_tasks._options import HUNG_AFTER
from traced_tasks._web.access import Guard

# The console renders in a thread of its own, one request at a time: never in the threads /metrics renders in, so that
# a scrape never waits behind it.
CONSOLE = anyio.CapacityLimiter(1)

# A run in progress for longer than this is hung, as the BackgroundTaskHung alert has it.
HUNG_AFTER_SECONDS = 15 * 60

logger = logging.getLogger("traced_tasks")

PAGE = resources.files("traced_tasks._web").joinpath("console.html").read_text(encoding="utf-8")
_TRACE_ID = "{trace_id}"


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
    if (
        not isinstance(trace_url, str)
        or _TRACE_ID not in trace_url
        or not trace_url.startswith(("http://", "https://"))
    ):
        raise ValueError(
            f"trace_url must be an http(s) URL template with {_TRACE_ID}, such as "
            f"'http://jaeger:16686/trace/{_TRACE_ID}', got {trace_url!r}"
        )


def make_console_app(
    *, trace_url: str | None = None, bearer_token: str | None = None, hung_after: float | None = None
) -> ASGIApp:
    """An ASGI app that serves the task console: what runs now, what failed lately, and each task's counts and
    run times, updated in place every few seconds. Mount it where people can reach it:

        app.mount("/tasks", traced_tasks.make_console_app(trace_url="http://jaeger:16686/trace/{trace_id}"))

    `trace_url`, with `{trace_id}`, links each failure to its trace. A run in progress for more than `hung_after`
    seconds is marked hung: by default TRACED_TASKS_HUNG_AFTER, read at each request, or 15 minutes, as the
    BackgroundTaskHung alert has it. Requests need `Authorization: Bearer
    <token>` when `bearer_token` is given, or else when TRACED_TASKS_METRICS_TOKEN is set at the time of the
    request, as for `/metrics`. `data.json`, beside the page, holds the same data for scripts.
    """
    check_trace_url(trace_url)
    if hung_after is not None and not _seconds(hung_after):
        raise ValueError(f"hung_after must be a positive, finite number of seconds, got {hung_after!r}")
    guard = Guard(bearer_token)

    async def console_app(scope: Scope, receive: Receive, send: Send) -> None:
        if not await guard.admit(scope, receive, send):
            return
        path = _route_path(scope)
        if path in ("", "/", "/index.html"):
            response = Response(PAGE, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)
        elif path == "/data.json":
            arrived = time.monotonic()
            body = await anyio.to_thread.run_sync(data_json, trace_url, hung_after, arrived, limiter=CONSOLE)
            response = Response(body, media_type="application/json", headers=JSON_HEADERS)
        else:
            response = Response("not found\n", 404, media_type="text/plain")
        await response(scope, receive, send)

    return console_app


def _seconds(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value < math.inf


def hung_after_seconds() -> float:
    """TRACED_TASKS_HUNG_AFTER, or 15 minutes when it is unset or not a positive number of seconds (said once)."""
    value = HUNG_AFTER.value()
    if value is None:
        return HUNG_AFTER_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not _seconds(seconds):
        if value not in _refused:
            _refused.add(value)
            logger.error("traced_tasks: %s=%r is not a positive number of seconds; 900 it is", HUNG_AFTER.name, value)
        return HUNG_AFTER_SECONDS
    return seconds


_refused: set[str] = set()


def _route_path(scope: Scope) -> str:
    """The path within this app: Starlette's Mount keeps the whole path in the scope and the prefix in root_path."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        return path[len(root_path) :]
    return path


def data_json(trace_url: str | None, hung_after: float | None = None, arrived: float | None = None) -> bytes:
    """data.json for a request that arrived at `arrived` (time.monotonic(); now by default). One render at a time: a
    request takes the last render when that began after the request arrived, so that many open tabs or a slow render
    cost one render more, not one each."""
    arrived = time.monotonic() if arrived is None else arrived
    hung_after = hung_after_seconds() if hung_after is None else hung_after
    key = (_config.current(), trace_url, hung_after)
    with _rendering:
        if _rendered.key == key and _rendered.began >= arrived:
            return _rendered.body
        began = time.monotonic()
        body = json.dumps(snapshot(trace_url, hung_after), separators=(",", ":"), allow_nan=False).encode()
        _rendered.key, _rendered.began, _rendered.body = key, began, body
        return body


class _Rendered:
    key: tuple[object, str | None, float] | None = None
    began = 0.0
    body = b""


_rendering = threading.Lock()
_rendered = _Rendered()


def snapshot(trace_url: str | None = None, hung_after: float = HUNG_AFTER_SECONDS) -> dict[str, Any]:
    """Everything the page shows, in seconds and Unix times; never a task's arguments or an exception's message.
    Counts, runs in progress and failures are those of every process the backend sums (every worker in multiprocess
    mode), the runs in progress listed up to MAX_LISTED, the oldest first."""
    config = _config.current()
    now = time.time()
    activity = config.backend.activity(config.activity)
    tasks = _tasks(config.backend.collect(), config.options.prefix, config.options.buckets)
    for task in tasks:
        _, oldest = activity.by_label.get(task["task"], (0, None))
        task["oldest_running_seconds"] = None if oldest is None else max(0.0, now - oldest)
        task["hung"] = oldest is not None and now - oldest > hung_after
        # A task handed to an engine starts where the engine runs it: this process cannot tell which never did.
        task["runs_on"] = activity.handed_off.get(task["task"])
        if task["runs_on"] is not None:
            task["not_started"] = None
    running = [
        {
            "task": run.task,
            "label": run.label,
            "route": run.route,
            "started_at": run.started_at,
            "seconds": max(0.0, now - run.started_at),
            "hung": now - run.started_at > hung_after,
            "pid": run.pid,
        }
        for run in activity.listed
    ]
    failures = [
        {
            "finished_at": run.finished_at,
            "task": run.task,
            "route": run.route,
            "status": run.status,
            "exception": run.exception,
            "seconds": run.duration,
            "trace_id": run.trace_id,
            "trace_url": trace_url.replace(_TRACE_ID, run.trace_id) if trace_url and run.trace_id else None,
        }
        for run in activity.failures
    ]
    return {
        "service": _service_name(),
        "pid": os.getpid(),
        "now": now,
        "workers": config.backend.processes(),
        "hung_after_seconds": hung_after,
        "totals": _totals(tasks),
        "tasks": sorted(tasks, key=_trouble),
        "running": running,
        "running_not_listed": max(0, activity.running - len(running)),
        "failures": failures,
    }


def _tasks(families: Iterable[Metric], prefix: str, bounds: Iterable[float]) -> list[dict[str, Any]]:
    """Per task, over routes: the counts, the percentiles of run time and wait, and the run-time buckets."""
    bounds = list(bounds)
    by_task: dict[str, dict[str, Any]] = {}

    def task(sample_labels: Mapping[str, str]) -> dict[str, Any]:
        name = sample_labels[names.LABEL_TASK]
        found = by_task.get(name)
        if found is None:
            found = by_task[name] = {
                "task": name,
                "scheduled": 0.0,
                "started": 0.0,
                "succeeded": 0.0,
                "failed": 0.0,
                "cancelled": 0.0,
                "skipped": 0.0,
                "running": 0.0,
                "last_success_at": None,
                "run_buckets": [0.0] * (len(bounds) + 1),
                "wait_buckets": [0.0] * (len(bounds) + 1),
            }
        return found

    outcome = {
        names.STATUS_SUCCESS: "succeeded",
        names.STATUS_ERROR: "failed",
        names.STATUS_CANCELLED: "cancelled",
    }
    for family in families:
        name = family.name[len(prefix) :]
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            labels = sample.labels
            if name == names.SCHEDULED.name and sample.name.endswith("_total"):
                task(labels)["scheduled"] += sample.value
            elif name == names.SKIPPED.name and sample.name.endswith("_total"):
                task(labels)["skipped"] += sample.value
            elif name == names.IN_PROGRESS.name:
                task(labels)["running"] += sample.value
            elif name == names.LAST_SUCCESS.name and sample.value > 0:
                entry = task(labels)
                entry["last_success_at"] = max(entry["last_success_at"] or 0.0, sample.value)
            elif name == names.DURATION.name and sample.name.endswith("_count"):
                task(labels)[outcome.get(labels.get(names.LABEL_STATUS, ""), "failed")] += sample.value
            elif name == names.DURATION.name and sample.name.endswith("_bucket"):
                _add_bucket(task(labels)["run_buckets"], bounds, labels["le"], sample.value)
            elif name == names.WAIT.name and sample.name.endswith("_bucket"):
                _add_bucket(task(labels)["wait_buckets"], bounds, labels["le"], sample.value)
            elif name == names.WAIT.name and sample.name.endswith("_count"):
                task(labels)["started"] += sample.value
    tasks = []
    for entry in by_task.values():
        run_buckets, wait_buckets = _per_bucket(entry.pop("run_buckets")), _per_bucket(entry.pop("wait_buckets"))
        finished = entry["succeeded"] + entry["failed"] + entry["cancelled"]
        entry["finished"] = finished
        # A run is counted as started when its wait is observed: what is neither started nor skipped was dropped
        # (the endpoint raised after add_task, say), or still waits.
        entry["not_started"] = max(0.0, entry["scheduled"] - entry.pop("started") - entry["skipped"])
        entry["error_ratio"] = entry["failed"] / finished if finished else None
        entry["run_seconds"] = {"p50": _quantile(0.5, run_buckets, bounds), "p95": _quantile(0.95, run_buckets, bounds)}
        entry["wait_seconds"] = {
            "p50": _quantile(0.5, wait_buckets, bounds),
            "p95": _quantile(0.95, wait_buckets, bounds),
        }
        entry["run_histogram"] = [
            {"le": bound, "runs": count} for bound, count in zip([*bounds, None], run_buckets, strict=True)
        ]
        tasks.append(entry)
    return tasks


def _add_bucket(cumulative: list[float], bounds: list[float], le: str, value: float) -> None:
    index = len(bounds) if le == "+Inf" else bisect.bisect_left(bounds, float(le))
    cumulative[index] += value


def _per_bucket(cumulative: list[float]) -> list[float]:
    return [count - (cumulative[index - 1] if index else 0.0) for index, count in enumerate(cumulative)]


def _quantile(q: float, per_bucket: list[float], bounds: list[float]) -> float | None:
    """As Prometheus's histogram_quantile, over every run so far: linear within the bucket, the highest finite
    bound for the +Inf bucket."""
    total = sum(per_bucket)
    if not total:
        return None
    rank = q * total
    seen = 0.0
    for index, count in enumerate(per_bucket):
        if count and seen + count >= rank:
            if index == len(bounds):
                return bounds[-1]
            lower = bounds[index - 1] if index else 0.0
            return lower + (bounds[index] - lower) * (rank - seen) / count
        seen += count
    return bounds[-1]


def _totals(tasks: list[dict[str, Any]]) -> dict[str, Any]:
    finished = sum(task["finished"] for task in tasks)
    failed = sum(task["failed"] for task in tasks)
    oldest = [task["oldest_running_seconds"] for task in tasks if task["oldest_running_seconds"] is not None]
    return {
        "finished": finished,
        "failed": failed,
        "error_ratio": failed / finished if finished else None,
        "skipped": sum(task["skipped"] for task in tasks),
        "running": sum(task["running"] for task in tasks),
        "not_started": sum(task["not_started"] or 0.0 for task in tasks),
        "oldest_running_seconds": max(oldest, default=None),
        "hung": sum(1 for task in tasks if task["hung"]),  # tasks with a run in progress past hung_after
    }


def _trouble(task: dict[str, Any]) -> tuple[int, float, float, str]:
    """Hung first, then by error ratio, then by p95 run time."""
    ratio = task["error_ratio"] or 0.0
    p95 = task["run_seconds"]["p95"] or 0.0
    return (0 if task["hung"] else 1, -ratio, -p95, task["task"])


def _service_name() -> str:
    resource = getattr(trace.get_tracer_provider(), "resource", None)
    name = getattr(resource, "attributes", {}).get("service.name")
    if isinstance(name, str) and not name.startswith("unknown_service"):
        return name
    return os.path.basename(sys.argv[0]) or "python"
