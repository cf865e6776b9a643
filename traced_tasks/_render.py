"""The in-process counts in the Prometheus text format or OpenMetrics, written straight from the numbers.

prometheus_client builds a Sample per line and formats each on its own; with a thousand task names that is
tens of thousands of lines and a quarter of a second. Here each task's label string is escaped once.
"""

from __future__ import annotations

import math

from traced_tasks import _names as names
from traced_tasks._local import LocalMetrics, _Histogram
from traced_tasks._metrics import HELP, exemplar_labels


def render(metrics: LocalMetrics, openmetrics: bool) -> bytes:
    """Every family of `metrics`, in the format prometheus_client would write them, without _created series."""
    tasks = metrics.snapshot()
    labelled = [(task, _labels(dict(zip(metrics.labelnames, task.values, strict=True)))) for task in tasks]
    prefix = metrics.prefix
    lines: list[str] = []

    def header(name: str, kind: str) -> str:
        # Text format names a counter family by its sample, OpenMetrics by the name without _total.
        exposed = name if openmetrics or kind != "counter" else name + "_total"
        lines.append(f"# HELP {prefix}{exposed} {HELP[name]}")
        lines.append(f"# TYPE {prefix}{exposed} {kind}")
        return prefix + name

    name = header(names.SCHEDULED, "counter")
    lines += [f"{name}_total{{{labels}}} {_number(task.scheduled)}" for task, labels in labelled]
    name = header(names.WAIT, "histogram")
    for task, labels in labelled:
        _histogram(lines, name, labels, task.wait, metrics.le, openmetrics)
    name = header(names.DURATION, "histogram")
    for task, _ in labelled:
        for status, histogram in task.durations.items():
            labels = _labels({**dict(zip(metrics.labelnames, task.values, strict=True)), names.LABEL_STATUS: status})
            _histogram(lines, name, labels, histogram, metrics.le, openmetrics)
    name = header(names.IN_PROGRESS, "gauge")
    lines += [f"{name}{{{labels}}} {_number(task.in_progress)}" for task, labels in labelled]
    name = header(names.EXCEPTIONS, "counter")
    for task, labels in labelled:
        for exception, count in task.exceptions.items():
            # Label names in prometheus_client's order, sorted: exception, then route and task.
            lines.append(f'{name}_total{{exception="{_escape(exception)}",{labels}}} {_number(count)}')
    name = header(names.SKIPPED, "counter")
    lines += [f"{name}_total{{{labels}}} {_number(task.skipped)}" for task, labels in labelled]
    name = header(names.LAST_SUCCESS, "gauge")
    lines += [f"{name}{{{labels}}} {_number(task.last_success)}" for task, labels in labelled]
    lines.append("")
    return "\n".join(lines).encode()


def _histogram(
    lines: list[str], name: str, labels: str, histogram: _Histogram, le: list[str], openmetrics: bool
) -> None:
    total = 0.0
    for bound, count, exemplar in zip(le, histogram.counts, histogram.exemplars, strict=True):
        total += count
        line = f'{name}_bucket{{le="{bound}",{labels}}} {_number(total)}'  # le sorts before the others
        if openmetrics and exemplar is not None:
            span_context, value, timestamp = exemplar
            ids = exemplar_labels(span_context)
            if ids is not None:
                pairs = ",".join(f'{key}="{item}"' for key, item in sorted(ids.items()))
                line += f" # {{{pairs}}} {_number(value)} {timestamp!r}"
        lines.append(line)
    lines.append(f"{name}_count{{{labels}}} {_number(total)}")
    lines.append(f"{name}_sum{{{labels}}} {_number(histogram.sum)}")


def _labels(pairs: dict[str, str]) -> str:
    return ",".join(f'{name}="{_escape(value)}"' for name, value in sorted(pairs.items()))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))
