from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from starlette.types import ASGIApp

import traced_tasks
from tests.support import Collector, Server, redis_server


@dataclass
class Telemetry:
    """What a test reads back: the spans exported so far and the registry's exact sample values."""

    provider: TracerProvider
    exporter: InMemorySpanExporter
    registry: CollectorRegistry

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def task_spans(self) -> list[ReadableSpan]:
        return [span for span in self.spans() if span.name.startswith("BackgroundTask ")]

    def value(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    registry = CollectorRegistry()
    traced_tasks.configure(tracer_provider=provider, registry=registry)
    yield Telemetry(provider, exporter, registry)
    # Leave a configuration no later test shares: a fresh registry and no SDK.
    traced_tasks.configure(registry=CollectorRegistry())
    provider.shutdown()


@pytest.fixture
def serve() -> Iterator[type[Server]]:
    servers: list[Server] = []

    class Tracked(Server):
        def __init__(self, app: ASGIApp, **options: object) -> None:
            super().__init__(app, **options)
            servers.append(self)

    yield Tracked
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server, for the Celery and taskiq tests of one module: its URL."""
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
def collector() -> Iterator[Collector]:
    """An OTLP/HTTP receiver."""
    with Collector() as receiver:
        yield receiver
