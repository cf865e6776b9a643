"""What the task console shows, as one answer: every figure of it from one snapshot of the backend (its totals, and
the runs and failures of the processes it sees), the queues' last read and the schedules, in seconds and Unix times.
Never a task's arguments or an exception's message."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace

from traced_tasks import _config, _queues, _schedules
from traced_tasks import _conventions as names
from traced_tasks._backends import TaskTotals
from traced_tasks._options import BACKLOG_AGE_SECONDS, QUEUE_STALE_SECONDS, SCHEDULE_GRACE_SECONDS

TRACE_ID = "{trace_id}"


def report(
    trace_url: str | None,
    hung_after: float,
    engine_consoles: Mapping[str, str] | None = None,
    stacks: bool = False,
) -> dict[str, Any]:
    """Everything the page shows. `stacks`: where each hung run waits, which costs a walk of its frames."""
    config = _config.current()
    backend = config.backend
    now = time.time()
    view = backend.activity(config.activity, hung_after if stacks else None)
    totals = _by_task(backend.totals())
    consoles = dict(engine_consoles or {})
    tasks = []
    for name in sorted(set(totals) | set(view.by_label) | set(view.handed_off)):
        found = totals.get(name)
        running, oldest = view.by_label.get(name, (0, None))
        engine = view.handed_off.get(name)
        tasks.append(_task(name, found, running, oldest, now, hung_after, engine, consoles.get(engine or "")))
    running_list = [
        {
            "task": run.task,
            "label": run.label,
            "route": run.route,
            "started_at": run.started_at,
            "seconds": max(0.0, now - run.started_at),
            "hung": now - run.started_at > hung_after,
            "pid": run.pid,
            "trace_id": run.trace_id,
            "trace_url": _trace_url(trace_url, run.trace_id),
            "where": run.where,
        }
        for run in view.listed
    ]
    failures = [
        {
            "task": group.task,
            "status": group.status,
            "exception": group.exception,
            "count": group.count,
            "first_at": group.first_at,
            "last_at": group.last_at,
            "route": group.route,
            "seconds": group.seconds,
            "traces": [
                {"trace_id": trace_id, "trace_url": _trace_url(trace_url, trace_id)} for trace_id in group.traces
            ],
        }
        for group in view.failures
    ]
    oldest_runs = [task["oldest_running_seconds"] for task in tasks if task["oldest_running_seconds"] is not None]
    finished = sum(task["finished"] for task in tasks)
    failed = sum(task["failed"] for task in tasks)
    waiting = _waiting(now)
    schedules = _schedule(totals, now)
    return {
        "service": _service_name(),
        "pid": os.getpid(),
        "now": now,
        "processes": backend.processes(),
        "sees_all_processes": backend.sees_all_processes,
        "hung_after_seconds": hung_after,
        "totals": {
            "finished": finished,
            "failed": failed,
            "error_ratio": failed / finished if finished else None,
            "skipped": sum(task["skipped"] for task in tasks),
            "running": view.running,
            "not_started": sum(task["not_started"] or 0.0 for task in tasks),
            "oldest_running_seconds": max(oldest_runs, default=None),
            "hung": sum(1 for task in tasks if task["hung"]),  # tasks with a run in progress past hung_after
            "waiting": sum(queue["depth"] or 0.0 for queue in waiting),
            "oldest_waiting_seconds": max(
                (q["oldest_seconds"] for q in waiting if q["oldest_seconds"] is not None), default=None
            ),
            "queues_flagged": sum(1 for queue in waiting if queue["flags"]),
            "overdue": sum(1 for schedule in schedules if schedule["overdue"]),
        },
        "tasks": sorted(tasks, key=_trouble),
        "running": running_list,
        "running_not_listed": max(0, view.running - len(running_list)),
        "failures": failures,
        "waiting": waiting,
        "schedules": schedules,
    }


def _by_task(totals: list[TaskTotals]) -> dict[str, TaskTotals]:
    """The totals of each task, over its routes."""
    found: dict[str, TaskTotals] = {}
    for entry in totals:
        known = found.get(entry.task)
        if known is None:
            found[entry.task] = TaskTotals((entry.task,), entry.bounds)
            known = found[entry.task]
        known.add(entry)
    return found


def _task(
    name: str,
    totals: TaskTotals | None,
    running: int,
    oldest: float | None,
    now: float,
    hung_after: float,
    engine: str | None,
    console: str | None,
) -> dict[str, Any]:
    bounds = list(totals.bounds) if totals is not None else []
    outcomes = totals.outcomes if totals is not None else {}
    succeeded = outcomes.get(names.STATUS_SUCCESS, 0.0)
    failed = outcomes.get(names.STATUS_ERROR, 0.0)
    cancelled = outcomes.get(names.STATUS_CANCELLED, 0.0)
    finished = succeeded + failed + cancelled
    scheduled = totals.scheduled if totals is not None else 0.0
    skipped = totals.skipped if totals is not None else 0.0
    started = totals.started if totals is not None else 0.0
    run_buckets = totals.run_buckets if totals is not None else []
    wait_buckets = totals.wait_buckets if totals is not None else []
    return {
        "task": name,
        "scheduled": scheduled,
        "succeeded": succeeded,
        "failed": failed,
        "cancelled": cancelled,
        "finished": finished,
        "skipped": skipped,
        "running": running,
        "oldest_running_seconds": None if oldest is None else max(0.0, now - oldest),
        "hung": oldest is not None and now - oldest > hung_after,
        # A task handed to an engine starts where the engine runs it: this process cannot tell which never did.
        "runs_on": engine,
        "console_url": console if engine is not None else None,
        "not_started": None if engine is not None else max(0.0, scheduled - started - skipped),
        "error_ratio": failed / finished if finished else None,
        "last_success_at": totals.last_success or None if totals is not None else None,
        "run_seconds": {"p50": quantile(0.5, run_buckets, bounds), "p95": quantile(0.95, run_buckets, bounds)},
        "wait_seconds": {"p50": quantile(0.5, wait_buckets, bounds), "p95": quantile(0.95, wait_buckets, bounds)},
        "run_histogram": [
            {"le": bound, "runs": count} for bound, count in zip([*bounds, None], run_buckets, strict=False)
        ],
    }


def quantile(q: float, per_bucket: list[float], bounds: list[float]) -> float | None:
    """As Prometheus's histogram_quantile, over every run so far, from runs per bucket: linear within the bucket, the
    highest finite bound for the +Inf bucket."""
    total = sum(per_bucket)
    if not total or not bounds:
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


def _waiting(now: float) -> list[dict[str, Any]]:
    """Each watched queue at its last read, flagged as the alerts would flag it."""
    found = []
    for engine, queue, read_at in _queues.waiting():
        age = None if queue.oldest is None else max(0.0, now - queue.oldest)
        flags = []
        if age is not None and age > BACKLOG_AGE_SECONDS:
            flags.append("old")
        if queue.consumers == 0 and (queue.depth or 0) > 0:
            flags.append("no consumer")
        if read_at is None or now - read_at > QUEUE_STALE_SECONDS:
            flags.append("not read")
        found.append(
            {
                "engine": engine,
                "queue": queue.name,
                "depth": queue.depth,
                "oldest_seconds": age,
                "consumers": queue.consumers,
                "read_seconds_ago": None if read_at is None else max(0.0, now - read_at),
                "flags": flags,
            }
        )
    return found


def _schedule(totals: Mapping[str, TaskTotals], now: float) -> list[dict[str, Any]]:
    """Each scheduled task this process knows the schedule of: period, next due, last success, overdue."""
    found = []
    for watcher in _schedules.watching():
        for due in watcher.dues():
            task = totals.get(due.task)
            last = task.last_success if task is not None and task.last_success else None
            limit = None if due.period is None else due.period + SCHEDULE_GRACE_SECONDS
            overdue = limit is not None and last is not None and now - last > limit
            found.append(
                {
                    "task": due.task,
                    "period_seconds": due.period,
                    "next_at": due.next_at,
                    "last_success_at": last,
                    "overdue": overdue,
                }
            )
    return found


def _trace_url(template: str | None, trace_id: str | None) -> str | None:
    return template.replace(TRACE_ID, trace_id) if template and trace_id else None


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
