"""A service with no OpenTelemetry request instrumentation joins its callers' traces."""

from __future__ import annotations

# --8<-- [start:example]
from starlette.applications import Starlette

import traced_tasks

app = Starlette()
app.add_middleware(traced_tasks.TraceContextMiddleware)
# --8<-- [end:example]
