"""A one-call OpenTelemetry SDK setup for services that have none yet."""

from __future__ import annotations

import os

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter


def setup_tracing(service_name: str | None = None) -> TracerProvider:
    """Install a global SDK tracer provider that exports spans in batches from its own thread.

    Spans go over OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
    is set (install `traced-tasks[otlp]`), and to standard output otherwise. `OTEL_TRACES_EXPORTER`
    (`otlp`, `console` or `none`) overrides that choice. Services that already configure OpenTelemetry
    do not need this.

        traced_tasks.setup_tracing("checkout")
    """
    resource = Resource.create({SERVICE_NAME: service_name} if service_name else {})
    provider = TracerProvider(resource=resource)
    exporter = _exporter()
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def _exporter() -> SpanExporter | None:
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    choice = os.environ.get("OTEL_TRACES_EXPORTER", "otlp" if endpoint else "console").strip().lower()
    if choice == "none":
        return None
    if choice == "console":
        return ConsoleSpanExporter()
    if choice != "otlp":
        raise ValueError(
            f"OTEL_TRACES_EXPORTER must be 'otlp', 'console' or 'none' for setup_tracing(), got {choice!r}"
        )
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise ImportError("exporting spans over OTLP needs the otlp extra: pip install 'traced-tasks[otlp]'") from exc
    return OTLPSpanExporter()
