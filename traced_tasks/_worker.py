"""The contract every engine integration translates its hooks into: what travels with a message, one run of a
delivered message from its start to its one outcome, and the life of a worker process. Celery's signals and taskiq's
middleware calls only say *when*; every decision is made here, once.

- `before_publish()` / `after_publish()`: a message leaves, from a batch (add_task) or a direct publish (delay(),
  kiq(), a retry, a scheduler): it gets the trace context, time of scheduling and route, and a direct publish is
  counted as scheduled once the engine published it.
- `begin()`, then `failed()` and `end()`: a run of a delivered message, keyed by what the engine has for it.
- `serve()`, `stop_serving()` and `process_ending()`: a worker's port, and a worker process that ends.
- `STATES`: every way an engine says a run ended, and what it counts as.
- `watch_queues()`: the queues of an application, read for their backlog (see `_queues`).
- `watch_schedule()` and `ticked()`: a scheduler process's schedules (see `_schedules`); what it sends begins its
  trace there, in a PRODUCER span.

Every function here never raises: what fails is logged once, and the engine goes on.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any, NamedTuple

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind

from traced_tasks import _config, _engines, _queues, _run, _schedules, _shutdown, _wire
from traced_tasks import _conventions as names
from traced_tasks._queues import CeleryQueues, Queues, taskiq_reader
from traced_tasks._run import Outcome, Run
from traced_tasks._schedules import BeatConfig, BeatSchedule, LabelSchedule
from traced_tasks._web import server

__all__ = [
    "FAILURE",
    "LOST",
    "RETRY",
    "STOPPED",
    "SUCCESS",
    "TERMINATED",
    "BeatConfig",
    "BeatSchedule",
    "CeleryQueues",
    "LabelSchedule",
    "Queues",
    "after_publish",
    "before_publish",
    "begin",
    "check_queues",
    "declare",
    "end",
    "failed",
    "know_schedule",
    "label",
    "process_ending",
    "serve",
    "started",
    "stop_serving",
    "taskiq_reader",
    "ticked",
    "watch_queues",
    "watch_schedule",
]

logger = logging.getLogger("traced_tasks")


class State(NamedTuple):
    """How a run ended, as an engine says it: the status it counts as, and for an error, the exception class it
    counts by when the engine reported no exception of its own."""

    status: str
    error_type: str | None = None


# Celery's final states, which taskiq's outcomes map onto, and the ends only an engine sees.
SUCCESS = "SUCCESS"
IGNORED = "IGNORED"  # Celery's Ignore: the task chose to record no state (a task replaced by another, say)
FAILURE = "FAILURE"
RETRY = "RETRY"  # a run that failed and is retried: the retry is a new run, scheduled by this one
REJECTED = "REJECTED"
REVOKED = "REVOKED"
TIME_LIMIT = "TIME_LIMIT"  # ended by the engine at its hard time limit
TERMINATED = "TERMINATED"  # ended by a signal: revoke(terminate=True), or a SIGTERM of its process
STOPPED = "STOPPED"  # still running when its worker stopped, gracefully, and gave up on it
LOST = "LOST"  # nothing ever ended it: its hook never came

STATES: dict[str, State] = {
    SUCCESS: State(names.STATUS_SUCCESS),
    IGNORED: State(names.STATUS_SUCCESS),
    FAILURE: State(names.STATUS_ERROR, "TaskFailed"),
    RETRY: State(names.STATUS_ERROR, "TaskFailed"),
    REJECTED: State(names.STATUS_ERROR, "TaskFailed"),
    TIME_LIMIT: State(names.STATUS_ERROR, "TimeLimitExceeded"),
    TERMINATED: State(names.STATUS_ERROR, "Terminated"),
    LOST: State(names.STATUS_ERROR, names.LOST),
    REVOKED: State(names.STATUS_CANCELLED),
    STOPPED: State(names.STATUS_CANCELLED),
}


class _Execution:
    """A run of a delivered message, when it began, and the exception the engine reported it raised."""

    __slots__ = ("begun_ns", "error", "run")

    def __init__(self, run: Run) -> None:
        self.run = run
        self.begun_ns = time.perf_counter_ns()
        self.error: BaseException | None = None


_lock = threading.Lock()
# The runs in progress by key, the latest last: a run that publishes and runs its retry in place under the same key
# (taskiq's InMemoryBroker with await_inplace) ends before the one around it.
_executions: dict[object, list[_Execution]] = {}
# The direct publishes between the engine's before and after hooks, by message, the latest last (a retry published
# in place, inside the publish of the same message): counted once published, and the span of a scheduler's send,
# ended then. A publish that fails has no after hook: the oldest messages are dropped past this many.
_publishing: OrderedDict[object, list[tuple[_run.Ticket, Span | None]]] = OrderedDict()
_MAX_PUBLISHING = 10_000
# The schedule this process sends, when it is a scheduler (Celery beat, taskiq's scheduler).
_scheduler: _schedules.Watcher | None = None


def before_publish(
    task: Callable[..., Any], key: object, metadata: MutableMapping[str, Any], starts_at: float | None = None
) -> None:
    """A message of `task` is about to leave: write what travels with it into its `metadata` (Celery's headers,
    taskiq's labels). The ticket is the batch's, when the batch publishes it; else the task is scheduled now, in the
    context of now (the request being served, the run that retries) and, where no request is served, under the route
    `metadata` already carries (a retry's copy of its run's). `starts_at`: the Unix time it is meant to start at (an
    ETA), when later than now. `key` names the message for after_publish()."""
    try:
        config = _config.current()
        ticket = _engines.take_publishing(lambda ticket: _is_of(ticket, config, task))
        if ticket is None:
            span = _sending(config, task)
            with contextlib.nullcontext() if span is None else trace.use_span(span):
                ticket = _run.capture(config, task, metadata.get(_wire.ROUTE))
            if ticket is None:
                return
            with _lock:
                _publishing.setdefault(key, []).append((ticket, span))
                while len(_publishing) > _MAX_PUBLISHING:
                    _publishing.popitem(last=False)
        metadata.update(ticket.carried(starts_at))
    except Exception:
        logger.exception("traced_tasks: cannot prepare a message of %r", task)


def _sending(config: _config.Configuration, task: Callable[..., Any]) -> Span | None:
    """In a scheduler, where nothing is traced yet, what it sends begins its trace: a PRODUCER span of the send."""
    if _scheduler is None or trace.get_current_span().get_span_context().is_valid:
        return None
    profile = config.profiles.get(task, None)
    return config.tracer.start_span(
        names.PUBLISH_SPAN_PREFIX + profile.name, kind=SpanKind.PRODUCER, attributes=profile.attributes
    )


def after_publish(key: object) -> None:
    """The message `key` left: a direct publish is counted as scheduled now; the batch's was, at add_task."""
    with _lock:
        pending = _publishing.get(key)
        found = pending.pop() if pending else None
        if pending is not None and not pending:
            del _publishing[key]
    if found is not None:
        ticket, span = found
        ticket.count_scheduled()
        if span is not None:
            span.end()


def _is_of(ticket: _run.Ticket, config: _config.Configuration, task: Callable[..., Any]) -> bool:
    return ticket.profile.name == config.profiles.get(task, ticket.profile.route).name


def begin(
    task: Callable[..., Any], key: object, carried: _wire.Carrier, *, inline: bool = False, start: bool = True
) -> None:
    """A run of a message of `task` begins: under the context, time of scheduling and route `carried` with it, as far
    as they can be believed. `inline`: the engine runs it in place of a publish, in the caller's thread (Celery's
    eager mode): it is the batch's ticket's run, or else a task scheduled now, as a publish would count it, a child of
    the current span. `start`: start it now; else at `started(key)`, when the thread that runs it starts it."""
    try:
        config = _config.current()
        ticket = None
        if inline:
            ticket = _engines.take_publishing(lambda ticket: _is_of(ticket, config, task))
            if ticket is None and _wire.scheduled_at(carried.get(_wire.SCHEDULED_AT)) is None:
                ticket = _run.schedule(config, task)
        if ticket is None:
            ticket = _run.received(config, task, carried)
        if ticket is None:
            return
        execution = _Execution(ticket.claim(SpanKind.CONSUMER))
        with _lock:
            _executions.setdefault(key, []).append(execution)
        if start:
            execution.run.start(where=_run.here())
    except Exception:
        logger.exception("traced_tasks: cannot begin a run of %r", task)


def _execution(key: object) -> _Execution | None:
    with _lock:
        found = _executions.get(key)
        return found[-1] if found else None


def started(key: object) -> None:
    """The run `key`, begun with start=False, starts now, in the thread that runs it, whose copy of the context ends
    with the run."""
    execution = _execution(key)
    if execution is not None and not execution.run.started:
        execution.run.start(scoped=True, where=_run.here())


def failed(key: object, exc: BaseException) -> None:
    """The engine reports that the run `key` raised `exc`: the run failed, by that exception, however the engine
    ends it (a retry middleware may replace the result's error)."""
    execution = _execution(key)
    if execution is not None:
        execution.error = exc


def end(
    key: object, state: str, exc: BaseException | None = None, *, here: bool = True, time_limit: float | None = None
) -> None:
    """The run `key` ended, in `state` (one of STATES): an error counts by `exc`, else by the exception the engine
    reported with failed(), else by the state's own class. A run the engine reported failed is an error whatever the
    state. A run TERMINATED once its `time_limit` passed ran out of time: TIME_LIMIT. `here`: in the context it
    started in, whose current span it restores; else from anywhere (a callback, another thread). A run ends once; a
    key with no run is ignored."""
    with _lock:
        found = _executions.get(key)
        execution = found.pop() if found else None
        if found is not None and not found:
            del _executions[key]
    if execution is None:
        return
    try:
        run = execution.run
        if not run.started:  # its thread did not say when it started: when it began, then
            run.start(execution.begun_ns, scoped=True)
        if state == TERMINATED and time_limit and time.time() - run.started_at >= time_limit - _TIME_LIMIT_SLACK:
            state = TIME_LIMIT
        outcome = _outcome(state, exc, execution.error)
        if here:
            run.end(outcome=outcome)
        else:
            run.finish(outcome)
    except Exception:
        logger.exception("traced_tasks: cannot end a run in state %s", state)


# A run ended by a signal this close to its time limit was ended by it: the engine's timer has its own granularity.
_TIME_LIMIT_SLACK = 0.5


def _outcome(state: str, exc: BaseException | None, reported: BaseException | None) -> Outcome:
    found = STATES.get(state, STATES[FAILURE])
    if found.status == names.STATUS_CANCELLED:
        return _run.CANCELLED
    raised = exc if exc is not None else reported if state not in (TIME_LIMIT, TERMINATED, LOST) else None
    if raised is not None:
        return Outcome.of(raised)
    if found.status == names.STATUS_SUCCESS:
        return _run.SUCCEEDED
    return Outcome.failed(found.error_type or "TaskFailed")


def running() -> list[object]:
    """The keys of the runs in progress in this process, one per run."""
    with _lock:
        return [key for key, found in _executions.items() for _ in found]


def declare(tasks: Iterable[Callable[..., Any]]) -> None:
    """Make every task's series exist at 0, in a process that runs or publishes them."""
    try:
        _config.declare(*tasks)
    except Exception:
        logger.exception("traced_tasks: cannot declare the tasks of an engine")


_metrics_server: server.MetricsServer | None = None


def serve(engine: str, runs_in_children: bool = False, each_process_serves: bool = False) -> None:
    """Serve /metrics and the console on TRACED_TASKS_METRICS_PORT, from a worker (or scheduler) process that is
    ready. `runs_in_children`: this process runs no task, its child processes do (Celery's prefork pool): it serves
    their counts in multiprocess mode, and nothing otherwise, rather than zeros. `each_process_serves`: each of the
    worker's processes runs tasks and tries the port (taskiq's workers), the first one serving its own counts only
    unless in multiprocess mode."""
    global _metrics_server
    try:
        if _metrics_server is not None:
            _metrics_server.ensure_started()
            return
        metrics_server = server.from_environment()
        if metrics_server is None:
            return
        if not _config.current().backend.sees_all_processes:
            if runs_in_children:
                logger.error(
                    "traced_tasks: this %s worker runs its tasks in child processes, which count on their own, and "
                    "its main process runs none: it does not serve port %s, rather than serve no counts at all. The "
                    "port shows the children's counts in multiprocess mode, with PROMETHEUS_MULTIPROC_DIR set to an "
                    "empty folder before the worker starts and metrics through prometheus_client",
                    engine,
                    metrics_server.port,
                )
                return
            if each_process_serves:
                logger.warning(
                    "traced_tasks: each taskiq worker process counts on its own, and the first of them serves port %s "
                    "with its own counts only: the port shows them all in multiprocess mode, with "
                    "PROMETHEUS_MULTIPROC_DIR set to an empty folder before the worker starts and metrics through "
                    "prometheus_client",
                    metrics_server.port,
                )
        _metrics_server = metrics_server
        metrics_server.ensure_started()
    except Exception:
        logger.exception("traced_tasks: cannot serve metrics for this %s worker", engine)


def stop_serving() -> None:
    global _metrics_server
    if _metrics_server is not None:
        _metrics_server.stop()
        _metrics_server = None


def process_ending() -> None:
    """This worker process ends, maybe with os._exit, without atexit: the runs still in progress end as cancelled
    (their worker gave up on them), its runs and failures are written for the console, and its spans and counts
    are exported, for PROCESS_FLUSH_SECONDS at most."""
    for key in running():
        end(key, STOPPED, here=False)
    if _scheduler is not None:
        _scheduler.ticked()
    try:
        for configuration in _config.configurations():
            configuration.backend.process_ending()
    except Exception:
        logger.exception("traced_tasks: cannot write the runs of this process for the console")
    _shutdown.flush_process()


def label(task: Callable[..., Any]) -> str | None:
    """A task's label value, as its series are counted under; None when it cannot be had (logged once)."""
    try:
        return _config.current().profiles.get(task, None).task
    except Exception:
        logger.exception("traced_tasks: cannot name the task %r", task)
        return None


def check_queues(queues: object) -> None:
    """Raise TypeError, at the call, for an engine integration's `queues` argument that is not one."""
    _queues.check(queues)


def watch_queues(reader: _queues.Reader | None) -> None:
    """Read `reader`'s queues for their backlog wherever this process serves traced_tasks' metrics."""
    if reader is not None:
        _queues.watch(reader)


def watch_schedule(schedule: _schedules.Schedule) -> None:
    """This process is a scheduler that sends `schedule`: serve its periods, next due times and heartbeat, and begin
    the trace of each run it sends."""
    global _scheduler
    _scheduler = _schedules.watch(schedule)
    _scheduler.ticked()


def know_schedule(schedule: _schedules.Schedule) -> None:
    """This process runs the tasks of `schedule`, which another process sends: its console lists them."""
    _schedules.watch(schedule, served=False)


def ticked() -> None:
    """The scheduler of this process ticked."""
    if _scheduler is not None:
        _scheduler.ticked()
