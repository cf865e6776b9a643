"""Where counts go: the interface every metrics backend implements, and the one place that chooses a backend."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from opentelemetry.trace import SpanContext
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from traced_tasks._activity import Activity, View
from traced_tasks._backends import multiprocess
from traced_tasks._backends.in_process import InProcessBackend
from traced_tasks._backends.opentelemetry import OpenTelemetryBackend
from traced_tasks._options import Options


class TaskCounts(Protocol):
    """The counts of one set of label values: (task,) or, with the route label, (task, route).

    Each method is one event of a run, called once, in this order: schedule, then start and one of succeed or fail,
    or skip. `started_at` is the Unix time at which the run started, and `started_at + seconds` when it ended;
    `exemplar` is the span context of a sampled, recording span of the run. Events of one set of label values come
    from many threads at once.
    """

    def schedule(self) -> None: ...

    def start(self, wait: float, started_at: float) -> None: ...

    def succeed(self, seconds: float, started_at: float, exemplar: SpanContext | None) -> None: ...

    def fail(
        self, status: str, seconds: float, started_at: float, exemplar: SpanContext | None, exception: str | None
    ) -> None:
        """A run that raised: status `error` with the exception label value, or `cancelled` with None."""

    def skip(self) -> None: ...


class Backend(Protocol):
    """The metric families of one configuration."""

    def counts(self, values: tuple[str, ...]) -> TaskCounts:
        """The counts of a set of label values; called once for each set."""

    def registry(self) -> CollectorRegistry:
        """The registry `/metrics` serves: what the application registered, and traced_tasks' families."""

    def collect(self) -> Iterable[Metric]:
        """traced_tasks' own families, as prometheus_client's metric families, for the task console."""

    def open(self) -> None:
        """Register the families in the registry, all or none: ValueError when one of the names is taken."""

    def close(self) -> None:
        """Take the families out of the registry."""

    def known_task_names(self) -> set[str]:
        """Task label values other processes already count under, which count toward the cap of task names."""

    def processes(self) -> int | None:
        """How many live processes' counts collect() sums, this one included; None: this process's only."""

    def series_limit(self) -> int | None:
        """The most sets of label values it keeps apart, past which one more stands for the rest; None: no limit."""

    def activity(self, local: Activity) -> View:
        """The runs in progress and recent failures of the processes whose counts collect() sums, `local` being
        this process's."""


def choose(options: Options, activity: Activity) -> Backend:
    """In-process numbers by default, prometheus_client's files in multiprocess mode, and OpenTelemetry's
    instruments when a meter provider is given, whatever the mode: each process then sends its own counts."""
    if options.meter_provider is not None:
        return OpenTelemetryBackend(options, activity)
    folder = multiprocess.directory()
    if folder is not None:
        return multiprocess.MultiprocessBackend(options, folder, activity)
    return InProcessBackend(options, options.registry, activity.running.copy)
