"""Zero-code instrumentation: trace and count Starlette's own background task classes."""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
from starlette import applications, background
from starlette.types import Receive, Scope, Send

from traced_tasks import _config, _fastapi, _request, _tasks
from traced_tasks._web import server as _server
from traced_tasks.package import _instruments

logger = logging.getLogger("traced_tasks")

# opentelemetry-instrumentation-fastapi wraps BackgroundTask.__call__ in a span of its own unless it finds this
# attribute, which says the method is already wrapped.
_OTEL_FASTAPI_MARK = "_otel_original_call"


def _init(self: background.BackgroundTask, func: Any, *args: Any, **kwargs: Any) -> None:
    _tasks.init(self, func, args, kwargs)


class BackgroundTasksInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """An OpenTelemetry instrumentor that traces and counts Starlette's and FastAPI's background tasks in place,
    for code that keeps importing them from Starlette or FastAPI.

    `opentelemetry-instrument` finds it by its entry point, `traced_tasks`; or call it yourself:

        traced_tasks.BackgroundTasksInstrumentor().instrument(tracer_provider=provider)

    `tracer_provider` and `meter_provider`, as in OpenTelemetry's instrumentations, send task spans and counts to
    those providers: they replace those options of the configuration in force and keep the others, and a later
    `traced_tasks.configure()` keeps them unless it names its own. With TRACED_TASKS_METRICS=opentelemetry, counts
    go to the global meter provider.
    """

    _originals: dict[tuple[type, str], Any]
    _batches: _tasks.Batches
    _metrics_server: _server.MetricsServer | None = None

    def instrumentation_dependencies(self) -> Collection[str]:
        return _instruments

    def _instrument(self, **kwargs: Any) -> None:
        # Never raise: opentelemetry-instrument would skip every instrumentation after this one.
        changes = {name: kwargs.get(name) for name in ("tracer_provider", "meter_provider")}
        try:
            _config.instrumented(**changes)
        except Exception:
            logger.exception("traced_tasks: cannot use the given providers; kept the configuration")
        metrics_server = self._metrics_server = _server.from_environment()
        original_app_call = applications.Starlette.__call__

        async def app_call(app: applications.Starlette, scope: Scope, receive: Receive, send: Send) -> None:
            if metrics_server is not None:
                metrics_server.ensure_started()
            with _request.serving(scope):
                await original_app_call(app, scope, receive, send)

        replacements = {
            (background.BackgroundTask, "__init__"): _init,
            (background.BackgroundTask, "__call__"): _tasks.run,
            (background.BackgroundTasks, "__call__"): _tasks.run_batch,
            (applications.Starlette, "__call__"): app_call,
        }
        self._originals = {key: key[0].__dict__[key[1]] for key in replacements}
        for (owner, name), replacement in replacements.items():
            setattr(owner, name, replacement)
        self._batches = _tasks.Batches()
        self._batches.install()
        if _OTEL_FASTAPI_MARK not in background.BackgroundTask.__dict__:
            setattr(background.BackgroundTask, _OTEL_FASTAPI_MARK, _tasks.run)
        _fastapi.install()

    def _uninstrument(self, **kwargs: Any) -> None:
        _config.uninstrumented()
        for (owner, name), original in self._originals.items():
            setattr(owner, name, original)
        self._originals = {}
        self._batches.uninstall()
        if background.BackgroundTask.__dict__.get(_OTEL_FASTAPI_MARK) is _tasks.run:
            delattr(background.BackgroundTask, _OTEL_FASTAPI_MARK)
        if self._metrics_server is not None:
            self._metrics_server.stop()
            self._metrics_server = None
