"""The metrics backend for prometheus_client's multiprocess mode: counts in its files, summed over every worker
when scraped, and the folder those files live in."""

from __future__ import annotations

import contextlib
import glob
import logging
import math
import os
import re
import threading
from collections.abc import Iterable
from typing import Any

from opentelemetry.trace import SpanContext
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from traced_tasks import _conventions as names
from traced_tasks._backends.families import label_names, metric_name
from traced_tasks._backends.in_process import exemplar_labels
from traced_tasks._options import MULTIPROCESS_DIR, Options

_KINDS: dict[str, Any] = {"counter": Counter, "histogram": Histogram, "gauge": Gauge}

logger = logging.getLogger("traced_tasks")
_LIVE_GAUGE_FILE = re.compile(r"gauge_live\w+?_(\d+)\.db")
# What a worker with no run of a task in progress writes for it: `livemin` then takes the other workers' oldest.
_NOTHING_RUNS = math.inf


def directory() -> str | None:
    """The multiprocess folder, when multiprocess mode is on."""
    return MULTIPROCESS_DIR.value()


def check_directory() -> None:
    """Fail at startup, with what to do, when multiprocess mode is asked for but cannot work."""
    path = directory()
    if path is None:
        return
    if not os.path.isdir(path):
        raise RuntimeError(
            f"{MULTIPROCESS_DIR.name}={path!r} is not a directory: create it (empty) before the server starts, "
            f"or unset {MULTIPROCESS_DIR.name}"
        )
    if not os.access(path, os.W_OK | os.X_OK):
        raise RuntimeError(
            f"{MULTIPROCESS_DIR.name}={path!r} is not writable by this process (uid {os.getuid()}): fix its permissions"
        )


def forget_dead_workers(path: str) -> None:
    """Drop the live gauges (in progress, and since when) of worker processes that no longer exist.

    prometheus_client keeps a dead worker's files, so its running tasks would count as running forever.
    gunicorn can call mark_process_dead from its child_exit hook; uvicorn --workers has no such hook,
    so every scrape does it.
    """
    for pid in _writers(path) - {os.getpid()}:
        if not _alive(pid):
            # Another scrape, or the console's next refresh, may be removing the same files right now.
            with contextlib.suppress(FileNotFoundError):
                mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


def _writers(path: str) -> set[int]:
    """The processes with live gauges in the folder: the workers that ran tasks, alive or not."""
    return {int(match.group(1)) for match in map(_LIVE_GAUGE_FILE.fullmatch, os.listdir(path)) if match}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


class _Counts:
    """prometheus_client's children for one set of label values, resolved once and reused."""

    __slots__ = (
        "_backend",
        "_exceptions",
        "_failures",
        "_in_progress",
        "_in_progress_since",
        "_last_success",
        "_scheduled",
        "_skipped",
        "_starts",
        "_success",
        "_wait",
        "values",
    )

    def __init__(self, backend: MultiprocessBackend, values: tuple[str, ...]) -> None:
        self.values = values
        self._backend = backend
        self._scheduled = backend.scheduled.labels(*values)
        self._wait = backend.wait.labels(*values)
        self._in_progress = backend.in_progress.labels(*values)
        self._in_progress_since = backend.in_progress_since.labels(*values)
        self._in_progress_since.set(_NOTHING_RUNS)
        self._skipped = backend.skipped.labels(*values)
        self._last_success = backend.last_success.labels(*values)
        self._success = backend.duration.labels(*values, names.STATUS_SUCCESS)
        # The error series from the first schedule, at 0, so that rate() sees a task's first failures; cancelled
        # with its first run.
        self._failures = {names.STATUS_ERROR: backend.duration.labels(*values, names.STATUS_ERROR)}
        # Keyed by label, not class: classes made at run time would grow it without end.
        self._exceptions: dict[str, Any] = {}
        self._starts: list[float] = []  # Unix start times of this worker's runs in progress

    def schedule(self) -> None:
        self._scheduled.inc()

    def start(self, wait: float, started_at: float) -> None:
        self._wait.observe(wait)
        self._in_progress.inc()
        with self._backend.lock:
            self._starts.append(started_at)
            if started_at <= min(self._starts):
                self._in_progress_since.set(started_at)

    def succeed(self, seconds: float, started_at: float, exemplar: SpanContext | None) -> None:
        self._finish(started_at)
        self._success.observe(seconds, None if exemplar is None else exemplar_labels(exemplar))
        self._last_success.set(started_at + seconds)

    def fail(
        self, status: str, seconds: float, started_at: float, exemplar: SpanContext | None, exception: str | None
    ) -> None:
        self._finish(started_at)
        duration = self._failures.get(status)
        if duration is None:
            duration = self._failures[status] = self._backend.duration.labels(*self.values, status)
        duration.observe(seconds, None if exemplar is None else exemplar_labels(exemplar))
        if exception is not None:
            counter = self._exceptions.get(exception)
            if counter is None:
                counter = self._exceptions[exception] = self._backend.exceptions.labels(*self.values, exception)
            counter.inc()

    def skip(self) -> None:
        self._skipped.inc()

    def _finish(self, started_at: float) -> None:
        self._in_progress.dec()
        with self._backend.lock:
            self._starts.remove(started_at)
            self._in_progress_since.set(min(self._starts) if self._starts else _NOTHING_RUNS)


class MultiprocessBackend:
    """The families as prometheus_client metric objects, whose values live in the multiprocess folder."""

    def __init__(self, options: Options, folder: str) -> None:
        self.folder = folder
        self.lock = threading.Lock()
        self._options = options
        self._registry = options.registry
        # Made unregistered, then registered together by open(), so a clash leaves the registry as it was.
        made = {family: _metric(options, family) for family in names.FAMILIES}
        self.scheduled = made[names.SCHEDULED]
        self.wait = made[names.WAIT]
        self.duration = made[names.DURATION]
        self.in_progress = made[names.IN_PROGRESS]
        self.in_progress_since = made[names.IN_PROGRESS_SINCE]
        self.exceptions = made[names.EXCEPTIONS]
        self.skipped = made[names.SKIPPED]
        self.last_success = made[names.LAST_SUCCESS]
        self._families = tuple(made.values())

    def open(self) -> None:
        registered = []
        try:
            for family in self._families:
                self._registry.register(family)
                registered.append(family)
        except ValueError:
            for family in registered:
                self._registry.unregister(family)
            raise

    def counts(self, values: tuple[str, ...]) -> _Counts:
        return _Counts(self, values)

    def registry(self) -> CollectorRegistry:
        """A fresh registry that sums every worker's files when collected, as multiprocess mode requires."""
        served = CollectorRegistry()
        served.register(_LiveWorkers(self.folder, metric_name(self._options, names.IN_PROGRESS_SINCE)))
        return served

    def collect(self) -> Iterable[Metric]:
        ours = {metric_name(self._options, family) for family in names.FAMILIES}
        return [metric for metric in self.registry().collect() if metric.name in ours]

    def close(self) -> None:
        for family in self._families:
            self._registry.unregister(family)

    def series_limit(self) -> int | None:
        return None

    def processes(self) -> int | None:
        """How many worker processes write to the folder now: those with live gauges that are alive, and this one."""
        return len({pid for pid in _writers(self.folder) if _alive(pid)} | {os.getpid()})

    def known_task_names(self) -> set[str]:
        """The task label values already in the folder, from workers alive or gone: they count toward the cap."""
        scheduled = metric_name(self._options, names.SCHEDULED)
        found: set[str] = set()
        for metric in merge(self.folder, "counter_*.db", accumulate=False):
            if metric.name == scheduled:
                found.update(sample.labels[names.LABEL_TASK] for sample in metric.samples)
        return found


def merge(folder: str, pattern: str, accumulate: bool) -> list[Metric]:
    """MultiProcessCollector.merge() of the folder's files that match `pattern`, without those that cannot be read:
    a worker killed while it made its file leaves it empty, and one such file would fail every read."""
    files = sorted(glob.glob(os.path.join(folder, pattern)))
    try:
        return list(MultiProcessCollector.merge(files, accumulate=accumulate))  # type: ignore[no-untyped-call]
    except Exception:
        readable = [path for path in files if _readable(path)]
        return list(MultiProcessCollector.merge(readable, accumulate=accumulate))  # type: ignore[no-untyped-call]


_unreadable: set[str] = set()  # the files logged as unreadable, each once


def _readable(path: str) -> bool:
    try:
        MultiProcessCollector.merge([path], accumulate=False)  # type: ignore[no-untyped-call]
    except FileNotFoundError:
        return False  # removed since it was listed: a dead worker's, by another scrape
    except Exception:
        if path not in _unreadable and len(_unreadable) < 1000:
            _unreadable.add(path)
            logger.warning(
                "traced_tasks: cannot read %s, left by a process of %s=%s; its counts are left out. "
                "Empty the folder before the server or worker starts",
                path,
                MULTIPROCESS_DIR.name,
                os.path.dirname(path),
                exc_info=True,
            )
        return False
    return True


def _metric(options: Options, family: names.Family) -> Any:
    """`family` as a prometheus_client metric object, whose values live in the folder's files."""
    extra: dict[str, Any] = {}
    if family.kind == "histogram":
        extra["buckets"] = options.buckets
    if family.kind == "gauge":
        extra["multiprocess_mode"] = family.multiprocess_mode
    return _KINDS[family.kind](
        family.name, family.help, label_names(options, family), namespace=options.namespace, registry=None, **extra
    )


class _LiveWorkers:
    """Every worker's files, after dropping the live gauges of workers that died, and without the oldest-start
    series of tasks that no worker runs now."""

    def __init__(self, folder: str, since: str) -> None:
        self._folder = folder
        self._since = since

    def collect(self) -> Iterable[Metric]:
        forget_dead_workers(self._folder)
        metrics = merge(self._folder, "*.db", accumulate=True)
        for metric in metrics:
            if metric.name == self._since:
                # 0 until the first set() of a worker that just made the series.
                metric.samples = [sample for sample in metric.samples if 0 < sample.value < _NOTHING_RUNS]
        return metrics
