"""The metrics backend for prometheus_client's multiprocess mode: counts in its files, summed over every process when
scraped, and the folder those files live in.

Beside them, each process keeps a file of its runs in progress and recent failures (`_ActivityFiles`), so that the
console shows those of every process, whichever one answers; the file exists from the process's start, so that every
live process is counted. A process that died is reaped by the next process that reads the folder: its runs still in
progress, as its live gauge holds them, are counted as failed (`WorkerLostError`: nothing will end them), and its
failures are kept, as the reader's own.
"""

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
import time
import weakref
from collections.abc import Iterable
from typing import Any

from opentelemetry.trace import SpanContext
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from traced_tasks import _conventions as names
from traced_tasks._activity import Activity, Failures, TaskRun, View
from traced_tasks._backends.base import Backend, TaskTotals
from traced_tasks._backends.families import SampledCollector, label_names, metric_name
from traced_tasks._backends.in_process import exemplar_labels
from traced_tasks._options import MULTIPROCESS_DIR, Options

_KINDS: dict[str, Any] = {"counter": Counter, "histogram": Histogram, "gauge": Gauge}

logger = logging.getLogger("traced_tasks")
_LIVE_GAUGE_FILE = re.compile(r"gauge_live\w+?_(\d+)\.db")
_ACTIVITY_FILE = re.compile(r"traced_tasks_activity_(\d+)\.json")
# How often a process writes its file of runs in progress and failures, when they changed; a failure, at once.
ACTIVITY_EVERY_SECONDS = 1.0
# What a process with no run of a task in progress writes for it: `livemin` then takes the other processes' oldest.
_NOTHING_RUNS = math.inf
# A console that asked where runs wait, within this many seconds, gets them from every process's next write.
_STACKS_WANTED_SECONDS = 10.0


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


def announce() -> None:
    """Count this process among the folder's from now on, before it runs or counts anything: at the import of
    traced_tasks, and in each process forked from one that imported it."""
    path = directory()
    if path is not None:
        _files(path).announce()


def _writers(path: str) -> set[int]:
    """The processes with live gauges in the folder: those that ran tasks, alive or not."""
    return {int(match.group(1)) for match in map(_LIVE_GAUGE_FILE.fullmatch, os.listdir(path)) if match}


def _activity_writers(folder: str) -> set[int]:
    return {int(match.group(1)) for match in map(_ACTIVITY_FILE.fullmatch, os.listdir(folder)) if match}


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

    def schedule(self) -> None:
        self._scheduled.inc()

    def start(self, wait: float, started_at: float, oldest: float | None) -> None:
        self._wait.observe(wait)
        self._in_progress.inc()
        self._since(oldest)
        self._backend.files.publish()  # last: what it raises leaves the counts above whole

    def succeed(self, seconds: float, started_at: float, exemplar: SpanContext | None, oldest: float | None) -> None:
        self._finish(oldest)
        self._success.observe(seconds, None if exemplar is None else exemplar_labels(exemplar))
        self._last_success.set(started_at + seconds)

    def fail(
        self,
        status: str,
        seconds: float,
        started_at: float,
        exemplar: SpanContext | None,
        exception: str | None,
        oldest: float | None,
    ) -> None:
        self._finish(oldest)
        self._failed(status, seconds, exemplar, exception)

    def lost(self, seconds: list[float]) -> None:
        """Runs of another process, which died while they ran: each an error, WorkerLostError."""
        for run in seconds:
            self._failed(names.STATUS_ERROR, run, None, names.LOST)

    def skip(self) -> None:
        self._skipped.inc()

    def _failed(self, status: str, seconds: float, exemplar: SpanContext | None, exception: str | None) -> None:
        duration = self._failures.get(status)
        if duration is None:
            duration = self._failures[status] = self._backend.duration.labels(*self.values, status)
        duration.observe(seconds, None if exemplar is None else exemplar_labels(exemplar))
        if exception is not None:
            counter = self._exceptions.get(exception)
            if counter is None:
                counter = self._exceptions[exception] = self._backend.exceptions.labels(*self.values, exception)
            counter.inc()

    def _finish(self, oldest: float | None) -> None:
        self._in_progress.dec()
        self._since(oldest)

    def _since(self, oldest: float | None) -> None:
        # The oldest start of this process's runs, from the activity records that list them. prometheus_client's
        # values lock themselves, and labels() gives every thread the same child.
        if self._in_progress_since is None:
            if oldest is None:
                return
            self._in_progress_since = self._backend.in_progress_since.labels(*self.values)
        self._in_progress_since.set(_NOTHING_RUNS if oldest is None else oldest)


class _Families:
    """The families as prometheus_client metric objects, and the counts of each set of label values: one of each per
    process for one set of names, buckets and labels, whatever configuration counts in them. Two objects for one
    series would each keep their own value, and overwrite each other's in the file."""

    def __init__(self, options: Options, folder: str) -> None:
        self.lock = threading.Lock()
        self.files = _files(folder)
        self.made = {family: _metric(options, family) for family in names.TASK_FAMILIES}
        self.scheduled = self.made[names.SCHEDULED]
        self.wait = self.made[names.WAIT]
        self.duration = self.made[names.DURATION]
        self.in_progress = self.made[names.IN_PROGRESS]
        self.in_progress_since = self.made[names.IN_PROGRESS_SINCE]
        self.exceptions = self.made[names.EXCEPTIONS]
        self.skipped = self.made[names.SKIPPED]
        self.last_success = self.made[names.LAST_SUCCESS]
        self.counts: dict[tuple[str, ...], _Counts] = {}

    def counts_of(self, values: tuple[str, ...]) -> _Counts:
        with self.lock:
            found = self.counts.get(values)
            if found is None:
                found = self.counts[values] = _Counts(self, values)
            return found


_families: dict[tuple[object, ...], _Families] = {}
_families_lock = threading.Lock()


def _families_for(options: Options, folder: str) -> _Families:
    key = (folder, options.prefix, options.label_names, tuple(options.buckets))
    with _families_lock:
        found = _families.get(key)
        if found is None:
            found = _families[key] = _Families(options, folder)
        return found


class MultiprocessBackend(Backend):
    """The families as prometheus_client metric objects, whose values live in the multiprocess folder."""

    sees_all_processes = True

    def __init__(self, options: Options, folder: str, activity: Activity) -> None:
        self.folder = folder
        self._options = options
        self._registry = options.registry
        self._activity = activity
        self._shared = _families_for(options, folder)
        self._files = self._shared.files
        self._files.watch(activity)
        activity.index_by_values()  # the livemin gauge is set at each start and end

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
        return self._shared.counts_of(values)

    def registry(self) -> CollectorRegistry:
        """A fresh registry that sums every process's files when collected, as multiprocess mode requires, with the
        families sampled from queues and schedulers."""
        served = CollectorRegistry()
        served.register(_Folder(self))
        served.register(SampledCollector(self._options))
        return served

    def close(self) -> None:
        for family in self._shared.made.values():
            self._registry.unregister(family)

    def metrics(self) -> list[Metric]:
        """Every process's files, summed, once the processes that died are reaped; without the oldest-start series
        of tasks that no process runs now."""
        self.reap()
        metrics = merge(self.folder, "*.db", accumulate=True)
        since = metric_name(self._options, names.IN_PROGRESS_SINCE)
        for metric in metrics:
            if metric.name == since:
                # 0 until the first set() of a process that just made the series.
                metric.samples = [sample for sample in metric.samples if 0 < sample.value < _NOTHING_RUNS]
        return metrics

    def totals(self) -> list[TaskTotals]:
        self.reap()
        options = self._options
        families = {metric_name(options, family): family for family in names.TASK_FAMILIES}
        keys = options.label_names
        found: dict[tuple[str, ...], TaskTotals] = {}
        bounds = list(options.buckets)
        for metric in merge(self.folder, "*.db", accumulate=False):
            family = families.get(metric.name)
            if family is None:
                continue
            for sample in metric.samples:
                if sample.name.endswith("_created"):
                    continue
                values = tuple(sample.labels.get(key, "") for key in keys)
                task = found.get(values)
                if task is None:
                    task = found[values] = TaskTotals(values, bounds)
                _add(task, family, sample.name, sample.labels, sample.value, bounds)
        return list(found.values())

    def activity(self, local: Activity, stacks_after: float | None = None) -> View:
        """The runs in progress and recent failures of every live process, this one's as they are now."""
        self.reap()
        return self._files.read(local, stacks_after)

    def process_ending(self) -> None:
        self._files.write_now()

    def processes(self) -> int:
        """How many processes count in the folder now: each that loaded traced_tasks or ran a task, alive."""
        return len(
            {pid for pid in _writers(self.folder) | _activity_writers(self.folder) if _alive(pid)} | {os.getpid()}
        )

    def known_task_names(self) -> set[str]:
        """The task label values already in the folder, from processes alive or gone: they count toward the cap."""
        return {values[0] for values in self._known()}

    def known_routes(self) -> set[str]:
        """The route label values already in the folder, with the route label: they count toward its cap."""
        return {values[1] for values in self._known() if len(values) > 1 and values[1]}

    def _known(self) -> set[tuple[str, ...]]:
        scheduled = metric_name(self._options, names.SCHEDULED)
        keys = self._options.label_names
        found: set[tuple[str, ...]] = set()
        for metric in merge(self.folder, "counter_*.db", accumulate=False):
            if metric.name == scheduled:
                found.update(tuple(sample.labels.get(key, "") for key in keys) for sample in metric.samples)
        return found

    def reap(self) -> None:
        """Reap the processes of the folder that died: count their runs still in progress as failed, keep their
        failures as this process's own, and drop their live gauges. One reader reaps each, whichever comes first."""
        folder = self.folder
        try:
            dead = {pid for pid in _writers(folder) | _activity_writers(folder) if not _alive(pid)} - {os.getpid()}
        except OSError:
            return
        for pid in sorted(dead):
            tombstone = os.path.join(folder, f"traced_tasks_reaping_{pid}")
            activity = self._files.path(pid)
            if os.path.isdir(tombstone):
                continue  # another process reaps it now
            if not os.path.exists(activity):
                # Not a process of traced_tasks' (or reaped already): drop its live gauges, as prometheus_client asks.
                with contextlib.suppress(FileNotFoundError):
                    mark_process_dead(pid, folder)  # type: ignore[no-untyped-call]
                continue
            try:
                os.mkdir(tombstone)
            except OSError:
                continue  # another process reaps it now
            try:
                if os.path.exists(activity):
                    self._reap(pid, activity)
            except Exception:
                logger.exception("traced_tasks: cannot reap the files of process %s, which ended", pid)
            finally:
                with contextlib.suppress(OSError):
                    mark_process_dead(pid, folder)  # type: ignore[no-untyped-call]
                with contextlib.suppress(OSError):
                    os.remove(activity)
                with contextlib.suppress(OSError):
                    os.rmdir(tombstone)

    def _reap(self, pid: int, activity: str) -> None:
        now = time.time()
        view = self._files.load(activity) or View()
        options = self._options
        running = metric_name(options, names.IN_PROGRESS)
        since = metric_name(options, names.IN_PROGRESS_SINCE)
        keys = options.label_names
        counts: dict[tuple[str, ...], int] = {}
        oldest: dict[tuple[str, ...], float] = {}
        files = [os.path.join(self.folder, f"gauge_{mode}_{pid}.db") for mode in ("livesum", "livemin")]
        for metric in merge(self.folder, "", accumulate=False, files=[path for path in files if os.path.exists(path)]):
            for sample in metric.samples:
                values = tuple(sample.labels.get(key, "") for key in keys)
                if metric.name == running and sample.value >= 1:
                    counts[values] = round(sample.value)
                elif metric.name == since and 0 < sample.value < _NOTHING_RUNS:
                    oldest[values] = sample.value
        lost: list[TaskRun] = []
        for values, count in counts.items():
            listed = sorted(
                (run for run in view.listed if run.label == values[0] and (len(values) < 2 or run.route == values[1])),
                key=lambda run: run.started_at,
            )[:count]
            first = oldest.get(values, listed[0].started_at if listed else now)
            starts = [run.started_at for run in listed] + [first] * (count - len(listed))
            self._shared.counts_of(values).lost([max(0.0, now - start) for start in starts])
            for index, start in enumerate(starts):
                run = listed[index] if index < len(listed) else None
                route = run.route if run is not None else (values[1] or None) if len(values) > 1 else None
                trace_id = run.trace_id if run is not None else None
                task = run.task if run is not None else values[0]
                lost.append(TaskRun(task, names.STATUS_ERROR, names.LOST, trace_id, max(0.0, now - start), route, now))
        self._activity.absorb([*view.failures, *(Failures.of(run) for run in lost)])
        if counts:
            self._files.publish()


def _add(
    task: TaskTotals, family: names.Family, sample: str, labels: dict[str, str], value: float, bounds: list[float]
) -> None:
    """Add one sample of the merged files, per bucket and not accumulated, to its task's totals."""
    if family is names.SCHEDULED:
        task.scheduled += value
    elif family is names.SKIPPED:
        task.skipped += value
    elif family is names.LAST_SUCCESS:
        task.last_success = max(task.last_success, value)
    elif family in (names.WAIT, names.DURATION) and "le" in labels:
        le = float(labels["le"])
        index = len(bounds) if le == math.inf else bounds.index(le) if le in bounds else None
        if index is None:
            return
        if family is names.WAIT:
            task.wait_buckets[index] += value
            task.started += value
        else:
            task.run_buckets[index] += value
            status = labels.get(names.LABEL_STATUS, names.STATUS_ERROR)
            task.outcomes[status] = task.outcomes.get(status, 0.0) + value


def merge(folder: str, pattern: str, accumulate: bool, files: list[str] | None = None) -> list[Metric]:
    """MultiProcessCollector.merge() of the folder's files that match `pattern` (or of `files`), without those that
    cannot be read: a process killed while it made its file leaves it empty, and one such file would fail every read."""
    files = sorted(glob.glob(os.path.join(folder, pattern))) if files is None else files
    for _ in range(3):  # a file removed between the listing and the read (a dead process's) is listed no more
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
        return False  # removed since it was listed: a dead process's, by another scrape
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


class _Folder:
    """The families of every process's files, as a collector."""

    def __init__(self, backend: MultiprocessBackend) -> None:
        self._backend = backend

    def collect(self) -> Iterable[Metric]:
        return self._backend.metrics()


class _ActivityFiles:
    """This process's file of runs in progress and recent failures in the folder, written by a thread of its own at
    most every ACTIVITY_EVERY_SECONDS when it changed, and at once after a failure; and the files of the other
    processes, read by the console."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._activities: weakref.WeakSet[Activity] = weakref.WeakSet()
        self._pid: int | None = None  # the process whose thread writes, None until one does
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._now = threading.Event()  # write now, not at the next turn
        self._unreadable: set[str] = set()
        os.register_at_fork(after_in_child=self._forked)

    def watch(self, activity: Activity) -> None:
        with self._lock:  # the writer thread copies it
            self._activities.add(activity)
        activity.on_failure = self.publish_now

    def announce(self) -> None:
        """Write this process's file, empty, if it has none yet: the process counts from now on."""
        path = self.path(os.getpid())
        with contextlib.suppress(OSError):
            if not os.path.exists(path):
                self._write(path, json.dumps(View().to_json()).encode())

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
            atexit.register(self.write_now)

    def publish_now(self) -> None:
        """Write at once: a failure, which a process that ends right after must not lose."""
        self.publish()
        self._now.set()

    def want_stacks(self, after: float) -> None:
        """Ask every process to write where its runs older than `after` seconds wait, for a while."""
        with contextlib.suppress(OSError):
            self._write(os.path.join(self.folder, "traced_tasks_stacks_wanted"), repr(after).encode())

    def read(self, local: Activity, stacks_after: float | None) -> View:
        now = time.time()
        if stacks_after is not None:
            self.want_stacks(stacks_after)
        views = [local.view(stacks_after, now)]
        mine = os.getpid()
        for pid in _activity_writers(self.folder) - {mine}:
            if not _alive(pid):
                continue  # reaped by the next read, its failures kept
            found = self.load(self.path(pid))
            if found is not None:
                views.append(found)
        return View.merge(views)

    def load(self, path: str) -> View | None:
        try:
            with open(path, encoding="utf-8") as file:
                return View.from_json(json.load(file))
        except FileNotFoundError:
            return None
        except Exception:
            if path not in self._unreadable and len(self._unreadable) < 1000:
                self._unreadable.add(path)
                logger.warning("traced_tasks: cannot read %s; the console leaves it out", path, exc_info=True)
            return None

    def path(self, pid: int) -> str:
        return os.path.join(self.folder, f"traced_tasks_activity_{pid}.json")

    def write_now(self) -> bool:
        """Write this process's file now, from the calling thread: at the end of a process. Whether it did."""
        try:
            self._write(self.path(os.getpid()), self._body())
        except Exception:
            return False
        return True

    def _body(self) -> bytes:
        with self._lock:
            activities = list(self._activities)
        stacks = self._stacks_wanted()
        now = time.time()
        return json.dumps(View.merge(activity.view(stacks, now) for activity in activities).to_json()).encode()

    def _stacks_wanted(self) -> float | None:
        path = os.path.join(self.folder, "traced_tasks_stacks_wanted")
        try:
            if time.time() - os.path.getmtime(path) > _STACKS_WANTED_SECONDS:
                return None
            with open(path, encoding="utf-8") as file:
                return float(file.read())
        except (OSError, ValueError):
            return None

    def _write(self, path: str, body: bytes) -> None:
        temporary = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(temporary, "wb") as file:
            file.write(body)
        os.replace(temporary, path)  # whole or not at all, for a reader in another process

    def _write_while_running(self) -> None:
        written = b""
        failed = False
        while True:
            self._now.wait(ACTIVITY_EVERY_SECONDS)
            self._now.clear()
            if self._stop.is_set():
                return
            path = self.path(os.getpid())
            try:
                body = self._body()
                if body != written:
                    self._write(path, body)
                    written = body
            except Exception:
                # A full disk, a folder emptied under it: no file rather than a stale one, whose runs would look
                # in progress for as long as this process lives. It tries again each second, and says so once.
                if not failed:
                    logger.exception("traced_tasks: cannot write the runs of this process for the console")
                    failed = True
                written = b""
                with contextlib.suppress(OSError):
                    os.remove(path)

    def stop(self) -> None:
        """Stop this process's writer and remove its file."""
        self._stop.set()
        self._now.set()
        with contextlib.suppress(OSError):
            os.remove(self.path(os.getpid()))

    def _forked(self) -> None:
        # The writer thread of the parent does not exist here: the child's first run starts its own.
        self._pid = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._now = threading.Event()
        with self._lock:
            self._activities = weakref.WeakSet(self._activities)
        self.announce()


_all_files: dict[str, _ActivityFiles] = {}


def _files(folder: str) -> _ActivityFiles:
    found = _all_files.get(folder)
    if found is None:
        found = _all_files[folder] = _ActivityFiles(folder)
    return found
