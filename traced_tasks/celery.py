"""Celery: tasks that run on a Celery worker keep the spans, series, dashboards and console of in-process ones.

One call, in the module that makes the Celery app, so that it runs in the web process and in the worker alike:

    from celery import Celery
    import traced_tasks.celery

    celery_app = Celery("shop", broker="redis://localhost:6379/0")
    traced_tasks.celery.instrument(celery_app)

    @celery_app.task
    def send_receipt(order_id: int) -> None: ...

Then `tasks.add_task(send_receipt, order_id)` publishes `send_receipt` with `apply_async` when the response's
background tasks run, in batch order, as Starlette runs tasks: not if the endpoint raised, and not if an earlier
task of the batch failed (it is counted as skipped). Arguments that Celery cannot serialize fail at add_task with
Celery's own error. A direct `send_receipt.delay(...)` is traced the same way.

The web process counts the task as scheduled, or skipped, and a publish that fails (the broker is down) as a run
that failed there. The worker counts the run: its wait since it was scheduled, its run time, outcome and exception
class, under the task's `module.qualname`, in a span that is a child of the span that scheduled it. With
TRACED_TASKS_METRICS_PORT set, the worker serves /metrics and the task console from its start.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import logging
import weakref
from collections.abc import Callable
from typing import Any

import anyio.to_thread
from celery import Celery, Task, signals
from kombu import serialization
from opentelemetry import propagate

from traced_tasks import _config, _engines, _run, _shutdown
from traced_tasks import _conventions as names
from traced_tasks._web import server

__all__ = ["instrument"]

logger = logging.getLogger("traced_tasks")

_apps: weakref.WeakSet[Celery] = weakref.WeakSet()
_RUN = "_traced_tasks_run"  # the Run of a task's execution, on its task.request
_ERROR = "_traced_tasks_error"  # the exception it ended with, from task_failure or task_retry


def instrument(app: Celery) -> None:
    """Trace and count the tasks of `app`, in the process that publishes them and in the worker that runs them.

    Call it once where the app is made, so that the web process and the worker both run it; calling it again does
    nothing. Every task registered with the app has its series at 0 from the app's start (see
    `traced_tasks.declare()`).
    """
    if not isinstance(app, Celery):
        raise TypeError(f"instrument() takes a Celery application, got {app!r}")
    if app in _apps:
        return
    _apps.add(app)
    _engines.install(_ENGINE)
    for signal, receiver in _RECEIVERS.items():
        signal.connect(receiver, weak=False, dispatch_uid=f"traced_tasks.{receiver.__name__}")
    app.on_after_finalize.connect(_declare, weak=False)
    if getattr(app, "finalized", False):  # the app finalized already: its tasks are all registered
        _declare(app)


class _Celery:
    """The Celery engine: a task of an instrumented app, handed over with apply_async."""

    name = "celery"

    def owns(self, func: Callable[..., Any]) -> bool:
        return isinstance(func, Task) and func.app in _apps

    def check(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        task: Any = func
        serialization.dumps((args, kwargs, {}), serializer=task.serializer or task.app.conf.task_serializer)

    async def hand_off(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], carried: dict[str, str]
    ) -> None:
        # apply_async blocks on the broker: off the event loop, in Starlette's threadpool as a sync task would be.
        task: Any = func
        await anyio.to_thread.run_sync(functools.partial(task.apply_async, args, kwargs, headers=carried))


_ENGINE = _Celery()


def _task(name: str) -> Task[Any, Any] | None:
    """The task of an instrumented app that a message of this name runs."""
    for app in list(_apps):
        task = app.tasks.get(name)
        if task is not None:
            return task
    return None


def _before_task_publish(sender: str | None = None, headers: dict[str, Any] | None = None, **_: Any) -> None:
    # A publish made elsewhere than add_task: task.delay(), apply_async(), a retry. Its message gets the context
    # current now (in a worker, the span of the run that retries), the time it is meant to start, and the route.
    if _engines.is_handing_off() or headers is None or sender is None:
        return
    task = _task(sender)
    if task is None:
        return
    config = _config.current()
    run = _run.capture(config, task, headers.get(names.CARRIED_ROUTE))
    if run is not None:
        headers.update(run.carried(starts_at=_eta(headers.get("eta"))))


def _after_task_publish(sender: str | None = None, headers: dict[str, Any] | None = None, **_: Any) -> None:
    if _engines.is_handing_off() or headers is None or sender is None:
        return
    task = _task(sender)
    if task is not None:
        _run.published(_config.current(), task, headers)


def _eta(eta: object) -> float | None:
    """The Unix time of Celery's `eta` header: ISO 8601, with a zone, or naive and then UTC as Celery takes it."""
    if not isinstance(eta, str):
        return None
    try:
        when = datetime.datetime.fromisoformat(eta)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


def _task_prerun(task: Task[Any, Any] | None = None, **_: Any) -> None:
    if task is None or task.app not in _apps:
        return
    request = task.request
    config = _config.current()
    try:
        run = _run.received(config, task, _carried(request))
    except Exception:
        config.report("task setup", task.name)
        return
    setattr(request, _RUN, run)
    run.__enter__()


def _carried(request: Any) -> dict[str, Any]:
    """What traced_tasks and the propagator put in the message's headers: custom headers are attributes of the
    request on a worker, and in request.headers when the task runs eagerly."""
    headers = getattr(request, "headers", None) or {}
    keys = {*propagate.get_global_textmap().fields, names.CARRIED_SCHEDULED_AT, names.CARRIED_ROUTE}
    carried = {}
    for key in keys:
        value = headers.get(key) if isinstance(headers, dict) else None
        if value is None:
            value = getattr(request, key, None)
        if value is not None:
            carried[key] = value
    return carried


def _task_failure(sender: Task[Any, Any] | None = None, exception: BaseException | None = None, **_: Any) -> None:
    # Only on a run's own request: a worker's main process sends task_failure too (a hard time limit, a lost
    # worker process), where task.request is the task's default one, shared and never cleared.
    if sender is not None and exception is not None and getattr(sender.request, _RUN, None) is not None:
        setattr(sender.request, _ERROR, exception)


def _task_retry(sender: Task[Any, Any] | None = None, request: Any = None, reason: Any = None, **_: Any) -> None:
    # `reason` is Celery's Retry, whose `exc` is the exception that made the task retry, when there is one.
    exception = getattr(reason, "exc", None) or reason
    if request is not None and isinstance(exception, BaseException) and getattr(request, _RUN, None) is not None:
        setattr(request, _ERROR, exception)


# Celery's final states, and what each run counts as: a retried run is a run that failed, and its retry a new one.
_CANCELLED = {"REVOKED"}
_FAILED = {"FAILURE", "RETRY", "REJECTED"}


def _task_postrun(task: Task[Any, Any] | None = None, state: str | None = None, retval: Any = None, **_: Any) -> None:
    if task is None:
        return
    request = task.request
    run: _run.Run | None = getattr(request, _RUN, None)
    if run is None:
        return
    exception: BaseException | None = None
    if state in _CANCELLED:
        exception = asyncio.CancelledError(state)
    elif state in _FAILED:
        found = getattr(request, _ERROR, None) or retval
        exception = found if isinstance(found, BaseException) else _engines.TaskFailed()
    run.__exit__(None if exception is None else type(exception), exception, None)
    setattr(request, _RUN, None)
    setattr(request, _ERROR, None)


def _declare(sender: Celery | None = None, **_: Any) -> None:
    app = sender
    if app is None or app not in _apps:
        return
    _config.declare(*(task for name, task in sorted(app.tasks.items()) if not name.startswith("celery.")))


_metrics_server: server.MetricsServer | None = None


def _worker_ready(sender: Any = None, **_: Any) -> None:
    # In the worker's main process, once its pool has started: the processes of a prefork pool count where this one
    # can read them only in multiprocess mode, and one of them holds no port.
    global _metrics_server
    if _metrics_server is not None:
        return
    metrics_server = server.from_environment()
    if metrics_server is None:
        return
    if _runs_in_child_processes(sender) and server.counts_this_process_only():
        logger.error(
            "traced_tasks: this Celery worker runs its tasks in prefork child processes, which count on their own, "
            "and its main process runs none: it does not serve port %s, rather than serve no counts at all. The port "
            "shows the children's counts in multiprocess mode, with PROMETHEUS_MULTIPROC_DIR set to an empty folder "
            "before the worker starts and metrics through prometheus_client",
            metrics_server.port,
        )
        return
    _metrics_server = metrics_server
    _metrics_server.ensure_started()


def _runs_in_child_processes(consumer: Any) -> bool:
    from celery.concurrency.prefork import TaskPool

    return isinstance(getattr(consumer, "pool", None), TaskPool)


def _worker_process_shutdown(**_: Any) -> None:
    # In a prefork child, which ends with os._exit, so without the SDK's own export at exit.
    _shutdown.flush_process()


def _worker_shutdown(**_: Any) -> None:
    global _metrics_server
    if _metrics_server is not None:
        _metrics_server.stop()
        _metrics_server = None


_RECEIVERS: dict[Any, Callable[..., None]] = {
    signals.before_task_publish: _before_task_publish,
    signals.after_task_publish: _after_task_publish,
    signals.task_prerun: _task_prerun,
    signals.task_failure: _task_failure,
    signals.task_retry: _task_retry,
    signals.task_postrun: _task_postrun,
    signals.worker_ready: _worker_ready,
    signals.worker_shutdown: _worker_shutdown,
    signals.worker_process_shutdown: _worker_process_shutdown,
}
