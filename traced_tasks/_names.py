"""Every metric, label, span and attribute name traced_tasks emits.

The dashboards, the alert rules and the tests read these, so a rename happens here or nowhere.
"""

from __future__ import annotations

# Metric names without a namespace; prometheus_client adds `_total` to counters in the exposition.
SCHEDULED = "background_task_scheduled"
WAIT = "background_task_wait_seconds"
DURATION = "background_task_duration_seconds"
IN_PROGRESS = "background_task_in_progress"
EXCEPTIONS = "background_task_exceptions"
SKIPPED = "background_task_skipped"
LAST_SUCCESS = "background_task_last_success_timestamp_seconds"

LABEL_TASK = "task"
LABEL_STATUS = "status"
LABEL_EXCEPTION = "exception"
LABEL_ROUTE = "route"

STATUS_SUCCESS = "success"
STATUS_ERROR = "error"
STATUS_CANCELLED = "cancelled"

# The label value that stands for every task name or exception past its cap.
OVERFLOW = "__overflow__"

EXEMPLAR_TRACE_ID = "trace_id"
EXEMPLAR_SPAN_ID = "span_id"

SPAN_NAME_PREFIX = "BackgroundTask "

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
