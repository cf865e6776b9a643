"""Spans and counts still held when the server stops, exported before the process ends.

uvicorn, on its own, with --workers, and as gunicorn's worker, stops on SIGTERM with a graceful shutdown, then raises
the signal again with its default action: the process ends without running atexit, where the SDK would export what
its batch processor still holds. So the end of uvicorn's graceful shutdown exports them, after the runs it cancelled
have ended. A signal handler of ours could do it for other servers, but would keep a process whose main thread is
stuck in C code from dying on SIGTERM. The meter providers are flushed beside the tracer providers: a pushing reader
exports every minute or so, and a process that ends without atexit would lose its last counts.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider

from traced_tasks import _config

logger = logging.getLogger("traced_tasks")

_providers: list[TracerProvider | MeterProvider] = []
_lock = threading.Lock()
_stalled = threading.Event()  # an export at shutdown did not end in time

# How long runs still in progress when the graceful shutdown ends get to end on their own: uvicorn has just cancelled
# them, and a cancelled task may still await in its `finally`. Those that do not end by then are ended as cancelled.
RUNS_GRACE_SECONDS = 1.0

# How long a worker process that ends (a Celery prefork child, a taskiq worker process) waits for its spans' export.
PROCESS_FLUSH_SECONDS = 3.0


def flush_on_stop(provider: TracerProvider) -> None:
    """Export what `provider` holds when the server stops. Idempotent."""
    _watch(provider)
    _wrap_uvicorn_shutdown()


def _watch(provider: object) -> None:
    if isinstance(provider, (TracerProvider, MeterProvider)):
        with _lock:
            if provider not in _providers:
                _providers.append(provider)


def _watch_in_use() -> None:
    """Watch the providers in use now: the global ones, and those the configurations were given."""
    try:
        _watch(trace.get_tracer_provider())
        _watch(metrics.get_meter_provider())
        for configuration in _config.configurations():
            _watch(configuration.options.tracer_provider)
            _watch(configuration.options.meter_provider)
    except Exception:
        logger.exception("traced_tasks: exporting the spans and counts left at shutdown failed")


def flush_process() -> bool:
    """Export what this process's tracer and meter providers hold (the global ones, those given to configure(),
    those of setup_tracing()), before it ends without atexit: the forked processes of Celery's prefork pool and of
    taskiq's worker end with os._exit. It waits PROCESS_FLUSH_SECONDS at most, the exporter's timeout if shorter: its
    pool replaces a process only once it has ended. Never raises."""
    return flush(timeout=min(PROCESS_FLUSH_SECONDS, _exporter_timeout()))


def flush(abort: Callable[[], bool] = lambda: False, timeout: float | None = None) -> bool:
    """Export what every provider in use now, or watched before, holds, waiting no longer than `timeout`, the
    exporter's timeout by default; `abort()` ends the wait early. Once an export did not end in time (a collector
    that hangs), later calls return at once, so a stop waits for the exporter once. Never raises: it runs at shutdown
    and in a signal handler, where an exception would change how the process ends."""
    if _stalled.is_set():
        return False
    _watch_in_use()
    try:
        deadline = time.monotonic() + (_exporter_timeout() if timeout is None else timeout)
        done = threading.Event()

        def export() -> None:
            try:
                for provider in list(_providers):
                    provider.force_flush()
            except Exception:
                logger.exception("traced_tasks: exporting the spans and counts left at shutdown failed")
            finally:
                done.set()

        # In a thread of its own: the SDK's force_flush waits for the exporter, whatever timeout it is given.
        threading.Thread(target=export, name="traced_tasks-flush", daemon=True).start()
        while not done.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline or abort():
                _stalled.set()
                logger.warning("traced_tasks: the spans and counts left at shutdown were not all exported in time")
                return False
        return True
    except Exception:
        logger.exception("traced_tasks: exporting the spans and counts left at shutdown failed")
        return False


async def end_runs(abort: Callable[[], bool] = lambda: False) -> None:
    """Give the runs still in progress RUNS_GRACE_SECONDS to end, then end the rest as cancelled, so that every run
    that started has its span ended, to be exported, and its outcome counted. Never raises."""
    try:
        deadline = time.monotonic() + RUNS_GRACE_SECONDS
        while in_progress() and time.monotonic() < deadline and not abort():
            await asyncio.sleep(0.01)
        for run in in_progress():
            run.abandon()
    except Exception:
        logger.exception("traced_tasks: ending the runs left at shutdown failed")


def in_progress() -> list[Any]:
    """Every run in progress in this process, under any configuration."""
    return [run for configuration in _config.configurations() for run in configuration.activity.runs()]


def _exporter_timeout() -> float:
    # As the OTLP exporter reads it, in seconds.
    for name in ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"):
        try:
            return float(os.environ[name])
        except (KeyError, ValueError):
            continue
    return 10.0


def _wrap_uvicorn_shutdown() -> None:
    """Export at the end of uvicorn's graceful shutdown, after the running requests, their background tasks and the
    lifespan shutdown ended. With gunicorn --preload the class is patched in the master, and its workers inherit it.
    uvicorn is imported here when it is installed, for a script that imports it after setting up tracing."""
    try:
        import uvicorn.server
    except ImportError:
        return
    server = getattr(uvicorn.server, "Server", None)
    shutdown = getattr(server, "shutdown", None)
    if shutdown is None or getattr(shutdown, "_traced_tasks_flush", False):
        return

    @functools.wraps(shutdown)
    async def flushing_shutdown(self: Any, *args: Any, **kwargs: Any) -> None:
        # A second Ctrl-C (uvicorn's force_exit) ends the waits as it ends uvicorn's.
        def forced() -> bool:
            return bool(getattr(self, "force_exit", False))

        try:
            await shutdown(self, *args, **kwargs)
        finally:
            await end_runs(forced)
            flush(abort=forced)

    flushing_shutdown._traced_tasks_flush = True  # type: ignore[attr-defined]
    server.shutdown = flushing_shutdown  # type: ignore[union-attr]
