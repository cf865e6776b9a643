"""Run with the oldest versions traced_tasks supports (tests/test_oldest_versions.py): a FastAPI service with
included routers, spans in memory and metrics in a registry; prints what it saw as JSON."""

from __future__ import annotations

import json

import fastapi
import starlette
from fastapi.testclient import TestClient
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest

import traced_tasks
from traced_tasks import BackgroundTasks
from traced_tasks import _conventions as names


class Declined(Exception):
    pass


def send_receipt(order: int) -> None:
    pass


def charge(order: int) -> None:
    raise Declined()


def main() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    registry = CollectorRegistry()
    traced_tasks.configure(tracer_provider=provider, registry=registry, route_label=True)

    users, admins = fastapi.APIRouter(), fastapi.APIRouter()

    @users.post("/{id}")
    @admins.post("/{id}")
    def touch(id: int, tasks: BackgroundTasks) -> str:
        tasks.add_task(send_receipt, id)
        return "ok"

    @admins.post("/{id}/charge")
    def pay(id: int, tasks: BackgroundTasks) -> str:
        tasks.add_task(charge, id)
        tasks.add_task(send_receipt, id)
        return "ok"

    app = fastapi.FastAPI()
    app.include_router(users, prefix="/users")
    app.include_router(admins, prefix="/admins")
    app.add_middleware(traced_tasks.TraceContextMiddleware)
    client = TestClient(app, raise_server_exceptions=False)
    for path in ("/users/1", "/admins/2", "/admins/3/charge"):
        client.post(path)
    spans = [[span.name, (span.attributes or {}).get("http.route")] for span in exporter.get_finished_spans()]
    exposition = generate_latest(registry).decode()

    # The same requests, counted through OpenTelemetry.
    reader = InMemoryMetricReader()
    traced_tasks.configure(tracer_provider=provider, meter_provider=MeterProvider(metric_readers=[reader]))
    for path in ("/users/1", "/admins/2", "/admins/3/charge"):
        client.post(path)
    data = reader.get_metrics_data()
    assert data is not None
    durations = [
        point
        for resource_metrics in data.resource_metrics
        for scope_metrics in resource_metrics.scope_metrics
        for metric in scope_metrics.metrics
        if metric.name == names.DURATION.instrument
        for point in metric.data.data_points
        if isinstance(point, HistogramDataPoint)
    ]
    print(
        json.dumps(
            {
                "versions": {"fastapi": fastapi.__version__, "starlette": starlette.__version__},
                "spans": spans,
                "exposition": exposition,
                "otel_bounds": sorted({tuple(point.explicit_bounds) for point in durations}),
                "otel_runs": sum(point.count for point in durations),
            }
        )
    )


if __name__ == "__main__":
    main()
