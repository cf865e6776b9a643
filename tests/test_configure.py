from __future__ import annotations

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint
from prometheus_client import CollectorRegistry, Counter

import traced_tasks
from tests.apps.tasks import NAME, ok, run
from tests.conftest import Telemetry
from tests.support import run_python
from traced_tasks import _conventions as names

ZERO_CONFIG = """
import asyncio
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY
from traced_tasks import BackgroundTasks
from traced_tasks import _conventions as names

def cleanup():
    pass

async def batch():
    tasks = BackgroundTasks()
    tasks.add_task(cleanup)
    await tasks()

asyncio.run(batch())  # before the application sets a tracer provider
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
asyncio.run(batch())  # after
print([span.name for span in exporter.get_finished_spans()])
labels = {"task": "__main__.cleanup", "status": "success"}
print(REGISTRY.get_sample_value(names.DURATION.count, labels))
"""


def test_zero_configuration() -> None:
    """With no configure() call, metrics go to the default registry and spans to the global provider once it is set."""
    result = run_python(ZERO_CONFIG)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["['BackgroundTask __main__.cleanup']", "2.0"]


def test_taken_metric_names_fail_clearly_and_keep_the_configuration(telemetry: Telemetry) -> None:
    """A registry that already holds a traced_tasks metric name is refused with advice; the previous one stays."""
    taken = CollectorRegistry()
    Counter(names.SCHEDULED.name, "someone else's", registry=taken)
    with pytest.raises(ValueError, match="another namespace or registry"):
        traced_tasks.configure(registry=taken)
    run((ok, ()))
    assert telemetry.value(names.SCHEDULED.total, task=NAME + "ok") == 1


CLASH = """
import asyncio, logging
logging.basicConfig(level=logging.ERROR, format="%(name)s|%(message)s")
from prometheus_client import REGISTRY, Counter
from starlette.testclient import TestClient
import traced_tasks
from traced_tasks import _conventions as names
Counter(names.WAIT.name, "an older metric of the application")

def cleanup():
    pass

async def batch():
    tasks = traced_tasks.BackgroundTasks()
    tasks.add_task(cleanup)
    await tasks()

asyncio.run(batch())
asyncio.run(batch())
print(REGISTRY.get_sample_value(names.SCHEDULED.total, {"task": "__main__.cleanup"}))
text = TestClient(traced_tasks.metrics_app).get("/").text
print([line for line in text.splitlines() if line.startswith(names.SCHEDULED.total)])
"""


def test_default_registry_clash_never_breaks_add_task() -> None:
    """When the default registry already holds one of the names, add_task still works, the error is logged once,
    nothing of ours is left half-registered there, and metrics_app serves the counts."""
    result = run_python(CLASH)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["None", f"['{names.SCHEDULED.total}{{task=\"__main__.cleanup\"}} 2.0']"]
    assert len([line for line in result.stderr.splitlines() if line.startswith("traced_tasks|")]) == 1


def test_failed_registration_leaves_the_registry_as_it_was(telemetry: Telemetry) -> None:
    """A clash on one name registers none of the seven families, so configure() succeeds once the clash is gone."""
    registry = CollectorRegistry()
    clash = Counter(names.SKIPPED.name, "someone else's", registry=registry)
    with pytest.raises(ValueError, match="already registered"):
        traced_tasks.configure(registry=registry)
    assert [metric.name for metric in registry.collect()] == [names.SKIPPED.name]
    registry.unregister(clash)
    traced_tasks.configure(registry=registry)
    run((ok, ()))
    assert registry.get_sample_value(names.SCHEDULED.total, {"task": NAME + "ok"}) == 1


def scheduled_through(reader: InMemoryMetricReader, instrument: str) -> float:
    """The sum of `instrument`'s points in the reader's next collection."""
    data = reader.get_metrics_data()
    points = [
        point
        for resource in (data.resource_metrics if data else [])
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == instrument
        for point in metric.data.data_points
    ]
    return sum(point.value for point in points if isinstance(point, NumberDataPoint))


def test_a_later_configure_keeps_the_instrumentors_providers(telemetry: Telemetry) -> None:
    """After the instrumentor was given a tracer and a meter provider, configure(namespace=...) keeps both: spans and
    counts still go to them, under the namespace. A configure() that names a registry counts there instead."""
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    instrumentor = traced_tasks.BackgroundTasksInstrumentor()
    instrumentor.instrument(tracer_provider=telemetry.provider, meter_provider=meters)
    try:
        traced_tasks.configure(namespace="shop")
        run((ok, ()))
        assert scheduled_through(reader, "shop." + names.SCHEDULED.instrument) == 1
        assert [span.name for span in telemetry.task_spans()] == ["BackgroundTask " + NAME + "ok"]
        registry = CollectorRegistry()
        traced_tasks.configure(registry=registry)
        run((ok, ()))
        assert registry.get_sample_value(names.SCHEDULED.total, {"task": NAME + "ok"}) == 1
        assert len(telemetry.task_spans()) == 2  # the tracer provider is still the instrumentor's
    finally:
        instrumentor.uninstrument()


ENVIRONMENT_CHOSE = """
import asyncio
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint
import traced_tasks
from tests.test_configure import scheduled_through

reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
traced_tasks.configure(namespace="shop")

def cleanup():
    pass

async def batch():
    tasks = traced_tasks.BackgroundTasks()
    tasks.add_task(cleanup)
    await tasks()

asyncio.run(batch())
print(scheduled_through(reader, "shop.background_task.scheduled"))
"""


def test_a_later_configure_keeps_the_environments_choice() -> None:
    """With TRACED_TASKS_METRICS=opentelemetry, configure(namespace=...) counts through the global MeterProvider."""
    result = run_python(ENVIRONMENT_CHOSE, TRACED_TASKS_METRICS="opentelemetry")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1.0"]
