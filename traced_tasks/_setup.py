"""A one-call OpenTelemetry SDK setup for services that have none yet."""

from __future__ import annotations

import os
import threading

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from traced_tasks import _shutdown

EXPORTERS_ENV = "OTEL_TRACES_EXPORTER"
_EXPORTERS = ("otlp", "console", "none")

_lock = threading.Lock()


def setup_tracing(service_name: str | None = None) -> TracerProvider:
    """Install a global SDK tracer provider that exports spans in batches from its own thread, and exports what it
    still holds at the end of uvicorn's graceful shutdown, as on SIGTERM.

    Spans go over OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set
    (install `traced-tasks[otlp]`), and to standard output otherwise. `OTEL_TRACES_EXPORTER`, a comma-separated
    list of `otlp`, `console` or `none`, overrides that choice. `OTEL_SERVICE_NAME`, or `service.name` in
    `OTEL_RESOURCE_ATTRIBUTES`, overrides `service_name`.

    When the application already set an SDK tracer provider, or a call before this one did, it is returned as it
    is, with no exporter added: calling this twice is harmless.

        traced_tasks.setup_tracing("checkout")
    """
    with _lock:
        current = trace.get_tracer_provider()
        if isinstance(current, TracerProvider):
            _shutdown.flush_on_stop(current)
            return current
        if not isinstance(current, trace.ProxyTracerProvider):
            raise RuntimeError(
                f"a tracer provider that is not the OpenTelemetry SDK's is already set ({current!r}): spans already "
                "go where it sends them, so remove the setup_tracing() call"
            )
        exporters = _exporters()
        provider = TracerProvider(resource=_resource(service_name))
        for exporter in exporters:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        _shutdown.flush_on_stop(provider)
        return provider


def _resource(service_name: str | None) -> Resource:
    """The environment's resource, with `service_name` where the environment names no service: deployments set
    OTEL_SERVICE_NAME to override a default in code."""
    resource = Resource.create()
    if service_name and str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    return resource


def _exporters() -> list[SpanExporter]:
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    value = os.environ.get(EXPORTERS_ENV, "").strip()
    chosen = [name.strip().lower() for name in value.split(",")] if value else ["otlp" if endpoint else "console"]
    unknown = [name for name in chosen if name not in _EXPORTERS]
    if unknown or ("none" in chosen and len(chosen) > 1):
        raise ValueError(
            f"{EXPORTERS_ENV}={value!r}: setup_tracing() takes a comma-separated list of otlp and console, or none"
        )
    exporters: list[SpanExporter] = []
    for name in dict.fromkeys(chosen):  # once each, in order
        if name == "console":
            exporters.append(ConsoleSpanExporter())
        elif name == "otlp":
            exporters.append(_otlp())
    return exporters


def _otlp() -> SpanExporter:
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise ImportError("exporting spans over OTLP needs the otlp extra: pip install 'traced-tasks[otlp]'") from exc
    return OTLPSpanExporter()
