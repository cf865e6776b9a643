"""Write the Grafana dashboards in this folder from one description.

    python dashboards/generate.py

The JSON files are committed; a test fails when they differ from what this script writes. Metric names come from
traced_tasks' list of everything it emits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from traced_tasks import _conventions as names

HERE = Path(__file__).resolve().parent

SELECTOR = 'job=~"$job", instance=~"$instance", task=~"$task"'
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
TAGS = ["traced_tasks", "background-tasks"]
SCHEMA_VERSION = 39
ERRORS = 'status="error"'


def rate(metric: str, extra: str = "", window: str = "$__rate_interval", func: str = "rate") -> str:
    selector = SELECTOR + (f", {extra}" if extra else "")
    return f"{func}({metric}{{{selector}}}[{window}])"


def quantile(q: float, metric: str, by: str = "le", window: str = "$__rate_interval", func: str = "rate") -> str:
    return f"histogram_quantile({q}, sum by ({by}) ({rate(metric, window=window, func=func)}))"


def target(expr: str, legend: str, ref: str, **extra: Any) -> dict[str, Any]:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": ref, **extra}


def panel(
    title: str,
    description: str,
    unit: str,
    targets: list[dict[str, Any]],
    grid: tuple[int, int, int, int],
    kind: str = "timeseries",
    overrides: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    x, y, w, h = grid
    result: dict[str, Any] = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": overrides or []},
        "options": (
            {"showHeader": True}
            if kind == "table"
            else {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max"]}}
        ),
        "targets": targets,
    }
    if kind == "timeseries":
        result["fieldConfig"]["defaults"]["custom"] = {"fillOpacity": 10, "showPoints": "never"}
    result.update(extra)
    return result


def table(
    title: str,
    description: str,
    unit: str,
    targets: list[dict[str, Any]],
    grid: tuple[int, int, int, int],
    columns: list[str],
    sort_by: str,
    overrides: list[dict[str, Any]],
) -> dict[str, Any]:
    """A table of instant queries merged on their labels: the values of the Nth target are the Nth of `columns`."""
    renamed = {f"Value #{item['refId']}": column for item, column in zip(targets, columns, strict=True)}
    return panel(
        title,
        description,
        unit,
        targets,
        grid,
        kind="table",
        overrides=overrides,
        transformations=[
            {"id": "merge", "options": {}},
            {
                "id": "organize",
                "options": {
                    "excludeByName": {"Time": True},
                    "renameByName": renamed,
                },
            },
            {"id": "sortBy", "options": {"sort": [{"field": sort_by, "desc": True}]}},
        ],
    )


def variables(extra: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    def query(name: str, label: str, expr: str) -> dict[str, Any]:
        return {
            "name": name,
            "label": label,
            "type": "query",
            "datasource": DATASOURCE,
            "query": {"query": f"label_values({expr}, {name})", "refId": f"{name}-values"},
            "definition": f"label_values({expr}, {name})",
            "refresh": 2,
            "multi": True,
            "includeAll": True,
            "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "sort": 1,
        }

    return {
        "list": [
            {
                "name": "datasource",
                "label": "Data source",
                "type": "datasource",
                "query": "prometheus",
                "current": {},
                "refresh": 1,
            },
            query("job", "Job", names.SCHEDULED.total),
            query("instance", "Instance", f'{names.SCHEDULED.total}{{job=~"$job"}}'),
            query("task", "Task", f'{names.SCHEDULED.total}{{job=~"$job", instance=~"$instance"}}'),
            *(extra or []),
        ]
    }


def dashboard(uid: str, title: str, description: str, panels: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    for index, item in enumerate(panels, start=1):
        item["id"] = index
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": TAGS,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "timezone": "browser",
        "templating": variables(extra.pop("extra_variables", None)),
        "annotations": {"list": []},
        "links": [],
        "panels": panels,
        **extra,
    }


def longest_running(grid: tuple[int, int, int, int]) -> dict[str, Any]:
    """How long the oldest run in progress of each task has been running, on each instance: a hung task climbs
    without end, on the instance whose console shows where it waits."""
    return panel(
        "Longest-running run",
        "For each task and instance, how long its oldest run still in progress has been running. A run that never "
        "ends (a socket with no timeout, a deadlock) climbs here while nothing else shows it; BackgroundTaskHung "
        "fires at 15 minutes. Open that instance's task console to see where the run waits.",
        "s",
        [
            target(
                f"time() - min by (instance, task) ({names.IN_PROGRESS_SINCE.name}{{{SELECTOR}}} < +Inf)",
                "{{task}} on {{instance}}",
                "A",
            )
        ],
        grid,
    )


# The queues and schedules are read by several processes (web replicas, workers, the scheduler): one value each.
QUEUES = 'job=~"$job"'


def waiting(y: int) -> list[dict[str, Any]]:
    """The work that waits in each queue: how much, how old, and who consumes it."""
    by_queue = "max by (engine, queue)"
    return [
        panel(
            "Waiting: depth by queue",
            "Messages waiting in each broker queue, not yet delivered to a worker. A queue that only grows has "
            "consumers that do not keep up, or none.",
            "short",
            [target(f"{by_queue} ({names.QUEUE_DEPTH.name}{{{QUEUES}}})", "{{engine}} {{queue}}", "A")],
            (0, y, 8, 8),
        ),
        panel(
            "Waiting: age of the oldest",
            "How long ago the oldest message waiting in each queue was scheduled: how far behind the workers are. "
            "BackgroundTaskBacklogOld fires at 5 minutes. RabbitMQ cannot tell it.",
            "s",
            [target(f"time() - {by_queue} ({names.QUEUE_OLDEST.name}{{{QUEUES}}})", "{{engine}} {{queue}}", "A")],
            (8, y, 8, 8),
        ),
        panel(
            "Waiting: consumers",
            "Consumers attached to each queue, where the broker reports them (RabbitMQ, Redis streams). A queue with "
            "work and none is BackgroundTaskQueueNoConsumer.",
            "short",
            [target(f"{by_queue} ({names.QUEUE_CONSUMERS.name}{{{QUEUES}}})", "{{engine}} {{queue}}", "A")],
            (16, y, 8, 8),
        ),
    ]


def schedules(y: int) -> dict[str, Any]:
    """Each periodic task: its period, when it is next due, its last success, and whether it is overdue."""
    period = f'max by (task) ({names.SCHEDULE_PERIOD.name}{{task=~"$task"}})'
    success = f'max by (task) ({names.LAST_SUCCESS.name}{{task=~"$task"}})'
    targets = [
        target(period, "period", "A", instant=True, format="table"),
        target(
            f'max by (task) ({names.SCHEDULE_NEXT.name}{{task=~"$task"}}) - time()',
            "due in",
            "B",
            instant=True,
            format="table",
        ),
        target(f"time() - {success} and on (task) {period}", "last success", "C", instant=True, format="table"),
        target(
            # 1 when overdue: no success within the period and the grace of BackgroundTaskScheduleOverdue.
            f"time() - {success} > bool on (task) {period} + 300",
            "overdue",
            "D",
            instant=True,
            format="table",
        ),
    ]
    return table(
        "Schedules",
        "Each periodic task the scheduler holds (Celery beat, taskiq's scheduler): its period, how long until it is "
        "next due, how long since it last succeeded in any job, and 1 when that is more than its period and 5 "
        "minutes (BackgroundTaskScheduleOverdue).",
        "s",
        targets,
        (0, y, 24, 8),
        columns=["period", "due in", "since last success", "overdue"],
        sort_by="overdue",
        overrides=[
            {"matcher": {"id": "byName", "options": "overdue"}, "properties": [{"id": "unit", "value": "bool_yes_no"}]}
        ],
    )


def overview() -> dict[str, Any]:
    runs = names.DURATION.count
    duration = names.DURATION.bucket
    # Counters only: each task is counted once when scheduled, once when it starts (its wait is observed)
    # and once if skipped; what is left is work dropped before it started, plus tasks still waiting. A task that
    # never started has no wait series through OpenTelemetry, whose histograms begin at their first measurement:
    # `or` counts it as 0 there.
    scheduled = f"sum by (task) ({rate(names.SCHEDULED.total, func='increase')})"
    never_started = (
        f"{scheduled}"
        f" - (sum by (task) ({rate(names.WAIT.count, func='increase')}) or 0 * {scheduled})"
        f" - (sum by (task) ({rate(names.SKIPPED.total, func='increase')}) or 0 * {scheduled})"
    )
    top_runs = f"topk(10, sum by (task) ({rate(runs, window='$__range', func='increase')}))"
    top = f" and on (task) {top_runs}"  # the same ten tasks in every column
    table_targets = [
        target(top_runs, "runs", "A", instant=True, format="table"),
        target(
            f"sum by (task) ({rate(runs, ERRORS, window='$__range', func='increase')}){top}",
            "errors",
            "B",
            instant=True,
            format="table",
        ),
        target(
            quantile(0.95, duration, by="task, le", window="$__range", func="increase") + top,
            "p95",
            "C",
            instant=True,
            format="table",
        ),
        target(
            quantile(0.95, names.WAIT.bucket, by="task, le", window="$__range", func="increase") + top,
            "wait p95",
            "D",
            instant=True,
            format="table",
        ),
    ]
    panels = [
        panel(
            "Runs by status",
            "Finished task runs per second, by outcome: success, error or cancelled.",
            "ops",
            [target(f"sum by (status) ({rate(runs)})", "{{status}}", "A")],
            (0, 0, 12, 8),
        ),
        panel(
            "Error ratio",
            "Share of finished runs that raised, over all selected tasks.",
            "percentunit",
            [
                target(
                    # An error series exists only once a task failed: count none as zero, not as no data.
                    f"(sum({rate(runs, ERRORS)}) or vector(0)) / sum({rate(runs)})",
                    "error ratio",
                    "A",
                )
            ],
            (12, 0, 12, 8),
        ),
        panel(
            "Run time percentiles",
            "p50, p95 and p99 of task run time. Exemplars link each point to the trace of one run.",
            "s",
            [
                target(quantile(0.5, duration), "p50", "A", exemplar=True),
                target(quantile(0.95, duration), "p95", "B", exemplar=True),
                target(quantile(0.99, duration), "p99", "C", exemplar=True),
            ],
            (0, 8, 12, 8),
        ),
        panel(
            "Wait time p95 by task",
            "p95 of the time from add_task to the start of the run: response sending plus earlier tasks of the batch.",
            "s",
            [target(quantile(0.95, names.WAIT.bucket, by="task, le"), "{{task}}", "A")],
            (12, 8, 12, 8),
        ),
        panel(
            "In progress",
            "Tasks running now, by task.",
            "short",
            [target(f"sum by (task) ({names.IN_PROGRESS.name}{{{SELECTOR}}})", "{{task}}", "A")],
            (0, 16, 8, 8),
        ),
        panel(
            "Skipped",
            "Tasks per second that never started because an earlier task of their batch failed.",
            "ops",
            [target(f"sum by (task) ({rate(names.SKIPPED.total)})", "{{task}}", "A")],
            (8, 16, 8, 8),
        ),
        panel(
            "Scheduled, never started",
            "Tasks scheduled in each interval minus those that started or were skipped: tasks dropped because the "
            "endpoint raised after add_task or returned its own background, plus tasks still waiting to start. "
            "Short spikes are tasks crossing an interval boundary; a lasting positive value is lost work.",
            "short",
            [target(never_started, "{{task}}", "A")],
            (16, 16, 8, 8),
        ),
        panel(
            "Exceptions by type",
            "Failed runs per second, by task and exception class.",
            "ops",
            [
                target(
                    f"sum by (task, exception) ({rate(names.EXCEPTIONS.total)})",
                    "{{task}}: {{exception}}",
                    "A",
                )
            ],
            (0, 24, 12, 8),
        ),
        table(
            "Top tasks over the range",
            "The ten tasks with the most runs in the dashboard's time range, with their errors, p95 run time and "
            "p95 wait.",
            "short",
            table_targets,
            (12, 24, 12, 8),
            columns=["runs", "errors", "p95 run time", "p95 wait"],
            sort_by="runs",
            overrides=[
                {"matcher": {"id": "byRegexp", "options": "p95.*"}, "properties": [{"id": "unit", "value": "s"}]}
            ],
        ),
        longest_running((0, 32, 24, 8)),
        *waiting(40),
        schedules(48),
    ]
    return dashboard(
        "traced-tasks-overview",
        "Background tasks: overview",
        "Every background task traced_tasks sees: runs, failures, run and wait time, skipped and lost work, the work "
        "that waits in the queues, and the schedules.",
        panels,
    )


def per_task() -> dict[str, Any]:
    runs = names.DURATION.count
    duration = names.DURATION.bucket
    jaeger_search = "${jaeger_url}/search?service=${service}&operation=BackgroundTask%20${task}&limit=20"
    trace_link = {"title": "Traces of ${task} in Jaeger", "url": jaeger_search, "targetBlank": True}
    span_link = {
        "title": "Traces of ${__field.labels.task} in Jaeger",
        "url": "${jaeger_url}/search?service=${service}&operation=BackgroundTask%20${__field.labels.task}&limit=20",
        "targetBlank": True,
    }
    panels = [
        panel(
            "Runs by status",
            "Finished runs per second of the selected tasks, by outcome.",
            "ops",
            [target(f"sum by (task, status) ({rate(runs)})", "{{task}} {{status}}", "A")],
            (0, 0, 12, 8),
            links=[trace_link],
        ),
        panel(
            "Errors by exception",
            "Failed runs per second, by exception class.",
            "ops",
            [
                target(
                    f"sum by (task, exception) ({rate(names.EXCEPTIONS.total)})",
                    "{{task}}: {{exception}}",
                    "A",
                )
            ],
            (12, 0, 12, 8),
        ),
        panel(
            "Run time distribution",
            "How many runs fell in each run-time bucket, per interval.",
            "s",
            [target(f"sum by (le) ({rate(duration)})", "{{le}}", "A", format="heatmap")],
            (0, 8, 12, 9),
            kind="heatmap",
            options={
                "calculate": False,
                "yAxis": {"unit": "s"},
                "color": {"scheme": "Oranges", "mode": "scheme"},
                "cellGap": 1,
                "exemplars": {"color": "rgba(255,0,255,0.7)"},
            },
        ),
        panel(
            "Run time percentiles",
            "p50, p95 and p99 run time by task; exemplars open the trace of one run, the data link lists its traces.",
            "s",
            [
                target(quantile(0.5, duration, by="task, le"), "{{task}} p50", "A", exemplar=True),
                target(quantile(0.95, duration, by="task, le"), "{{task}} p95", "B", exemplar=True),
                target(quantile(0.99, duration, by="task, le"), "{{task}} p99", "C", exemplar=True),
            ],
            (12, 8, 12, 9),
        ),
        panel(
            "Wait time",
            "p50 and p95 of the time from add_task to the start of the run.",
            "s",
            [
                target(quantile(0.5, names.WAIT.bucket, by="task, le"), "{{task}} p50", "A"),
                target(quantile(0.95, names.WAIT.bucket, by="task, le"), "{{task}} p95", "B"),
            ],
            (0, 17, 12, 8),
        ),
        panel(
            "Skipped and in progress",
            "Runs per second skipped after an earlier failure in their batch, and tasks running now.",
            "short",
            [
                target(f"sum by (task) ({rate(names.SKIPPED.total)})", "{{task}} skipped/s", "A"),
                target(f"sum by (task) ({names.IN_PROGRESS.name}{{{SELECTOR}}})", "{{task}} running", "B"),
            ],
            (12, 17, 12, 8),
        ),
        longest_running((0, 25, 24, 8)),
    ]
    panels[3]["fieldConfig"]["defaults"]["links"] = [span_link]
    text_variable = {"type": "textbox", "current": {}, "hide": 0}
    return dashboard(
        "traced-tasks-task",
        "Background tasks: per task",
        "One or a few background tasks in detail, with links to their traces in Jaeger.",
        panels,
        extra_variables=[
            {
                **text_variable,
                "name": "service",
                "label": "Service (Jaeger)",
                "query": "",
                "description": "The service.name your spans are exported with.",
            },
            {
                **text_variable,
                "name": "jaeger_url",
                "label": "Jaeger URL",
                "query": "http://localhost:16686",
                "current": {"text": "http://localhost:16686", "value": "http://localhost:16686"},
            },
        ],
        links=[{"title": "Overview", "type": "dashboards", "tags": TAGS, "asDropdown": False}],
    )


DASHBOARDS = {"overview.json": overview, "task.json": per_task}


def render(name: str) -> str:
    return json.dumps(DASHBOARDS[name](), indent=2) + "\n"


def main() -> None:
    for name in DASHBOARDS:
        (HERE / name).write_text(render(name))


if __name__ == "__main__":
    main()
