from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.support import run_python

SCRIPT = """
import asyncio
import traced_tasks
from opentelemetry import trace

provider = traced_tasks.setup_tracing("checkout")

def send_receipt():
    pass

async def main():
    with trace.get_tracer("handler").start_as_current_span("POST /orders"):
        tasks = traced_tasks.BackgroundTasks()
        tasks.add_task(send_receipt)
    await tasks()

asyncio.run(main())
provider.shutdown()
"""


class Collector:
    """A minimal OTLP/HTTP trace receiver: it decodes each export request with the OTLP protobuf schema."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                collector.requests.append(request)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def collector() -> Iterator[Collector]:
    receiver = Collector()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()


def run_script(**env: str) -> subprocess.CompletedProcess[str]:
    result = run_python(SCRIPT, **env)
    assert result.returncode == 0, result.stderr
    return result


def test_spans_travel_over_otlp(collector: Collector) -> None:
    """With OTEL_EXPORTER_OTLP_ENDPOINT set, setup_tracing exports the task span over OTLP/HTTP, under its parent."""
    run_script(OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint)
    spans = [
        span
        for request in collector.requests
        for resource_spans in request.resource_spans
        for scope_spans in resource_spans.scope_spans
        for span in scope_spans.spans
    ]
    by_name = {span.name: span for span in spans}
    task = by_name["BackgroundTask __main__.send_receipt"]
    assert task.parent_span_id == by_name["POST /orders"].span_id
    assert task.trace_id == by_name["POST /orders"].trace_id
    services = {
        attribute.value.string_value
        for request in collector.requests
        for resource_spans in request.resource_spans
        for attribute in resource_spans.resource.attributes
        if attribute.key == "service.name"
    }
    assert services == {"checkout"}


def test_console_by_default() -> None:
    """With no OTLP endpoint, setup_tracing prints spans to standard output."""
    result = run_script()
    assert '"name": "BackgroundTask __main__.send_receipt"' in result.stdout


def test_none_exports_nothing(collector: Collector) -> None:
    """OTEL_TRACES_EXPORTER=none turns export off even with an endpoint set."""
    result = run_script(OTEL_TRACES_EXPORTER="none", OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint)
    assert result.stdout == ""
    assert collector.requests == []
