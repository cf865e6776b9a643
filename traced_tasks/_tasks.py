"""The batch: drop-in replacements for Starlette's BackgroundTask and BackgroundTasks, and what a batch decides:
the order, the stop at a failure and the skips it causes, isolation, nested batches, and the batch classes of others.

The bodies are module functions so that the instrumentor can put them on Starlette's own classes.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
import types
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec

import anyio.to_thread
from opentelemetry import context as otel_context
from opentelemetry.trace import SpanKind
from starlette import background
from starlette._utils import is_async_callable
from starlette.concurrency import run_in_threadpool

from traced_tasks import _config, _engines, _run
from traced_tasks import _conventions as names
from traced_tasks._run import Outcome, Run, Ticket

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
    # A batch, or a task, passed as a task runs tasks of its own, and is not one.
    if isinstance(func, _CONTAINERS):
        task._traced = None  # type: ignore[attr-defined]
        return
    engine = _engines.engine_for(func) if _engines.installed else None
    if engine is not None:
        engine.check(func, args, kwargs)  # what cannot travel fails here, with the engine's own error
        task._engine = engine  # type: ignore[attr-defined]
    try:
        config = _config.current()
    except Exception:  # no configuration can be made: the task runs as Starlette's would, untraced
        _unconfigured()
        task._traced = None  # type: ignore[attr-defined]
        return
    ticket = _run.schedule(config, func, engine)
    if ticket is not None and engine is not None:
        config.activity.handed_off.setdefault(ticket.profile.task, engine.name)
    task._traced = ticket  # type: ignore[attr-defined]


_unconfigured_logged = False


def _unconfigured() -> None:
    global _unconfigured_logged
    if not _unconfigured_logged:
        _unconfigured_logged = True
        logger.exception("traced_tasks: cannot make its configuration; background tasks run untraced and uncounted")


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
            if isinstance(exc, Exception) and not _run.is_cancellation(exc) and isolates(task):
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


async def run(task: background.BackgroundTask) -> None:
    """Run one task inside its span, counting its outcome. Starlette's BackgroundTask.__call__, traced."""
    ticket: Ticket | None = getattr(task, "_traced", None)  # None: made before instrumentation
    if ticket is None:
        await call(task)
    elif ticket.engine is not None:
        await hand_off(ticket, ticket.engine, task)
    elif task.is_async:
        current = ticket.claim()
        try:
            running = task.func(*task.args, **task.kwargs)  # a coroutine, which runs nothing yet
        except BaseException as exc:
            current.start()
            current.end(exc)
            raise
        current.start(where=running)
        try:
            await running
        except BaseException as exc:
            current.end(exc)
            raise
        current.end()
    else:
        current = ticket.claim()
        try:
            # Starlette's run_in_threadpool, without the partial it would make.
            await anyio.to_thread.run_sync(call_in_thread, current, task.func, task.args, task.kwargs)
        except BaseException as exc:
            if not current.started:  # cancelled while it waited for a thread: no run time to speak of
                current.start()
                current.end(exc)
            raise


def call_in_thread(run: Run, func: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    """Run a sync task in a threadpool thread, which starts its run.

    A sync callable that returns a coroutine (a lambda around an async function, a decorator that lost the function's
    asyncness) did nothing: Starlette drops the coroutine unawaited. The run counts as an error,
    CoroutineNeverAwaited, the coroutine is closed, and a warning says so once per task; nothing is raised.
    """
    run.start(where=threading.get_ident())
    try:
        result = func(*args, **kwargs)
    except BaseException as exc:
        run.end(exc)
        raise
    if inspect.iscoroutine(result):
        result.close()
        run.config.warn(
            "coroutine",
            run.profile.name,
            "returned a coroutine that nothing awaits, so it never ran: make the task itself `async def`",
        )
        run.end(outcome=NEVER_AWAITED)
    else:
        run.end()
    return result


# The outcome of a sync task that returned a coroutine, which Starlette drops unawaited.
NEVER_AWAITED = Outcome.failed("CoroutineNeverAwaited")


async def hand_off(ticket: Ticket, engine: _engines.Engine, task: background.BackgroundTask) -> None:
    """Publish a task of an engine's to its broker, in the context it was scheduled in: the engine's publish hook
    writes what travels with it from `ticket`. A publish that fails is a run of this process that failed, a PRODUCER
    span of the publish; one that succeeds is counted where the task runs."""
    publish = ticket.claim(SpanKind.PRODUCER, names.PUBLISH_SPAN_PREFIX + ticket.profile.name)
    began = time.perf_counter_ns()
    token = otel_context.attach(ticket.context)
    try:
        with _engines.publishing(ticket):
            await engine.hand_off(task.func, task.args, task.kwargs)
    except BaseException as exc:
        publish.start(began)
        publish.end(exc)
        raise
    finally:
        otel_context.detach(token)


async def call(task: background.BackgroundTask) -> None:
    # Not Starlette's __call__: instrumentations patch it, and each task gets one span, ours.
    engine: _engines.Engine | None = task.__dict__.get("_engine")
    if engine is not None:  # its setup failed: handed off, counted as a direct publish is
        await engine.hand_off(task.func, task.args, task.kwargs)
        return
    if task.is_async:
        await task.func(*task.args, **task.kwargs)
    else:
        await run_in_threadpool(task.func, *task.args, **task.kwargs)


def skip(task: object) -> None:
    """Count a task that never ran because an earlier one stopped its batch. A nested batch, or a task that runs
    one, counts every task it holds."""
    for inner in _tasks_in(task):
        ticket: Ticket | None = getattr(inner, "_traced", None)
        if ticket is not None and not ticket.claimed:  # else it ran, or a batch around it counted it already
            ticket.skip()


def skip_unstarted(tasks: list[Any]) -> None:
    """Count as skipped each task of a stopped batch that never started: those after the last one whose run began.
    For batch classes whose own loop runs the tasks."""
    flat = [inner for task in tasks for inner in _tasks_in(task)]
    started = [index for index, task in enumerate(flat) if getattr(getattr(task, "_traced", None), "claimed", False)]
    for task in flat[(started[-1] + 1 if started else 0) :]:
        skip(task)


def isolates(task: object) -> bool:
    """Whether the configuration `task` was scheduled under lets its batch go on after it fails. For a nested
    batch, its first task decides."""
    for inner in _tasks_in(task):
        ticket: Ticket | None = getattr(inner, "_traced", None)
        if ticket is not None:
            return ticket.config.options.isolate_tasks
    return False


def _tasks_in(task: object) -> Iterator[object]:
    """The tasks `task` stands for, in order: itself, or what a nested batch holds, at any depth."""
    pending = [task]
    seen: set[int] = set()
    while pending:
        item = pending.pop()
        if id(item) in seen:  # a batch that holds itself
            continue
        seen.add(id(item))
        if isinstance(item, background.BackgroundTasks):
            pending.extend(reversed(item.tasks))
        elif isinstance(item, background.BackgroundTask) and isinstance(item.func, _CONTAINERS):
            pending.append(item.func)
        else:
            yield item


# A batch, or a task, passed as a task: it runs tasks of its own, and is not one.
_CONTAINERS = (background.BackgroundTasks, background.BackgroundTask)


class BackgroundTask(background.BackgroundTask):
    """A Starlette `BackgroundTask` that is traced and counted.

    It is scheduled when it is made: the current span becomes its parent and the wait clock starts.

        return Response("ok", background=BackgroundTask(send_receipt, order_id))
    """

    def __init__(self, func: Callable[P, Any], *args: P.args, **kwargs: P.kwargs) -> None:
        init(self, func, args, kwargs)

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


class Batches:
    """Skips counted for batch classes with a `__call__` of their own, FastAPI's first: their loop runs traced
    tasks, but stops at a failure without counting the rest. Classes defined later are caught as they are made."""

    def __init__(self) -> None:
        self._wrapped: dict[type, Any] = {}
        self._had_init_subclass = "__init_subclass__" in background.BackgroundTasks.__dict__
        self._init_subclass = background.BackgroundTasks.__dict__.get("__init_subclass__")

    def install(self) -> None:
        pending = list(background.BackgroundTasks.__subclasses__())
        while pending:
            cls = pending.pop()
            self.wrap(cls)
            pending.extend(cls.__subclasses__())
        batches = self

        def init_subclass(cls: type[background.BackgroundTasks], /, **kwargs: Any) -> None:
            super(background.BackgroundTasks, cls).__init_subclass__(**kwargs)
            batches.wrap(cls)

        background.BackgroundTasks.__init_subclass__ = classmethod(init_subclass)  # type: ignore[assignment,method-assign]

    def wrap(self, cls: type) -> None:
        original = cls.__dict__.get("__call__")
        if original is None or original is run_batch or cls in self._wrapped:
            return
        self._wrapped[cls] = original

        async def __call__(batch: background.BackgroundTasks) -> None:
            try:
                await original(batch)
            except BaseException:
                skip_unstarted(batch.tasks)
                raise

        cls.__call__ = __call__  # type: ignore[method-assign]

    def uninstall(self) -> None:
        for cls, original in self._wrapped.items():
            cls.__call__ = original  # type: ignore[method-assign]
        self._wrapped = {}
        if self._had_init_subclass:
            background.BackgroundTasks.__init_subclass__ = self._init_subclass  # type: ignore[assignment,method-assign]
        else:
            del background.BackgroundTasks.__init_subclass__
