"""The task console, with each failure linked to its trace in Jaeger, and the tasks handed to Celery to the worker's
console."""

from __future__ import annotations

# --8<-- [start:example]
from fastapi import FastAPI

import traced_tasks

app = FastAPI()
app.mount(
    "/tasks",
    traced_tasks.make_console_app(
        trace_url="http://jaeger:16686/trace/{trace_id}",
        engine_consoles={"celery": "http://worker:9100/tasks/"},  # where the Celery worker's console is
    ),
)
# --8<-- [end:example]
