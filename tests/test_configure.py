from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter

import traced_tasks
from tests.conftest import Telemetry
from tests.test_metrics import PREFIX, ok, run

ROOT = Path(__file__).resolve().parent.parent

ZERO_CONFIG = """
import asyncio
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY
from traced_tasks import BackgroundTasks

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
print(REGISTRY.get_sample_value("background_task_duration_seconds_count", labels))
"""


def test_zero_configuration() -> None:
    """With no configure() call, metrics go to the default registry and spans to the global provider once it is set."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    result = subprocess.run(
        [sys.executable, "-c", ZERO_CONFIG], cwd=ROOT, env=env, capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.splitlines() == ["['BackgroundTask __main__.cleanup']", "2.0"]


def test_taken_metric_names_fail_clearly_and_keep_the_configuration(telemetry: Telemetry) -> None:
    """A registry that already holds a traced_tasks metric name is refused with advice; the previous one stays."""
    taken = CollectorRegistry()
    Counter("background_task_scheduled", "someone else's", registry=taken)
    with pytest.raises(ValueError, match="another namespace or registry"):
        traced_tasks.configure(registry=taken)
    run((ok, ()))
    assert telemetry.value("background_task_scheduled_total", task=PREFIX + "ok") == 1
