"""The libraries traced_tasks instruments, as OpenTelemetry's instrumentations list them."""

_instruments = ("starlette >= 0.37.2",)
