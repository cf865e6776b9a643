"""Drop-in replacements for Starlette's BackgroundTask and BackgroundTasks."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, ParamSpec

from opentelemetry import context as otel_context
from starlette import background
from starlette.concurrency import run_in_threadpool

from traced_tasks._config import current
from traced_tasks._telemetry import TaskTelemetry

P = ParamSpec("P")


class BackgroundTask(background.BackgroundTask):
    """A Starlette `BackgroundTask` that is traced and counted.

    It is scheduled when it is made: the current span becomes its parent and the wait clock starts.

        return Response("ok", background=BackgroundTask(send_receipt, order_id))
    """

    def __init__(self, func: Callable[P, Any], *args: P.args, **kwargs: P.kwargs) -> None:
        if not callable(func):
            raise TypeError(f"a background task must be callable, got {func!r}")
        super().__init__(func, *args, **kwargs)
        self._context = otel_context.get_current()
        self._scheduled_ns = time.perf_counter_ns()
        self._telemetry = telemetry = current()
        task: TaskTelemetry | None
        try:
            task = telemetry.task(func)
        except Exception:
            telemetry.report("task setup")
            task = None
        else:
            telemetry.schedule(task)
        self._task = task

    async def __call__(self) -> None:
        task = self._task
        if task is None:
            await self._call()
            return
        run = self._telemetry.start(task, self._context, self._scheduled_ns)
        try:
            await self._call()
        except BaseException as exc:
            run.finish(exc)
            raise
        run.finish(None)

    async def _call(self) -> None:
        # Not super().__call__(): instrumentations patch Starlette's method, and each task gets one span, ours.
        if self.is_async:
            await self.func(*self.args, **self.kwargs)
        else:
            await run_in_threadpool(self.func, *self.args, **self.kwargs)

    def _skip(self) -> None:
        if self._task is not None:
            self._telemetry.skip(self._task)


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

    async def __call__(self) -> None:
        tasks = self.tasks
        for index, task in enumerate(tasks):
            try:
                await task()
            except BaseException:
                # Starlette stops the batch at the first failure; count what never ran.
                for later in tasks[index + 1 :]:
                    if isinstance(later, (BackgroundTask, BackgroundTasks)):
                        later._skip()
                raise

    def _skip(self) -> None:
        for task in self.tasks:
            if isinstance(task, (BackgroundTask, BackgroundTasks)):
                task._skip()
