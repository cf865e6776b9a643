"""Drop-in replacements for Starlette's BackgroundTask and BackgroundTasks.

The bodies are module functions so that the instrumentor can put them on Starlette's own classes.
"""

from __future__ import annotations

import inspect
import logging
import types
from collections.abc import Callable
from typing import Any, ParamSpec

from starlette import background
from starlette._utils import is_async_callable

from traced_tasks import _config, _run

P = ParamSpec("P")
logger = logging.getLogger("traced_tasks")


def init(task: background.BackgroundTask, func: Callable[..., Any], args: Any, kwargs: Any) -> None:
    """Starlette's BackgroundTask.__init__, then schedule the task: count it, start its wait clock, capture context."""
    if not callable(func):
        raise TypeError(f"a background task must be callable, got {func!r}")
    task.func = func
    task.args = args
    task.kwargs = kwargs
    task.is_async = _is_async_callable(func)
    task._traced = _run.schedule(_config.current(), func)  # type: ignore[attr-defined]


def _is_async_callable(func: Callable[..., Any]) -> bool:
    """Starlette's is_async_callable, answered from the code flags first for async functions and methods."""
    target = func.__func__ if type(func) is types.MethodType else func
    if type(target) is types.FunctionType and target.__code__.co_flags & inspect.CO_COROUTINE:
        return True
    return is_async_callable(func)


async def run_batch(batch: background.BackgroundTasks) -> None:
    """Run a batch in order. The first failure stops it, as in Starlette, unless the failed task was scheduled with
    isolate_tasks: then the rest still run, and the first failure is raised after them."""
    tasks = batch.tasks
    first: Exception | None = None
    for index, task in enumerate(tasks):
        try:
            await task()
        except BaseException as exc:
            if isinstance(exc, Exception) and not _run.is_cancellation(exc) and _run.isolates(task):
                if first is None:
                    first = exc
                else:
                    logger.error("traced_tasks: a background task failed; its batch went on", exc_info=exc)
                continue
            if first is not None:
                logger.error("traced_tasks: a background task failed before its batch was stopped", exc_info=first)
            # Starlette stops the batch here; count what never ran.
            for later in tasks[index + 1 :]:
                _run.skip(later)
            raise
    if first is not None:
        raise first


class BackgroundTask(background.BackgroundTask):
    """A Starlette `BackgroundTask` that is traced and counted.

    It is scheduled when it is made: the current span becomes its parent and the wait clock starts.

        return Response("ok", background=BackgroundTask(send_receipt, order_id))
    """

    def __init__(self, func: Callable[P, Any], *args: P.args, **kwargs: P.kwargs) -> None:
        init(self, func, args, kwargs)

    __call__ = _run.run


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
