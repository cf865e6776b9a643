"""Traced and counted Starlette and FastAPI background tasks.

from traced_tasks import BackgroundTasks      # instead of fastapi's or starlette's
app.mount("/metrics", traced_tasks.metrics_app)
app.mount("/tasks", traced_tasks.console_app)  # a page for people
"""

from traced_tasks import _fastapi, package, testing
from traced_tasks._backends import multiprocess as _multiprocess
from traced_tasks._config import configure, declare
from traced_tasks._conventions import OVERFLOW
from traced_tasks._instrumentor import BackgroundTasksInstrumentor
from traced_tasks._middleware import TraceContextMiddleware
from traced_tasks._options import DEFAULT_BUCKETS
from traced_tasks._setup import setup_tracing
from traced_tasks._tasks import BackgroundTask, BackgroundTasks
from traced_tasks._version import __version__
from traced_tasks._web.console import make_console_app
from traced_tasks._web.metrics import make_metrics_app

__all__ = [
    "DEFAULT_BUCKETS",
    "OVERFLOW",
    "BackgroundTask",
    "BackgroundTasks",
    "BackgroundTasksInstrumentor",
    "TraceContextMiddleware",
    "__version__",
    "configure",
    "console_app",
    "declare",
    "make_console_app",
    "make_metrics_app",
    "metrics_app",
    "package",
    "setup_tracing",
    "testing",
]

_multiprocess.check_directory()
_multiprocess.announce()

metrics_app = make_metrics_app()
"""The /metrics ASGI app for the configuration in force: `app.mount("/metrics", traced_tasks.metrics_app)`.

It requires `Authorization: Bearer <token>` while TRACED_TASKS_METRICS_TOKEN is set."""

console_app = make_console_app()
"""The task console for the configuration in force: `app.mount("/tasks", traced_tasks.console_app)`, then open
/tasks/. It requires `Authorization: Bearer <token>` while TRACED_TASKS_METRICS_TOKEN is set, as metrics_app does."""

_fastapi.install()
