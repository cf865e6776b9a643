"""Every metric, label, span and attribute name traced_tasks emits.

The backends, the dashboards (dashboards/generate.py), the alert rules' tests and the test suite read these, so a
rename happens here or nowhere.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """One metric family, under its Prometheus name and as an OpenTelemetry instrument.

    OpenTelemetry's Prometheus translation turns `instrument` and `unit` into `name`: dots become underscores,
    unit `s` appends `_seconds`, `{...}` units add nothing, and counters get `_total`.
    """

    name: str  # Prometheus name, without a counter's `_total`
    kind: str  # counter, histogram or gauge
    help: str
    instrument: str
    unit: str
    # The label after the task's (and route's): the run's status, or the exception's class.
    by: str | None = None
    # How prometheus_client's multiprocess mode combines the processes' values of a gauge.
    multiprocess_mode: str = ""
    # A family sampled from outside the runs (a broker's queue, a scheduler) has labels of its own, not the task's.
    labels: tuple[str, ...] | None = None

    @property
    def total(self) -> str:
        return self.name + "_total"

    @property
    def bucket(self) -> str:
        return self.name + "_bucket"

    @property
    def count(self) -> str:
        return self.name + "_count"

    @property
    def sum(self) -> str:
        return self.name + "_sum"


LABEL_TASK = "task"
LABEL_STATUS = "status"
LABEL_EXCEPTION = "exception"
LABEL_ROUTE = "route"
LABEL_QUEUE = "queue"
LABEL_ENGINE = "engine"


SCHEDULED = Family(
    "background_task_scheduled",
    "counter",
    "Background tasks scheduled (add_task calls).",
    "background_task.scheduled",
    "{task}",
)
WAIT = Family(
    "background_task_wait_seconds",
    "histogram",
    "Time from scheduling a background task to the start of its run, in seconds.",
    "background_task.wait",
    "s",
)
DURATION = Family(
    "background_task_duration_seconds",
    "histogram",
    "Run time of background tasks by outcome, in seconds.",
    "background_task.duration",
    "s",
    by=LABEL_STATUS,
)
IN_PROGRESS = Family(
    "background_task_in_progress",
    "gauge",
    "Background tasks running now.",
    "background_task.in_progress",
    "{task}",
    multiprocess_mode="livesum",  # a dead worker's runs are not running
)
IN_PROGRESS_SINCE = Family(
    "background_task_in_progress_since_timestamp_seconds",
    "gauge",
    "Unix time at which the oldest run of a background task still in progress started.",
    "background_task.in_progress_since.timestamp",
    "s",
    multiprocess_mode="livemin",  # the oldest run of any live worker
)
EXCEPTIONS = Family(
    "background_task_exceptions",
    "counter",
    "Background tasks that failed, by exception class.",
    "background_task.exceptions",
    "{exception}",
    by=LABEL_EXCEPTION,
)
SKIPPED = Family(
    "background_task_skipped",
    "counter",
    "Background tasks never started because an earlier task of their batch failed.",
    "background_task.skipped",
    "{task}",
)
LAST_SUCCESS = Family(
    "background_task_last_success_timestamp_seconds",
    "gauge",
    "Unix time of the last successful run of a background task.",
    "background_task.last_success.timestamp",
    "s",
    multiprocess_mode="max",  # a dead worker's last success still happened
)

# The work that waits in a broker's queue, as a process that serves metrics reads it (see _queues.py); the engine
# is a label too, so that two engines' queues of the same name stay apart.
_QUEUE = (LABEL_ENGINE, LABEL_QUEUE)
QUEUE_DEPTH = Family(
    "background_task_queue_depth",
    "gauge",
    "Messages waiting in a broker's queue, not yet delivered to a worker.",
    "background_task.queue.depth",
    "{message}",
    labels=_QUEUE,
)
QUEUE_OLDEST = Family(
    "background_task_queue_oldest_scheduled_timestamp_seconds",
    "gauge",
    "Unix time at which the oldest message waiting in a queue was scheduled; absent while the queue is empty, or "
    "where the broker cannot tell.",
    "background_task.queue.oldest_scheduled.timestamp",
    "s",
    labels=_QUEUE,
)
QUEUE_CONSUMERS = Family(
    "background_task_queue_consumers",
    "gauge",
    "Consumers attached to a queue, where the broker reports them.",
    "background_task.queue.consumers",
    "{consumer}",
    labels=_QUEUE,
)
QUEUE_SAMPLED = Family(
    "background_task_queue_sampled_timestamp_seconds",
    "gauge",
    "Unix time at which a queue was last read successfully.",
    "background_task.queue.sampled.timestamp",
    "s",
    labels=_QUEUE,
)

# The schedules a scheduler process (Celery beat, taskiq's scheduler) holds, as it serves them (see _schedules.py).
SCHEDULE_PERIOD = Family(
    "background_task_schedule_period_seconds",
    "gauge",
    "Expected time between two runs of a periodic task: its interval, or the gap between its next two due times.",
    "background_task.schedule.period",
    "s",
    labels=(LABEL_TASK,),
)
SCHEDULE_NEXT = Family(
    "background_task_schedule_next_timestamp_seconds",
    "gauge",
    "Unix time at which the scheduler will next send a periodic task.",
    "background_task.schedule.next.timestamp",
    "s",
    labels=(LABEL_TASK,),
)
SCHEDULER_HEARTBEAT = Family(
    "background_task_scheduler_heartbeat_timestamp_seconds",
    "gauge",
    "Unix time of the scheduler's last tick.",
    "background_task.scheduler.heartbeat.timestamp",
    "s",
    labels=(LABEL_ENGINE,),
)

# What every family's name starts with, before a namespace.
PREFIX = "background_task_"

# The families of each task's runs, and those sampled from queues and schedulers.
TASK_FAMILIES = (SCHEDULED, WAIT, DURATION, IN_PROGRESS, IN_PROGRESS_SINCE, EXCEPTIONS, SKIPPED, LAST_SUCCESS)
SAMPLED_FAMILIES = (
    QUEUE_DEPTH,
    QUEUE_OLDEST,
    QUEUE_CONSUMERS,
    QUEUE_SAMPLED,
    SCHEDULE_PERIOD,
    SCHEDULE_NEXT,
    SCHEDULER_HEARTBEAT,
)
FAMILIES = TASK_FAMILIES + SAMPLED_FAMILIES

STATUS_SUCCESS = "success"
STATUS_ERROR = "error"
STATUS_CANCELLED = "cancelled"
STATUS_SKIPPED = "skipped"  # not a metric label value: skipped runs have a family of their own

# The exception label of a run whose process died while it ran: nothing will end it (Celery's name for it).
LOST = "WorkerLostError"

# The label value that stands for every task name, route or exception past its cap.
OVERFLOW = "__overflow__"

EXEMPLAR_TRACE_ID = "trace_id"
EXEMPLAR_SPAN_ID = "span_id"

SPAN_NAME_PREFIX = "BackgroundTask "
# The span of a hand-off to Celery or taskiq that failed (the broker is down), in the process that scheduled it.
PUBLISH_SPAN_PREFIX = "publish "

ATTR_FUNCTION = "code.function.name"
ATTR_FILE = "code.file.path"
ATTR_LINE = "code.line.number"
ATTR_ERROR_TYPE = "error.type"
ATTR_ROUTE = "http.route"
ATTR_STATUS = "background_task.status"
EVENT_EXCEPTION = "exception"
ATTR_EXCEPTION_TYPE = "exception.type"
ATTR_EXCEPTION_STACKTRACE = "exception.stacktrace"

INSTRUMENTATION_NAME = "traced_tasks"
