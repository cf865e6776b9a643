"""The metrics backend for prometheus_client's multiprocess mode: counts in its files, summed over every worker
when scraped, and the folder those files live in. Beside them, each process keeps a file of its runs in progress and
recent failures, so that the task console shows those of every process, whichever one answers."""

from __future__ import annotations

import atexit
import contextlib
import glob
import json
import logging
import math
import os
import re
import threading
import weakref
from collections.abc import Iterable
from typing import Any

from opentelemetry.trace import SpanContext
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from traced_tasks import _conventions as names
from traced_tasks._activity import Activity, View
from traced_tasks._backends.families import label_names, metric_name
from traced_tasks._backends.in_process import exemplar_labels
from traced_tasks._options import MULTIPROCESS_DIR, Options

_KINDS: dict[str, Any] = {"counter": Counter, "histogram": Histogram, "gauge": Gauge}

logger = logging.getLogger("traced_tasks")
_LIVE_GAUGE_FILE = re.compile(r"gauge_live\w+?_(\d+)\.db")
_ACTIVITY_FILE = re.compile(r"traced_tasks_activity_(\d+)\.json")
# How often a process writes its file of runs in progress and failures, when they changed.
ACTIVITY_EVERY_SECONDS = 1.0
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

    def __init__(self, backend: _Families, values: tuple[str, ...]) -> None:
        self.values = values
        self._backend = backend
        self._scheduled = backend.scheduled.labels(*values)
        self._wait = backend.wait.labels(*values)
        self._in_progress = backend.in_progress.labels(*values)
        # Made at this process's first run, not before: prometheus_client writes 0 for a gauge it makes, and a
        # process forked after making it (a prefork pool's, a preloading server's) writes 0 for every one it has.
        # livemin then takes that 0 over every other process's start.
        self._in_progress_since: Any = None
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
        with self._backend.lock:
            self._in_progress.inc()
            self._starts.append(started_at)
            if started_at <= min(self._starts):
                if self._in_progress_since is None:
                    self._in_progress_since = self._backend.in_progress_since.labels(*self.values)
                self._in_progress_since.set(started_at)
        self._backend.files.publish()  # last: what it raises leaves the counts above whole

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
        with self._backend.lock:
            if started_at not in self._starts:  # its start failed before it was counted
                return
            self._in_progress.dec()
            self._starts.remove(started_at)
            self._in_progress_since.set(min(self._starts) if self._starts else _NOTHING_RUNS)


class _Families:
    """The families as prometheus_client metric objects, and the counts of each set of label values: one of each per
    process for one set of names, buckets and labels, whatever configuration counts in them. Two objects for one
    series would each keep their own value, and overwrite each other's in the file."""

    def __init__(self, options: Options, folder: str) -> None:
        self.lock = threading.Lock()
        self.files = _files(folder)
        self.made = {family: _metric(options, family) for family in names.FAMILIES}
        self.scheduled = self.made[names.SCHEDULED]
        self.wait = self.made[names.WAIT]
        self.duration = self.made[names.DURATION]
        self.in_progress = self.made[names.IN_PROGRESS]
        self.in_progress_since = self.made[names.IN_PROGRESS_SINCE]
        self.exceptions = self.made[names.EXCEPTIONS]
        self.skipped = self.made[names.SKIPPED]
        self.last_success = self.made[names.LAST_SUCCESS]
        self.counts: dict[tuple[str, ...], _Counts] = {}


_families: dict[tuple[object, ...], _Families] = {}
_families_lock = threading.Lock()


def _families_for(options: Options, folder: str) -> _Families:
    key = (folder, options.prefix, options.label_names, tuple(options.buckets))
    with _families_lock:
        found = _families.get(key)
        if found is None:
            found = _families[key] = _Families(options, folder)
        return found


class MultiprocessBackend:
    """The families as prometheus_client metric objects, whose values live in the multiprocess folder."""

    def __init__(self, options: Options, folder: str, activity: Activity) -> None:
        self.folder = folder
        self._options = options
        self._registry = options.registry
        self._shared = _families_for(options, folder)
        self._files = self._shared.files
        self._files.watch(activity)

    def open(self) -> None:
        # Registered together, so a clash leaves the registry as it was.
        registered = []
        try:
            for family in self._shared.made.values():
                self._registry.register(family)
                registered.append(family)
        except ValueError:
            for family in registered:
                self._registry.unregister(family)
            raise

    def counts(self, values: tuple[str, ...]) -> _Counts:
        shared = self._shared
        with shared.lock:
            found = shared.counts.get(values)
            if found is None:
                found = shared.counts[values] = _Counts(shared, values)
            return found

    def registry(self) -> CollectorRegistry:
        """A fresh registry that sums every worker's files when collected, as multiprocess mode requires."""
        served = CollectorRegistry()
        served.register(_LiveWorkers(self.folder, metric_name(self._options, names.IN_PROGRESS_SINCE)))
        return served

    def collect(self) -> Iterable[Metric]:
        ours = {metric_name(self._options, family) for family in names.FAMILIES}
        return [metric for metric in self.registry().collect() if metric.name in ours]

    def close(self) -> None:
        for family in self._shared.made.values():
            self._registry.unregister(family)

    def series_limit(self) -> int | None:
        return None

    def activity(self, local: Activity) -> View:
        """The runs in progress and recent failures of every live process, this one's as they are now."""
        return self._files.read(local)

    def processes(self) -> int | None:
        """How many processes count in the folder now: those with runs, or that ran tasks, alive, and this one."""
        return len(
            {pid for pid in _writers(self.folder) | _activity_writers(self.folder) if _alive(pid)} | {os.getpid()}
        )

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
    for _ in range(3):  # a file removed between the listing and the read (a dead worker's) is listed no more
        try:
            return list(MultiProcessCollector.merge(files, accumulate=accumulate))  # type: ignore[no-untyped-call]
        except Exception:
            files = [path for path in files if _readable(path)]
    return list(MultiProcessCollector.merge(files, accumulate=accumulate))  # type: ignore[no-untyped-call]


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


def _activity_writers(folder: str) -> set[int]:
    return {int(match.group(1)) for match in map(_ACTIVITY_FILE.fullmatch, os.listdir(folder)) if match}


class _ActivityFiles:
    """This process's file of runs in progress and recent failures in the folder, written by a thread of its own at
    most every ACTIVITY_EVERY_SECONDS, when it changed; and the files of the other processes, read by the console."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._activities: weakref.WeakSet[Activity] = weakref.WeakSet()
        self._pid: int | None = None  # the process whose thread writes, None until one does
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._unreadable: set[str] = set()
        os.register_at_fork(after_in_child=self._forked)

    def watch(self, activity: Activity) -> None:
        with self._lock:  # the writer thread copies it
            self._activities.add(activity)

    def publish(self) -> None:
        """Start this process's writer, once: the first run of a process calls it, fork or not."""
        if self._pid is not None:
            return
        with self._lock:
            if self._pid is not None:
                return
            # Started, then recorded: a start that fails (no thread to be had) is tried again at the next run.
            threading.Thread(target=self._write_while_running, name="traced_tasks-activity", daemon=True).start()
            self._pid = os.getpid()
            atexit.register(self._remove)

    def read(self, local: Activity) -> View:
        views = [local.view()]
        mine = os.getpid()
        for pid in _activity_writers(self.folder) - {mine}:
            path = self._path(pid)
            if not _alive(pid):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                continue
            try:
                with open(path, encoding="utf-8") as file:
                    views.append(View.from_json(json.load(file)))
            except FileNotFoundError:
                continue
            except Exception:
                if path not in self._unreadable and len(self._unreadable) < 1000:
                    self._unreadable.add(path)
                    logger.warning("traced_tasks: cannot read %s; the console leaves it out", path, exc_info=True)
        return View.merge(views)

    def _path(self, pid: int) -> str:
        return os.path.join(self.folder, f"traced_tasks_activity_{pid}.json")

    def _write_while_running(self) -> None:
        written = b""
        failed = False
        while not self._stop.wait(ACTIVITY_EVERY_SECONDS):
            path = self._path(os.getpid())
            try:
                with self._lock:
                    activities = list(self._activities)
                body = json.dumps(View.merge(activity.view() for activity in activities).to_json()).encode()
                if body != written:
                    with open(path + ".tmp", "wb") as file:
                        file.write(body)
                    os.replace(path + ".tmp", path)  # whole or not at all, for a reader in another process
                    written = body
            except Exception:
                # A full disk, a folder emptied under it: no file rather than a stale one, whose runs would look
                # in progress for as long as this process lives. It tries again each second, and says so once.
                if not failed:
                    logger.exception("traced_tasks: cannot write the runs of this process for the console")
                    failed = True
                written = b""
                for stale in (path, path + ".tmp"):
                    with contextlib.suppress(OSError):
                        os.remove(stale)

    def _remove(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            os.remove(self._path(os.getpid()))

    def _forked(self) -> None:
        # The writer thread of the parent does not exist here: the child's first run starts its own.
        self._pid = None
        self._lock = threading.Lock()
        self._stop = threading.Event()


_all_files: dict[str, _ActivityFiles] = {}


def _files(folder: str) -> _ActivityFiles:
    found = _all_files.get(folder)
    if found is None:
        found = _all_files[folder] = _ActivityFiles(folder)
    return found
