"""Drop-in replacements for Starlette's BackgroundTask and BackgroundTasks.

The bodies are module functions so that the instrumentor can put them on Starlette's own classes.
"""

from __future__ import annotations

import inspect
import logging
import time
import types
from collections.abc import Callable
from typing import Any, ParamSpec

from starlette import background
from starlette._utils import is_async_callable
from starlette.concurrency import run_in_threadpool

from traced_tasks import _config
from traced_tasks._telemetry import Scheduled, is_cancellation

P = ParamSpec("P")
logger = logging.getLogger("traced_tasks")


def schedule(task: background.BackgroundTask, func: Callable[..., Any], args: Any, kwargs: Any) -> None:
    """Starlette's BackgroundTask.__init__, then schedule the task: count it, start its wait clock, capture context."""
    if not callable(func):
        raise TypeError(f"a background task must be callable, got {func!r}")
    task.func = func
    task.args = args
    task.kwargs = kwargs
    task.is_async = _is_async_callable(func)
    task._traced = _config.current().schedule(func)  # type: ignore[attr-defined]


def _is_async_callable(func: Callable[..., Any]) -> bool:
    """Starlette's is_async_callable, answered from the code flags first for async functions and methods."""
    target = func.__func__ if type(func) is types.MethodType else func
    if type(target) is types.FunctionType and target.__code__.co_flags & inspect.CO_COROUTINE:
        return True
    return is_async_callable(func)


async def run(task: background.BackgroundTask) -> None:
    """Run one task inside its span, counting its outcome."""
    scheduled: Scheduled | None = getattr(task, "_traced", None)  # None: made before instrumentation
    if scheduled is None:
        await _call(task)
        return
    target = scheduled.target
    telemetry = target.telemetry
    span, token = telemetry.start(scheduled)
    started_ns = time.perf_counter_ns()
    try:
        # _call(task), written out: a coroutine less per run.
        if task.is_async:
            await task.func(*task.args, **task.kwargs)
        else:
            await run_in_threadpool(task.func, *task.args, **task.kwargs)
    except BaseException as exc:
        telemetry.finish(target.metrics, span, token, started_ns, exc)
        raise
    telemetry.finish(target.metrics, span, token, started_ns, None)


async def _call(task: background.BackgroundTask) -> None:
    # Not Starlette's __call__: instrumentations patch it, and each task gets one span, ours.
    if task.is_async:
        await task.func(*task.args, **task.kwargs)
    else:
        await run_in_threadpool(task.func, *task.args, **task.kwargs)


async def run_batch(batch: background.BackgroundTasks) -> None:
    """Run a batch in order. By default the first failure stops it, as in Starlette; with isolate_tasks the rest
    still run and the first failure is raised after them."""
    tasks = batch.tasks
    first: Exception | None = None
    for index, task in enumerate(tasks):
        try:
            await task()
        except BaseException as exc:
            if isinstance(exc, Exception) and not is_cancellation(exc) and _config.current().isolate_tasks:
                if first is None:
                    first = exc
                else:
                    logger.error("traced_tasks: a background task failed; its batch went on", exc_info=exc)
                continue
            if first is not None:
                logger.error("traced_tasks: a background task failed before its batch was stopped", exc_info=first)
            # Starlette stops the batch here; count what never ran.
            for later in tasks[index + 1 :]:
                skip(later)
            raise
    if first is not None:
        raise first


def skip(task: background.BackgroundTask) -> None:
    nested = getattr(task, "tasks", None)
    if isinstance(task, background.BackgroundTasks) and nested is not None:
        for inner in nested:
            skip(inner)
        return
    scheduled: Scheduled | None = getattr(task, "_traced", None)
    if scheduled is not None:
        scheduled.target.telemetry.skip(scheduled.target.metrics)


class BackgroundTask(background.BackgroundTask):
    """A Starlette `BackgroundTask` that is traced and counted.

    It is scheduled when it is made: the current span becomes its parent and the wait clock starts.

        return Response("ok", background=BackgroundTask(send_receipt, order_id))
    """

    def __init__(self, func: Callable[P, Any], *args: P.args, **kwargs: P.kwargs) -> None:
        schedule(self, func, args, kwargs)

    __call__ = run


class BackgroundTasks(background.BackgroundTasks):
    """A Starlette `BackgroundTasks` whose tasks are traced and counted.

    Use it exactly like Starlette's or FastAPI's class:

        async def signup(request: Request) -> Response:
            tasks = BackgroundTasks()
            tasks.add_task(send_welcome_email, to=address)
            return JSONResponse({"ok": True}, background=tasks)
    """

    def add_task(self, func: Callable[P, Any], *args: P.args, **kwargs: P.kwargs) -> None:
        self.tasks.append(BackgroundTask(func, *args, **kwargs))

    __call__ = run_batch
