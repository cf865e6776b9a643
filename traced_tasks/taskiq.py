"""taskiq: tasks that run on a taskiq worker keep the spans, series, dashboards and console of in-process ones.

One middleware, on the broker, in the module that makes it, so that the web process and the workers both have it:

    from taskiq_redis import ListQueueBroker
    import traced_tasks.taskiq

    broker = ListQueueBroker("redis://localhost:6379/0").with_middlewares(traced_tasks.taskiq.Middleware())

    @broker.task
    async def send_receipt(order_id: int) -> None: ...

Then `tasks.add_task(send_receipt, order_id)` kicks `send_receipt` when the response's background tasks run, in
batch order, as Starlette runs tasks: not if the endpoint raised, and not if an earlier task of the batch failed
(it is counted as skipped). Arguments that taskiq cannot serialize fail at add_task with taskiq's own error. A
direct `send_receipt.kiq(...)` is traced the same way. The web process must start the broker (`await
broker.startup()`, in its lifespan), as taskiq asks.

The web process counts the task as scheduled, or skipped, and a kick that fails (the broker is down) as a run that
failed there. The worker counts the run: its wait since it was scheduled, its run time, outcome and exception class,
under the task's `module.qualname` (not taskiq's `module:function` name, nor the `__taskiq_original` one), in a span
that is a child of the span that scheduled it. With TRACED_TASKS_METRICS_PORT set, a worker process serves /metrics
and the task console from its start.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable
from typing import Any

from taskiq import AsyncTaskiqDecoratedTask, TaskiqMessage, TaskiqMiddleware, TaskiqResult
from taskiq.exceptions import NoResultError, SendTaskError

from traced_tasks import _config, _engines, _run, _shutdown
from traced_tasks import _conventions as names
from traced_tasks._web import server

__all__ = ["Middleware"]

logger = logging.getLogger("traced_tasks")

# The run of the message the current asyncio task executes, and the exception it raised: taskiq awaits pre_execute,
# the task, on_error and post_execute in one asyncio task per message.
_running: contextvars.ContextVar[_run.Run | None] = contextvars.ContextVar("traced_tasks_taskiq_run", default=None)
_error: contextvars.ContextVar[BaseException | None] = contextvars.ContextVar("traced_tasks_taskiq_error", default=None)


class Middleware(TaskiqMiddleware):
    """Trace and count the tasks of the broker it is added to, in the process that kicks them and in the workers
    that run them:

        broker = ListQueueBroker(url).with_middlewares(traced_tasks.taskiq.Middleware())
    """

    def __init__(self) -> None:
        super().__init__()
        self._metrics_server: server.MetricsServer | None = None

    def set_broker(self, broker: Any) -> None:
        super().set_broker(broker)
        _engines.install(_ENGINE)

    def startup(self) -> None:
        """Every task of the broker has its series at 0 from the start; a worker process serves /metrics and the
        console on TRACED_TASKS_METRICS_PORT (the first of them to bind it, in multiprocess mode)."""
        try:
            self._start()
        except Exception:  # the broker starts all the same
            logger.exception("traced_tasks: cannot declare this broker's tasks or serve their metrics")

    def _start(self) -> None:
        _config.declare(*(task for _, task in sorted(self.broker.get_all_tasks().items())))
        if not self.broker.is_worker_process:
            return
        self._metrics_server = server.from_environment()
        if self._metrics_server is None:
            return
        if server.counts_this_process_only():
            logger.warning(
                "traced_tasks: each taskiq worker process counts on its own, and the first of them serves port %s "
                "with its own counts only: the port shows them all in multiprocess mode, with PROMETHEUS_MULTIPROC_DIR "
                "set to an empty folder before the worker starts and metrics through prometheus_client",
                self._metrics_server.port,
            )
        self._metrics_server.ensure_started()

    async def shutdown(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.stop()
            self._metrics_server = None
        if self.broker.is_worker_process:
            # A forked worker process ends with os._exit, without the SDK's own export at exit. In a thread, so that
            # taskiq's --shutdown-timeout still bounds the wait.
            await asyncio.to_thread(_shutdown.flush_process)

    def pre_send(self, message: TaskiqMessage) -> TaskiqMessage:
        # A kick made elsewhere than add_task: task.kiq(), a retry. Its message gets the context current now (in a
        # worker, the span of the run that retries), the time it is meant to start, and the route.
        if _engines.is_handing_off():
            return message
        task = self.broker.find_task(message.task_name)
        if task is None:
            return message
        labels = message.labels
        run = _run.capture(_config.current(), task, labels.get(names.CARRIED_ROUTE))
        if run is not None:
            labels.update(run.carried(starts_at=_delayed(labels.get("delay"))))
        return message

    def post_send(self, message: TaskiqMessage) -> None:
        if _engines.is_handing_off():
            return
        task = self.broker.find_task(message.task_name)
        if task is not None:
            _run.published(_config.current(), task, message.labels)

    def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        task = self.broker.find_task(message.task_name)
        if task is None:
            return message
        config = _config.current()
        try:
            run = _run.received(config, task, message.labels)
        except Exception:
            config.report("task setup", message.task_name)
            return message
        _running.set(run)
        _error.set(None)
        run.__enter__()
        return message

    def on_error(self, message: TaskiqMessage, result: TaskiqResult[Any], exception: BaseException) -> None:
        _error.set(exception)

    def post_execute(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        run = _running.get()
        if run is None:
            return
        _running.set(None)
        exception: BaseException | None = None
        if result.is_err:
            exception = _error.get() or result.error or _engines.TaskFailed()
        if isinstance(exception, NoResultError):  # the task chose to keep no result; a retry replaces its error
            exception = None
        run.__exit__(None if exception is None else type(exception), exception, None)


def _delayed(delay: object) -> float | None:
    """The start a `delay` label (seconds, as taskiq's SmartRetryMiddleware and some brokers read it) gives."""
    try:
        seconds = float(delay)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return time.time() + max(0.0, seconds)


class _Taskiq:
    """The taskiq engine: a task of a broker with the Middleware, kicked with its own kicker."""

    name = "taskiq"

    def owns(self, func: Callable[..., Any]) -> bool:
        if not isinstance(func, AsyncTaskiqDecoratedTask):
            return False
        return any(isinstance(middleware, Middleware) for middleware in func.broker.middlewares)

    def check(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        task: Any = func
        kicker = task.kicker()
        prepare = getattr(kicker, "_prepare_message", None)
        if prepare is None:  # a taskiq that prepares messages otherwise: its kiq() will say
            return
        try:
            task.broker.formatter.dumps(prepare(*args, **kwargs))
        except Exception as exc:
            raise SendTaskError() from exc  # as kiq() would

    async def hand_off(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], carried: dict[str, str]
    ) -> None:
        task: Any = func
        await task.kicker().with_labels(**carried).kiq(*args, **kwargs)


_ENGINE = _Taskiq()
