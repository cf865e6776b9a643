"""A service with no OpenTelemetry request instrumentation joins its callers' traces."""

from __future__ import annotations

from starlette.applications import Starlette

import traced_tasks

app = Starlette()
app.add_middleware(traced_tasks.TraceContextMiddleware)
