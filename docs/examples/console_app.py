"""The task console, with each failure linked to its trace in Jaeger."""

from __future__ import annotations

# --8<-- [start:example]
from fastapi import FastAPI

import traced_tasks

app = FastAPI()
app.mount("/tasks", traced_tasks.make_console_app(trace_url="http://jaeger:16686/trace/{trace_id}"))
# --8<-- [end:example]
