"""Zero-code, in code: Starlette's and FastAPI's own classes, traced and counted in place."""

from __future__ import annotations

# --8<-- [start:example]
from opentelemetry.sdk.trace import TracerProvider

from traced_tasks import BackgroundTasksInstrumentor

provider = TracerProvider()

BackgroundTasksInstrumentor().instrument()  # before the app serves requests
BackgroundTasksInstrumentor().instrument(tracer_provider=provider)  # or: spans to that provider
BackgroundTasksInstrumentor().uninstrument()  # and back: Starlette's own classes again
# --8<-- [end:example]
