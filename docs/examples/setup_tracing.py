"""A service with no OpenTelemetry setup yet: one call."""

from __future__ import annotations

# --8<-- [start:example]
import traced_tasks

traced_tasks.setup_tracing("checkout")  # before the app serves requests
# --8<-- [end:example]
