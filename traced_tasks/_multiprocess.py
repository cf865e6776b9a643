"""prometheus_client's multiprocess mode: the folder it needs, and the gauges of workers that died."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

ENV = "PROMETHEUS_MULTIPROC_DIR"
_LIVE_GAUGE_FILE = re.compile(r"gauge_live\w+?_(\d+)\.db")


def directory() -> str | None:
    return os.environ.get(ENV) or None


def check_directory() -> None:
    """Fail at startup, with what to do, when multiprocess mode is asked for but cannot work."""
    path = directory()
    if path is None:
        return
    if not os.path.isdir(path):
        raise RuntimeError(
            f"{ENV}={path!r} is not a directory: create it (empty) before the server starts, or unset {ENV}"
        )
    if not os.access(path, os.W_OK | os.X_OK):
        raise RuntimeError(f"{ENV}={path!r} is not writable by this process (uid {os.getuid()}): fix its permissions")


def forget_dead_workers(path: str) -> None:
    """Drop the live gauges (in progress) of worker processes that no longer exist.

    prometheus_client keeps a dead worker's files, so its running tasks would count as running forever.
    gunicorn can call mark_process_dead from its child_exit hook; uvicorn --workers has no such hook,
    so every scrape does it.
    """
    pids = {int(match.group(1)) for match in map(_LIVE_GAUGE_FILE.fullmatch, os.listdir(path)) if match}
    for pid in pids - {os.getpid()}:
        if not _alive(pid):
            mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


class _LiveWorkersCollector(MultiProcessCollector):
    def __init__(self, registry: CollectorRegistry, path: str) -> None:
        super().__init__(registry, path)  # type: ignore[no-untyped-call]
        self._folder = path

    def collect(self) -> Iterable[Metric]:
        forget_dead_workers(self._folder)
        metrics: Iterable[Metric] = super().collect()  # type: ignore[no-untyped-call]
        return metrics


def registry(path: str) -> CollectorRegistry:
    """A registry that sums every worker's files on each collection, after dropping dead workers' live gauges."""
    served = CollectorRegistry()
    _LiveWorkersCollector(served, path)
    return served
