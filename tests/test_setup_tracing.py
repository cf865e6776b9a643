from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tests.support import ROOT, Collector, clean_environment, free_port, run_python, wait_for_http, wait_until
from traced_tasks import _conventions as names

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


def run_script(**env: str) -> subprocess.CompletedProcess[str]:
    result = run_python(SCRIPT, **env)
    assert result.returncode == 0, result.stderr
    return result


def test_spans_travel_over_otlp(collector: Collector) -> None:
    """With OTEL_EXPORTER_OTLP_ENDPOINT set, setup_tracing exports the task span over OTLP/HTTP, under its parent."""
    run_script(OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint)
    by_name = {span.name: span for span in collector.spans()}
    task = by_name["BackgroundTask __main__.send_receipt"]
    assert task.parent_span_id == by_name["POST /orders"].span_id
    assert task.trace_id == by_name["POST /orders"].trace_id
    assert collector.services() == {"checkout"}


def test_console_by_default() -> None:
    """With no OTLP endpoint, setup_tracing prints spans to standard output."""
    result = run_script()
    assert '"name": "BackgroundTask __main__.send_receipt"' in result.stdout


def test_none_exports_nothing(collector: Collector) -> None:
    """OTEL_TRACES_EXPORTER=none turns export off even with an endpoint set."""
    result = run_script(OTEL_TRACES_EXPORTER="none", OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint)
    assert result.stdout == ""
    assert collector.traces == []


SERVERS = {
    "uvicorn": ["{python}", "-m", "uvicorn", "tests.apps.traced_service:app", "--port", "{port}"],
    "uvicorn, lifespan on": [
        "{python}", "-m", "uvicorn", "tests.apps.traced_service:app", "--port", "{port}",
        "--timeout-graceful-shutdown", "1", "--lifespan", "on",
    ],
    "uvicorn, lifespan off": [
        "{python}", "-m", "uvicorn", "tests.apps.traced_service:app", "--port", "{port}",
        "--timeout-graceful-shutdown", "1", "--lifespan", "off",
    ],
    "uvicorn --workers 2": [
        "{python}", "-m", "uvicorn", "tests.apps.traced_service:app", "--port", "{port}", "--workers", "2"
    ],
    "gunicorn": [
        "{bin}/gunicorn", "-k", "uvicorn.workers.UvicornWorker", "-w", "2", "-b", "127.0.0.1:{port}",
        "tests.apps.traced_service:app",
    ],
}  # fmt: skip


@contextlib.contextmanager
def serving(server: str, tmp_path: Path, **env: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`server` running tests/apps/traced_service.py in a process of its own; yields the process and its URL."""
    port = free_port()
    values = {"python": sys.executable, "bin": str(Path(sys.executable).parent), "port": str(port)}
    command = [part.format(**values) for part in SERVERS[server]]
    with (tmp_path / "server.log").open("wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=clean_environment(**env), stdout=log, stderr=log)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for_http(url + "/ping")
            yield process, url
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("server", "stop"),
    [
        ("uvicorn", signal.SIGTERM),
        ("uvicorn", signal.SIGINT),
        ("uvicorn --workers 2", signal.SIGTERM),
        ("uvicorn --workers 2", signal.SIGINT),
        ("gunicorn", signal.SIGTERM),
    ],
    ids=lambda value: value.name if isinstance(value, signal.Signals) else value,
)
def test_spans_queued_at_a_stop_are_exported(
    collector: Collector, tmp_path: Path, server: str, stop: signal.Signals
) -> None:
    """With setup_tracing(), every task's span reaches the collector when the server stops, on SIGTERM as on SIGINT,
    for one uvicorn process, uvicorn --workers 2 and gunicorn's uvicorn workers; tasks still running at the stop
    included. The batch processor would hold the spans 30 s: only the stop can have sent them."""
    endpoint = collector.endpoint
    with serving(server, tmp_path, OTEL_EXPORTER_OTLP_ENDPOINT=endpoint, OTEL_BSP_SCHEDULE_DELAY="30000") as running:
        process, url = running
        for order in range(6):
            with httpx.Client() as client:  # a connection each, so that the kernel spreads them over workers
                client.post(f"{url}/orders/{order}")
        for order in range(2):
            httpx.post(f"{url}/reports/{order}")  # one second of work each, still running at the stop
        process.send_signal(stop)
        process.wait(timeout=60)
    names = [span.name for span in collector.spans() if span.name.startswith("BackgroundTask ")]
    assert sorted(names) == sorted(
        ["BackgroundTask tests.apps.traced_service.send_receipt"] * 6
        + ["BackgroundTask tests.apps.traced_service.build_report"] * 2
    ), (tmp_path / "server.log").read_text()[-3000:]


@pytest.mark.integration
@pytest.mark.parametrize("server", ["uvicorn, lifespan on", "uvicorn, lifespan off"])
def test_runs_cancelled_at_a_stop_are_exported_and_counted(collector: Collector, tmp_path: Path, server: str) -> None:
    """With uvicorn --timeout-graceful-shutdown 1, the runs still in progress at a stop are cancelled: an async task
    that awaits in its `finally`, a plain async task, and a sync task still in its thread each have their span
    exported, marked cancelled, and are counted as cancelled, under lifespan on and off."""
    folder = tmp_path / "metrics"
    folder.mkdir()
    variables = {"OTEL_BSP_SCHEDULE_DELAY": "30000", "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    with serving(server, tmp_path, OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint, **variables) as (process, url):
        for name in ("cleans_up", "waits", "blocks"):
            httpx.post(f"{url}/hang/{name}")
        wait_until(lambda: sum(_running(httpx.get(f"{url}/metrics/").text).values()) == 3)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    log = (tmp_path / "server.log").read_text()[-3000:]
    spans = {
        span.name.rsplit(".", 1)[-1]: span for span in collector.spans() if span.name.startswith("BackgroundTask ")
    }
    assert sorted(spans) == ["blocks", "cleans_up", "waits"], log
    for span in spans.values():
        attributes = {attribute.key: attribute.value.string_value for attribute in span.attributes}
        assert attributes[names.ATTR_STATUS] == names.STATUS_CANCELLED
    registry = CollectorRegistry()
    MultiProcessCollector(registry, str(folder))
    for name in spans:
        labels = {names.LABEL_TASK: f"tests.apps.traced_service.{name}", names.LABEL_STATUS: names.STATUS_CANCELLED}
        assert registry.get_sample_value(names.DURATION.count, labels) == 1, name


def _running(exposition: str) -> dict[str, float]:
    return {
        sample.labels[names.LABEL_TASK]: sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == names.IN_PROGRESS.name
    }


@pytest.mark.integration
def test_a_stop_still_stops_when_the_collector_hangs(tmp_path: Path) -> None:
    """With a collector that never answers, the export at the stop gives up after the exporter's timeout, and the
    process still ends the way SIGTERM ends it."""
    variables = {"OTEL_BSP_SCHEDULE_DELAY": "30000", "OTEL_EXPORTER_OTLP_TIMEOUT": "2"}
    with (
        Collector(hang=True) as collector,
        serving("uvicorn", tmp_path, OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint, **variables) as (process, url),
    ):
        httpx.post(f"{url}/orders/1")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == -signal.SIGTERM
    assert "were not all exported in time" in (tmp_path / "server.log").read_text()


TWICE = """
import logging, threading
logging.basicConfig(level=logging.WARNING, format="%(name)s|%(message)s")
import traced_tasks
from opentelemetry import trace

first = traced_tasks.setup_tracing("checkout")
second = traced_tasks.setup_tracing("checkout")
exporting = [thread for thread in threading.enumerate() if thread.name.startswith("OtelBatchSpan")]
print(first is second is trace.get_tracer_provider(), len(exporting))
"""

AFTER_THE_APPLICATION = """
import traced_tasks
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

exporter = InMemorySpanExporter()
own = TracerProvider()
own.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(own)
returned = traced_tasks.setup_tracing("checkout")
with trace.get_tracer("app").start_as_current_span("work"):
    pass
print(returned is own, len(exporter.get_finished_spans()))
"""


def test_setup_tracing_twice_makes_one_provider() -> None:
    """A second call returns the provider of the first, starts no second export thread and logs nothing."""
    result = run_python(TWICE, OTEL_TRACES_EXPORTER="console")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "1"]
    assert "Overriding" not in result.stderr


def test_setup_tracing_after_the_application_set_a_provider_uses_it() -> None:
    """After the application installed its own SDK provider, setup_tracing() returns that one and adds no exporter:
    the span goes to the application's exporter only, and nothing is printed by a console exporter of ours."""
    result = run_python(AFTER_THE_APPLICATION)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "1"]


@pytest.mark.parametrize(
    "variables",
    [{"OTEL_SERVICE_NAME": "checkout-eu"}, {"OTEL_RESOURCE_ATTRIBUTES": "service.name=checkout-eu,team=shop"}],
    ids=["OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"],
)
def test_the_environment_names_the_service(collector: Collector, variables: dict[str, str]) -> None:
    """A service name in the environment wins over the one passed in code, as deployments expect."""
    run_script(OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint, **variables)
    assert collector.services() == {"checkout-eu"}


def test_a_list_of_exporters(collector: Collector) -> None:
    """OTEL_TRACES_EXPORTER=console,otlp, a list as OpenTelemetry's specification allows, prints the spans and sends
    them over OTLP."""
    result = run_script(OTEL_TRACES_EXPORTER="console,otlp", OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint)
    assert '"name": "BackgroundTask __main__.send_receipt"' in result.stdout
    assert "BackgroundTask __main__.send_receipt" in [span.name for span in collector.spans()]


@pytest.mark.parametrize("value", ["zipkin", "otlp,jaeger", "none,console"])
def test_an_unknown_exporter_is_named(value: str) -> None:
    """An exporter setup_tracing() cannot make stops the service at startup with a message naming the variable and
    the values it takes."""
    result = run_python(SCRIPT, OTEL_TRACES_EXPORTER=value)
    assert result.returncode != 0
    assert f"OTEL_TRACES_EXPORTER={value!r}" in result.stderr
    assert "otlp and console, or none" in result.stderr
