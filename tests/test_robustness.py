from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.trace import Link, SpanKind
from opentelemetry.util.types import Attributes
from prometheus_client import CollectorRegistry

import traced_tasks
from tests.apps.tasks import NAME, run_batches
from tests.support import run_python
from traced_tasks import _conventions as names


class ExporterDown(SpanProcessor):
    """A span processor that raises where the SDK calls it: on start, on end, or both."""

    def __init__(self, on_start: bool, on_end: bool) -> None:
        self.raise_on_start = on_start
        self.raise_on_end = on_end

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        if self.raise_on_start:
            raise ConnectionError("collector unreachable")

    def on_end(self, span: ReadableSpan) -> None:
        if self.raise_on_end:
            raise ConnectionError("collector unreachable")


class BrokenTracer(trace.Tracer):
    """A tracer implementation whose every span start fails."""

    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        raise RuntimeError("tracer bug")

    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Iterator[trace.Span]:  # type: ignore[override]
        raise RuntimeError("tracer bug")


class BrokenTracerProvider(trace.TracerProvider):
    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return BrokenTracer()


def provider_with(processor: SpanProcessor) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(processor)
    return provider


@pytest.mark.parametrize(
    "make_provider",
    [
        lambda: provider_with(ExporterDown(on_start=True, on_end=False)),
        lambda: provider_with(ExporterDown(on_start=False, on_end=True)),
        lambda: provider_with(ExporterDown(on_start=True, on_end=True)),
        BrokenTracerProvider,
    ],
    ids=["processor-start", "processor-end", "processor-both", "tracer"],
)
def test_tracing_failures_never_change_a_task(
    make_provider: Callable[[], trace.TracerProvider], caplog: pytest.LogCaptureFixture
) -> None:
    """When the tracer or a span processor raises, every task runs once with its own outcome, counts are exact,
    and the failure is logged once per task name, not per run."""
    registry = CollectorRegistry()
    traced_tasks.configure(tracer_provider=make_provider(), registry=registry)
    calls: list[str] = []
    with caplog.at_level(logging.ERROR, logger="traced_tasks"):
        outcomes = run_batches(3, calls)
    assert calls == ["ok", "fail"] * 3
    assert [type(outcome) for outcome in outcomes] == [LookupError] * 3
    assert [str(outcome) for outcome in outcomes] == ["task bug"] * 3

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value(names.SCHEDULED.total, task=NAME + "record") == 6
    assert value(names.DURATION.count, task=NAME + "record", status="success") == 3
    assert value(names.SKIPPED.total, task=NAME + "record") == 3
    assert value(names.DURATION.count, task=NAME + "fail_after", status="error") == 3
    assert value(names.EXCEPTIONS.total, task=NAME + "fail_after", exception="LookupError") == 3
    assert value(names.IN_PROGRESS.name, task=NAME + "fail_after") == 0
    logged = [record.getMessage() for record in caplog.records if record.name == "traced_tasks"]
    assert len(logged) == 2
    assert [NAME + "record" in message for message in logged].count(True) == 1
    assert [NAME + "fail_after" in message for message in logged].count(True) == 1
    traced_tasks.configure(registry=CollectorRegistry())


def test_metrics_failure_never_changes_a_task(tmp_path: Path) -> None:
    """When Prometheus storage fails (multiprocess files gone), tasks still run once with their outcome, and the
    failure is logged once per task name.

    Runs in a subprocess because prometheus_client picks multiprocess mode when it is first imported.
    """
    gone = tmp_path / "gone"
    gone.mkdir()
    script = f"""
import asyncio, logging, os, shutil
logging.basicConfig(level=logging.ERROR, format="%(name)s|%(message)s")
import traced_tasks
from tests.apps.tasks import run_batches
shutil.rmtree({str(gone)!r})
calls = []
outcomes = run_batches(3, calls)
print(calls)
print([type(outcome).__name__ for outcome in outcomes])
"""
    result = run_python(script, PROMETHEUS_MULTIPROC_DIR=str(gone))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [repr(["ok", "fail"] * 3), repr(["LookupError"] * 3)]
    logged = [line for line in result.stderr.splitlines() if line.startswith("traced_tasks|")]
    assert len(logged) == 2, result.stderr
    assert f"{NAME}record;" in logged[0]
    assert f"{NAME}fail_after;" in logged[1]


def test_failures_are_logged_once_per_kind_and_task_name(caplog: pytest.LogCaptureFixture) -> None:
    """A broken tracer is logged once for each task name it fails, so a second task's failure is not hidden behind
    the first's; and the log stays bounded when task names keep coming."""
    traced_tasks.configure(tracer_provider=BrokenTracerProvider(), registry=CollectorRegistry())
    names_seen = 150

    async def main() -> None:
        for index in range(names_seen):
            namespace: dict[str, Any] = {}
            exec(f"def task_{index}():\n    pass", namespace)
            for _ in range(2):
                await traced_tasks.BackgroundTask(namespace[f"task_{index}"])()

    with caplog.at_level(logging.ERROR, logger="traced_tasks"):
        asyncio.run(main())
    logged = [record.getMessage() for record in caplog.records if record.name == "traced_tasks"]
    assert "task_0;" in logged[0]
    assert "task_1;" in logged[1]
    assert len(logged) == 101  # MAX_REPORTED, and the one that says nothing more will be logged
    assert "nor are further instrumentation failures" in logged[-1]
    traced_tasks.configure(registry=CollectorRegistry())
