"""Where counts go: the one place that chooses a metrics backend."""

from __future__ import annotations

from traced_tasks._activity import Activity
from traced_tasks._backends import multiprocess
from traced_tasks._backends.base import Backend, TaskCounts, TaskTotals
from traced_tasks._backends.in_process import InProcessBackend
from traced_tasks._backends.opentelemetry import OpenTelemetryBackend
from traced_tasks._options import Options

__all__ = ["Backend", "TaskCounts", "TaskTotals", "choose"]


def choose(options: Options, activity: Activity) -> Backend:
    """In-process numbers by default, prometheus_client's files in multiprocess mode, and OpenTelemetry's
    instruments when a meter provider is given, whatever the mode: each process then sends its own counts."""
    if options.meter_provider is not None:
        return OpenTelemetryBackend(options, activity)
    folder = multiprocess.directory()
    if folder is not None:
        return multiprocess.MultiprocessBackend(options, folder, activity)
    return InProcessBackend(options, options.registry, lambda: (activity,))
