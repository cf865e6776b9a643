"""taskiq: tasks that run on a taskiq worker keep the spans, series, dashboards and console of in-process ones.

One middleware, on the broker, in the module that makes it, so that the web process, the workers and the scheduler
all have it:

    from taskiq_redis import ListQueueBroker
    import traced_tasks.taskiq

    broker = ListQueueBroker("redis://localhost:6379/0").with_middlewares(traced_tasks.taskiq.Middleware())

    @broker.task
    async def send_receipt(order_id: int) -> None: ...

Then `tasks.add_task(send_receipt, order_id)` kicks `send_receipt` when the response's background tasks run, in
batch order, as Starlette runs tasks. A direct `send_receipt.kiq(...)` is traced the same way. The web process must
start the broker (`await broker.startup()`, in its lifespan), as taskiq asks. The worker counts each run under the
task's `module.qualname`, in a span that is a child of the one that scheduled it; with TRACED_TASKS_METRICS_PORT set,
a worker process serves /metrics and the task console. Every process that serves traced_tasks' metrics reads the
broker's queue; `taskiq scheduler` serves its schedules.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

from taskiq import AsyncTaskiqDecoratedTask, TaskiqMessage, TaskiqMiddleware, TaskiqResult
from taskiq.exceptions import NoResultError, SendTaskError

from traced_tasks import _engines
from traced_tasks import _worker as contract

__all__ = ["Middleware"]

logger = logging.getLogger("traced_tasks")

# taskiq runs a sync task in a copy of the context from 0.11.19 on: before, its run starts when the message arrives.
_COPIES_CONTEXT = tuple(int(part) for part in version("taskiq").split(".")[:3] if part.isdigit()) >= (0, 11, 19)
# The delivery a copy of the context runs: a sync task's thread starts its run with it.
_Delivery = tuple[str, "asyncio.Task[Any] | None"]
_message: contextvars.ContextVar[_Delivery | None] = contextvars.ContextVar("traced_tasks_taskiq_message", default=None)


class Middleware(TaskiqMiddleware):
    """Trace and count the tasks of the broker it is added to, where they are kicked, where they run, and where the
    scheduler sends them:

        broker = ListQueueBroker(url).with_middlewares(traced_tasks.taskiq.Middleware())

    `queues`: the queues whose backlog is read, by default the broker's own; a collection of names replaces it, a
    function of the found names edits them, and `()` reads none.
    """

    def __init__(self, *, queues: contract.Queues = None) -> None:
        super().__init__()
        contract.check_queues(queues)
        self._queues = queues
        self._schedule: contract.LabelSchedule | None = None

    def set_broker(self, broker: Any) -> None:
        super().set_broker(broker)
        _engines.install(_ENGINE)
        try:
            contract.watch_queues(contract.taskiq_reader(broker, self._queues))
        except Exception:
            logger.exception("traced_tasks: cannot watch the queue of %r", broker)

    def startup(self) -> None:
        """Every task of the broker has its series at 0 from the start; a worker process serves /metrics and the
        console on TRACED_TASKS_METRICS_PORT (the first of them to bind it, in multiprocess mode), and so does the
        scheduler, with its schedules. What fails here is logged, and the broker starts all the same."""
        try:
            self._startup()
        except Exception:
            logger.exception("traced_tasks: cannot set up as the broker starts")

    def _startup(self) -> None:
        tasks = [task for _, task in sorted(self.broker.get_all_tasks().items())]
        contract.declare(tasks)
        if self.broker.is_worker_process:
            for task in tasks:
                _start_in_its_thread(task)
            asyncio.get_running_loop().create_task(_awake())
            if any(task.labels.get("schedule") for task in tasks):
                contract.know_schedule(contract.LabelSchedule(self.broker, contract.label))
            contract.serve("taskiq", each_process_serves=True)
        if getattr(self.broker, "is_scheduler_process", False):
            self._schedule = contract.LabelSchedule(self.broker, contract.label)
            contract.watch_schedule(self._schedule)
            asyncio.get_running_loop().create_task(_heartbeat())
            contract.serve("taskiq scheduler")

    async def shutdown(self) -> None:
        contract.stop_serving()
        if self.broker.is_worker_process:
            # A forked worker process ends with os._exit, without atexit. In a thread, so that taskiq's
            # --shutdown-timeout still bounds the wait.
            await asyncio.to_thread(contract.process_ending)

    def pre_send(self, message: TaskiqMessage) -> TaskiqMessage:
        task = self.broker.find_task(message.task_name)
        if task is not None:
            contract.before_publish(task, message.task_id, message.labels, _delayed(message.labels.get("delay")))
        return message

    def post_send(self, message: TaskiqMessage) -> None:
        contract.after_publish(message.task_id)
        if self._schedule is not None:
            self._schedule.sent(message.task_name)

    def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        task = self.broker.find_task(message.task_name)
        if task is None:
            return message
        in_thread = getattr(task.original_func, "_traced_tasks_starts", False)
        key = _delivery(message)
        contract.begin(task, key, message.labels, start=not in_thread)
        _message.set(key)
        # post_execute does not come when a dependency's teardown raises, or an ack_type label is not one: the
        # asyncio task of the message then ends the run, with what it raised.
        if key[1] is not None:
            key[1].add_done_callback(functools.partial(_ended, key))
        return message

    def on_error(self, message: TaskiqMessage, result: TaskiqResult[Any], exception: BaseException) -> None:
        if not isinstance(exception, NoResultError):  # the task chose to keep no result
            contract.failed(_delivery(message), exception)

    def post_execute(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        if result.is_err and not isinstance(result.error, NoResultError):
            contract.end(_delivery(message), contract.FAILURE, result.error)
        else:
            contract.end(_delivery(message), contract.SUCCESS)


def _delivery(message: TaskiqMessage) -> _Delivery:
    """One delivery of a message: its task ID, which a retry middleware sends again, and the asyncio task that runs
    it, in which taskiq calls every hook of the delivery."""
    try:
        return message.task_id, asyncio.current_task()
    except RuntimeError:  # no event loop runs here
        return message.task_id, None


def _ended(key: _Delivery, running: asyncio.Task[Any]) -> None:
    if running.cancelled():
        contract.end(key, contract.STOPPED, here=False)
        return
    raised = running.exception()
    contract.end(key, contract.FAILURE if raised is not None else contract.LOST, raised, here=False)


def _start_in_its_thread(task: Any) -> None:
    """Have a sync task start its run in the thread that runs it, not when it was handed to the pool: the wait for a
    thread is wait. taskiq runs `task.original_func`, and pickles it by its module's `<name>__taskiq_original`."""
    func = task.original_func
    if not _COPIES_CONTEXT or asyncio.iscoroutinefunction(func) or getattr(func, "_traced_tasks_starts", False):
        return

    @functools.wraps(func)
    def starts_its_run(*args: Any, **kwargs: Any) -> Any:
        contract.started(_message.get())
        return func(*args, **kwargs)

    starts_its_run._traced_tasks_starts = True  # type: ignore[attr-defined]
    task.original_func = starts_its_run
    module = sys.modules.get(getattr(func, "__module__", None) or "")
    name = getattr(func, "__name__", "")
    if module is not None and getattr(module, name, None) is func:
        setattr(module, name, starts_its_run)


async def _awake() -> None:
    """taskiq's worker sets its shutdown event from a plain signal handler, which does not wake an idle event loop:
    a loop waiting on a Redis list, or on a sync task's thread, would notice a stop only at its next message. A wake
    every second lets it stop, and give its runs in progress their outcome, within a second."""
    while True:
        await asyncio.sleep(1.0)


async def _heartbeat() -> None:
    """The scheduler's loop wakes every second, in this event loop: so does its heartbeat, which stops with it."""
    while True:
        contract.ticked()
        await asyncio.sleep(1.0)


def _delayed(delay: object) -> float | None:
    """The start a `delay` label (seconds, as taskiq's SmartRetryMiddleware and some brokers read it) gives."""
    try:
        return time.time() + max(0.0, float(delay))  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None


class _Taskiq:
    """The taskiq engine: a task of a broker with the Middleware, kicked with its own kicker."""

    name = "taskiq"

    def owns(self, func: Callable[..., Any]) -> bool:
        if not isinstance(func, AsyncTaskiqDecoratedTask):
            return False
        return any(isinstance(middleware, Middleware) for middleware in func.broker.middlewares)

    def check(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        task: Any = func
        prepare = getattr(task.kicker(), "_prepare_message", None)
        if prepare is None:  # a taskiq that prepares messages otherwise: its kiq() will say
            return
        try:
            task.broker.formatter.dumps(prepare(*args, **kwargs))
        except Exception as exc:
            raise SendTaskError() from exc  # as kiq() would

    async def hand_off(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        task: Any = func
        await task.kiq(*args, **kwargs)


_ENGINE = _Taskiq()
