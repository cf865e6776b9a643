"""Celery: tasks that run on a Celery worker keep the spans, series, dashboards and console of in-process ones.

One call, in the module that makes the Celery app, so that it runs in the web process, the worker and beat alike:

    from celery import Celery
    import traced_tasks.celery

    celery_app = Celery("shop", broker="redis://localhost:6379/0")
    traced_tasks.celery.instrument(celery_app)

    @celery_app.task
    def send_receipt(order_id: int) -> None: ...

Then `tasks.add_task(send_receipt, order_id)` publishes `send_receipt` with `apply_async` when the response's
background tasks run, in batch order, as Starlette runs tasks. A direct `send_receipt.delay(...)` is traced the same
way. The worker counts each run under the task's `module.qualname`, in a span that is a child of the one that
scheduled it; with TRACED_TASKS_METRICS_PORT set, it serves /metrics and the task console. Every process that serves
traced_tasks' metrics reads the app's queues; beat serves its schedules.
"""

from __future__ import annotations

import datetime
import functools
import sys
import weakref
from collections.abc import Callable
from typing import Any

import anyio.to_thread
from celery import Celery, Task, signals
from kombu import serialization

from traced_tasks import _engines
from traced_tasks import _worker as contract

__all__ = ["instrument"]

_apps: weakref.WeakSet[Celery] = weakref.WeakSet()


def instrument(app: Celery, *, queues: contract.Queues = None) -> None:
    """Trace and count the tasks of `app`, where they are published, where they run, and where beat sends them.

    Call it once where the app is made; calling it again does nothing. Every registered task has its series at 0 from
    the app's start (see `traced_tasks.declare()`). `queues`: the queues whose backlog is read, by default the app's
    default queue, `task_queues` and the queues of static `task_routes`; a collection of names replaces them, a
    function of the found names edits them (`lambda found: found | {"reports"}`), and `()` reads none.
    """
    if not isinstance(app, Celery):
        raise TypeError(f"instrument() takes a Celery application, got {app!r}")
    contract.check_queues(queues)
    if app in _apps:
        return
    _apps.add(app)
    _engines.install(_ENGINE)
    for signal, receiver in _RECEIVERS.items():
        signal.connect(receiver, weak=False, dispatch_uid=f"traced_tasks.{receiver.__name__}")
    app.on_after_finalize.connect(_declare, weak=False)
    if getattr(app, "finalized", False):  # the app finalized already: its tasks are all registered
        _declare(app)
    contract.watch_queues(contract.CeleryQueues(app, queues))


class _Celery:
    """The Celery engine: a task of an instrumented app, handed over with apply_async."""

    name = "celery"

    def owns(self, func: Callable[..., Any]) -> bool:
        return isinstance(func, Task) and func.app in _apps

    def check(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        task: Any = func
        serialization.dumps((args, kwargs, {}), serializer=task.serializer or task.app.conf.task_serializer)

    async def hand_off(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # apply_async blocks on the broker: off the event loop, in Starlette's threadpool as a sync task would be.
        task: Any = func
        await anyio.to_thread.run_sync(functools.partial(task.apply_async, args, kwargs))


_ENGINE = _Celery()


def _task(name: object) -> Task[Any, Any] | None:
    """The task of an instrumented app that a message of this name runs."""
    for app in list(_apps):
        task = app.tasks.get(name) if isinstance(name, str) else None
        if task is not None:
            return task
    return None


def _before_task_publish(sender: str | None = None, headers: dict[str, Any] | None = None, **_: Any) -> None:
    task = _task(sender)
    if task is not None and headers is not None:
        contract.before_publish(task, headers.get("id"), headers, _eta(headers.get("eta")))


def _after_task_publish(sender: str | None = None, headers: dict[str, Any] | None = None, **_: Any) -> None:
    if headers is not None:
        contract.after_publish(headers.get("id"))


def _eta(eta: object) -> float | None:
    """The Unix time of Celery's `eta` header: ISO 8601, with a zone, or naive and then UTC as Celery takes it."""
    try:
        when = datetime.datetime.fromisoformat(eta)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return (when if when.tzinfo else when.replace(tzinfo=datetime.timezone.utc)).timestamp()


def _task_prerun(task: Task[Any, Any] | None = None, **_: Any) -> None:
    if task is not None and task.app in _apps:
        request = task.request
        contract.begin(task, request, _Carried(request), inline=bool(getattr(request, "is_eager", False)))


class _Carried:
    """A request's custom headers: in request.headers, and attributes of the request on a worker."""

    def __init__(self, request: Any) -> None:
        self._request = request
        headers = getattr(request, "headers", None)
        self._headers = headers if isinstance(headers, dict) else {}

    def get(self, key: str) -> object:
        found = self._headers.get(key)
        return getattr(self._request, key, None) if found is None else found


def _task_failure(sender: Task[Any, Any] | None = None, exception: BaseException | None = None, **_: Any) -> None:
    # A worker's main process sends it too (a hard time limit, a lost process), on no run's request: ignored there.
    if sender is not None and exception is not None:
        contract.failed(sender.request, exception)


def _task_retry(request: Any = None, reason: Any = None, **_: Any) -> None:
    exception = getattr(reason, "exc", None) or reason  # Celery's Retry, and the exception that made it retry
    if request is not None and isinstance(exception, BaseException):
        contract.failed(request, exception)


def _task_postrun(task: Task[Any, Any] | None = None, state: str | None = None, **_: Any) -> None:
    if task is None:
        return
    if state is not None:
        contract.end(task.request, state)
        return
    # No state: an exception Celery does not catch goes through, and this runs in its `finally`. A prefork child's
    # SIGTERM (a hard time limit, revoke(terminate=True)) is billiard's SystemExit(-(256 - signal)).
    raised = sys.exc_info()[1]
    if isinstance(raised, SystemExit) and isinstance(raised.code, int) and -256 < raised.code < 0:
        contract.end(task.request, contract.TERMINATED, time_limit=_hard_limit(task))
    else:
        contract.end(task.request, contract.FAILURE, raised)


def _hard_limit(task: Task[Any, Any]) -> float | None:
    limits = getattr(task.request, "timelimit", None) or (None, None)
    return limits[0] or task.time_limit or task.app.conf.task_time_limit


def _declare(sender: Celery | None = None, **_: Any) -> None:
    if sender is not None and sender in _apps:
        contract.declare(task for name, task in sorted(sender.tasks.items()) if not name.startswith("celery."))


def _worker_ready(sender: Any = None, **_: Any) -> None:
    from celery.concurrency.prefork import TaskPool

    app: Any = getattr(sender, "app", None)
    if app is not None and app in _apps and app.conf.beat_schedule:
        contract.know_schedule(contract.BeatConfig(app, _label))
    contract.serve("celery", runs_in_children=isinstance(getattr(sender, "pool", None), TaskPool))


def _worker_shutdown(**_: Any) -> None:
    contract.stop_serving()
    contract.process_ending()


def _worker_process_shutdown(**_: Any) -> None:
    contract.process_ending()  # a prefork child, which ends with os._exit


def _beat_init(sender: Any = None, **_: Any) -> None:
    scheduler = getattr(sender, "scheduler", None)
    if scheduler is not None and scheduler.app in _apps:
        contract.watch_schedule(contract.BeatSchedule(scheduler, _label))
        tick = scheduler.tick

        @functools.wraps(tick)
        def ticking(*args: Any, **kwargs: Any) -> Any:
            contract.ticked()
            return tick(*args, **kwargs)

        scheduler.tick = ticking  # this beat's scheduler only: beat calls it at every turn of its loop
        contract.serve("celery beat")


def _label(name: str) -> str | None:
    task = _task(name)
    return None if task is None else contract.label(task)


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
    signals.beat_init: _beat_init,
}
