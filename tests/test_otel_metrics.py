"""Counting through OpenTelemetry: the same series, over OTLP or OpenTelemetry's Prometheus exporter."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

import traced_tasks
from tests.conftest import Telemetry
from tests.support import ROOT, Collector, clean_environment, free_port, wait_for_http, wait_until
from traced_tasks import BackgroundTask, BackgroundTasks
from traced_tasks import _conventions as names
from traced_tasks._backends.opentelemetry import attribute_set_limit

NAME = "tests.test_otel_metrics."


class Declined(Exception):
    pass


def send_receipt() -> None:
    pass


async def charge() -> None:
    raise Declined()


def traffic(orders: int = 3) -> None:
    """Orders whose charge fails, so that the receipt after it is skipped, then receipts alone."""

    async def main() -> None:
        for _ in range(orders):
            tasks = BackgroundTasks()
            tasks.add_task(charge)
            tasks.add_task(send_receipt)
            with pytest.raises(Declined):
                await tasks()
            await BackgroundTask(send_receipt)()

    asyncio.run(main())


def prometheus_path(telemetry: Telemetry) -> CollectorRegistry:
    registry = CollectorRegistry()
    traced_tasks.configure(tracer_provider=telemetry.provider, registry=registry)
    return registry


def opentelemetry_path(telemetry: Telemetry, **options: Any) -> tuple[CollectorRegistry, MeterProvider]:
    """A MeterProvider read by OpenTelemetry's Prometheus exporter, without the scope labels and target_info it
    adds by default."""
    registry = CollectorRegistry()
    takes = inspect.signature(PrometheusMetricReader).parameters
    if "registry" not in takes:
        pytest.skip("this opentelemetry-exporter-prometheus registers only in prometheus_client's default registry")
    reader_options: dict[str, Any] = {"disable_target_info": True, "registry": registry}
    if "scope_info_enabled" in takes:
        reader_options["scope_info_enabled"] = False
    reader = PrometheusMetricReader(**reader_options)
    provider = MeterProvider(metric_readers=[reader])
    traced_tasks.configure(tracer_provider=telemetry.provider, meter_provider=provider, **options)
    return registry, provider


def shape(families: Any) -> dict[str, set[tuple[str, ...]]]:
    """Per sample name, the label keys (with `le` values, the bucket bounds) it comes with."""
    found: dict[str, set[tuple[str, ...]]] = {}
    metric: Metric
    for metric in families:
        for sample in metric.samples:
            keys = tuple(sorted(f"le={value}" if key == "le" else key for key, value in sample.labels.items()))
            found.setdefault(sample.name, set()).add(keys)
    return found


def counts(families: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The values that do not depend on the clock: counters, and histogram counts."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for metric in families
        for sample in metric.samples
        if sample.name.endswith(("_total", "_count")) or sample.name == names.IN_PROGRESS.name
    }


def test_the_same_series_as_prometheus_client(telemetry: Telemetry) -> None:
    """The same traffic through prometheus_client and through OpenTelemetry, read by its Prometheus exporter, gives
    the same sample names, label keys, bucket bounds and counts; but for the duration series a task has at 0 before
    its first run of that outcome on the Prometheus path, which an OpenTelemetry histogram cannot have."""
    ours = prometheus_path(telemetry)
    traffic()
    expected = list(ours.collect())
    theirs, provider = opentelemetry_path(telemetry)
    traffic()
    found = list(theirs.collect())
    assert shape(found) == shape(expected)
    only_ours = {key: value for key, value in counts(expected).items() if key not in counts(found)}
    assert only_ours == {
        (names.DURATION.count, (("status", "error"), ("task", NAME + "send_receipt"))): 0,
        (names.DURATION.count, (("status", "success"), ("task", NAME + "charge"))): 0,
    }
    assert counts(found) == {key: value for key, value in counts(expected).items() if key not in only_ours}
    assert counts(found)[(names.SKIPPED.total, (("task", NAME + "send_receipt"),))] == 3
    provider.shutdown()


def test_namespace_route_label_and_caps_apply_unchanged(telemetry: Telemetry) -> None:
    """The namespace prefixes every instrument, the route label comes along, and past max_task_names further names
    count as __overflow__, as on the Prometheus path."""
    registry, provider = opentelemetry_path(telemetry, namespace="shop", route_label=True, max_task_names=1)
    traffic(orders=1)
    assert registry.get_sample_value("shop_" + names.SCHEDULED.total, {"task": NAME + "charge", "route": ""}) == 1
    assert registry.get_sample_value("shop_" + names.SCHEDULED.total, {"task": traced_tasks.OVERFLOW, "route": ""}) == 2
    provider.shutdown()


def test_durations_carry_the_run_spans_exemplar(telemetry: Telemetry) -> None:
    """Each duration is recorded in the run span's context, so the SDK's trace-based filter attaches that span's
    trace and span IDs as the exemplar, where OTLP carries it; waits and counts carry none of the request's."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    traced_tasks.configure(tracer_provider=telemetry.provider, meter_provider=provider)
    traffic(orders=1)
    data = reader.get_metrics_data()
    assert data is not None
    points: dict[str, list[Any]] = {}
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                points[metric.name] = list(metric.data.data_points)
    spans = {span.name.rsplit(".", 1)[1]: span for span in telemetry.task_spans()}
    by_task = {point.attributes["task"]: point for point in points[names.DURATION.instrument]}
    for task in ("charge", "send_receipt"):
        point: HistogramDataPoint = by_task[NAME + task]
        (exemplar,) = point.exemplars
        assert (exemplar.trace_id, exemplar.span_id) == (spans[task].context.trace_id, spans[task].context.span_id)
    assert all(not point.exemplars for point in points[names.WAIT.instrument])
    assert all(not point.exemplars for point in points[names.SCHEDULED.instrument])
    provider.shutdown()


def hang(release: threading.Event) -> None:
    release.wait(30)


def oldest_start_while_hanging(registry: CollectorRegistry) -> float | None:
    """Run `hang` until it counts as in progress, and read the oldest-start gauge then; `hang` ends after."""
    release = threading.Event()
    seen: list[float | None] = []

    async def main() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(BackgroundTask(hang, release))
            with anyio.fail_after(10):
                while registry.get_sample_value(names.IN_PROGRESS.name, {"task": NAME + "hang"}) != 1:
                    await anyio.sleep(0.001)
            seen.append(registry.get_sample_value(names.IN_PROGRESS_SINCE.name, {"task": NAME + "hang"}))
            release.set()

    asyncio.run(main())
    return seen[0]


def test_oldest_running_start_is_observed_and_absent_when_nothing_runs(telemetry: Telemetry) -> None:
    """The in-progress-since gauge is an observable gauge: it reports the oldest run's start while one runs, and no
    series at all once none does; a later configure() stops the old configuration's callback."""
    registry, provider = opentelemetry_path(telemetry)
    assert oldest_start_while_hanging(registry) is not None
    assert registry.get_sample_value(names.IN_PROGRESS_SINCE.name, {"task": NAME + "hang"}) is None
    traced_tasks.configure(registry=CollectorRegistry())
    assert names.IN_PROGRESS_SINCE.name not in {metric.name for metric in registry.collect()}
    provider.shutdown()


@pytest.fixture
def collector() -> Iterator[Collector]:
    with Collector() as receiver:
        yield receiver


def metric_names(collector: Collector) -> set[str]:
    return {
        metric.name
        for request in collector.metrics
        for resource_metrics in request.resource_metrics
        for scope_metrics in resource_metrics.scope_metrics
        for metric in scope_metrics.metrics
    }


@pytest.mark.integration
def test_zero_code_metrics_leave_over_otlp(collector: Collector, tmp_path: Path) -> None:
    """Under the real opentelemetry-instrument command with OTEL_METRICS_EXPORTER=otlp and
    TRACED_TASKS_METRICS=opentelemetry, an unmodified app's task metrics reach an OTLP/HTTP receiver, the run
    time with its span's exemplar."""
    port = free_port()
    env = clean_environment(
        TRACED_TASKS_METRICS="opentelemetry",
        OTEL_METRICS_EXPORTER="otlp",
        OTEL_TRACES_EXPORTER="none",
        OTEL_LOGS_EXPORTER="none",
        OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint,
        OTEL_METRIC_EXPORT_INTERVAL="200",
    )
    instrument = str(Path(sys.executable).parent / "opentelemetry-instrument")
    command = [instrument, sys.executable, "-m", "uvicorn", "tests.apps.plain:app", "--port", str(port)]
    with (tmp_path / "output.txt").open("wb") as output:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=output)
        try:
            wait_for_http(f"http://127.0.0.1:{port}/ping")
            httpx.post(f"http://127.0.0.1:{port}/orders/7")
            wait_until(lambda: names.DURATION.instrument in metric_names(collector), timeout=30)
        finally:
            process.terminate()
            process.wait(timeout=30)
    assert {names.SCHEDULED.instrument, names.WAIT.instrument, names.DURATION.instrument} <= metric_names(collector)
    exemplars = [
        exemplar
        for request in collector.metrics
        for resource_metrics in request.resource_metrics
        for scope_metrics in resource_metrics.scope_metrics
        for metric in scope_metrics.metrics
        if metric.name == names.DURATION.instrument
        for point in metric.histogram.data_points
        for exemplar in point.exemplars
    ]
    assert exemplars, (tmp_path / "output.txt").read_text()[-2000:]
    assert all(len(exemplar.trace_id) == 16 and len(exemplar.span_id) == 8 for exemplar in exemplars)


def test_configuring_again_on_the_same_meter_provider(telemetry: Telemetry) -> None:
    """OpenTelemetry hands back the instruments it made first for a name, so a second configure() on the same
    MeterProvider shares them: the oldest-start gauge observes the new configuration's runs, a last success is not
    set back to 0, and new buckets are refused with a message rather than silently ignored."""
    registry, provider = opentelemetry_path(telemetry)
    traffic(orders=1)
    last = registry.get_sample_value(names.LAST_SUCCESS.name, {"task": NAME + "send_receipt"})
    assert last
    traced_tasks.configure(tracer_provider=telemetry.provider, meter_provider=provider, route_label=False)
    BackgroundTask(send_receipt)  # a first schedule under the new configuration
    assert registry.get_sample_value(names.LAST_SUCCESS.name, {"task": NAME + "send_receipt"}) == last
    assert oldest_start_while_hanging(registry) is not None
    with pytest.raises(ValueError, match="buckets"):
        traced_tasks.configure(meter_provider=provider, buckets=(1, 10))
    provider.shutdown()


def test_a_task_scheduled_from_a_new_route_keeps_its_last_success(telemetry: Telemetry) -> None:
    """Without the route label, the same task scheduled from another route counts in the same series: a failure
    there leaves its last success as it was, instead of a fresh set of counts setting it back to 0."""
    registry, provider = opentelemetry_path(telemetry)

    def deliver(fail: bool) -> None:
        if fail:
            raise Declined()

    async def succeeds(request: Request) -> Response:
        return PlainTextResponse("ok", background=BackgroundTask(deliver, False))

    async def fails(request: Request) -> Response:
        return PlainTextResponse("ok", background=BackgroundTask(deliver, True))

    app = Starlette(routes=[Route("/a", succeeds), Route("/b", fails)])
    app.add_middleware(traced_tasks.TraceContextMiddleware)
    client = TestClient(app, raise_server_exceptions=False)
    task = {"task": NAME + "test_a_task_scheduled_from_a_new_route_keeps_its_last_success.<locals>.deliver"}
    client.get("/a")
    last = registry.get_sample_value(names.LAST_SUCCESS.name, task)
    assert last
    client.get("/b")
    assert registry.get_sample_value(names.LAST_SUCCESS.name, task) == last
    assert registry.get_sample_value(names.DURATION.count, {**task, "status": "error"}) == 1
    provider.shutdown()


def points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    """Per instrument, the data points of the reader's next collection."""
    data = reader.get_metrics_data()
    found: dict[str, list[Any]] = {}
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                found.setdefault(metric.name, []).extend(metric.data.data_points)
    return found


def test_task_names_past_the_sdks_limit_count_as_overflow(
    telemetry: Telemetry, caplog: pytest.LogCaptureFixture
) -> None:
    """With 800 task names, each run once to success, error and cancellation: every instrument stays within the
    SDK's limit of attribute sets (2,000 by default), so no series folds into OpenTelemetry's own overflow series,
    which no rule reads; the names past what fits count as __overflow__, and a warning says once how to raise the
    limit."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    traced_tasks.configure(tracer_provider=telemetry.provider, meter_provider=provider)
    limit = attribute_set_limit(provider, "")

    def task(number: int, outcome: str) -> Callable[[], Any]:
        async def run() -> None:
            if outcome == "error":
                raise Declined()
            if outcome == "cancelled":
                raise asyncio.CancelledError()

        run.__qualname__ = f"task{number}"
        return run

    async def main() -> None:
        for number in range(800):
            for outcome in ("success", "error", "cancelled"):
                with contextlib.suppress(Declined, asyncio.CancelledError):
                    await BackgroundTask(task(number, outcome))()

    with caplog.at_level(logging.WARNING, logger="traced_tasks"):
        asyncio.run(main())
    warned = [
        record.getMessage() for record in caplog.records if "aggregation_cardinality_limit" in record.getMessage()
    ]
    assert len(warned) == (0 if limit is None else 1)
    found = points(reader)
    for instrument, data in found.items():
        assert all("otel.metric.overflow" not in point.attributes for point in data), instrument
        assert limit is None or len(data) <= limit, instrument
    tasks = {point.attributes[names.LABEL_TASK] for point in found[names.DURATION.instrument]}
    if limit is None:  # an SDK before 1.45 keeps every attribute set
        assert len(tasks) == 800
    else:
        assert len(tasks) == limit // 3
        assert names.OVERFLOW in tasks
    runs = sum(point.count for point in found[names.DURATION.instrument])
    assert runs == 2400
    provider.shutdown()


def test_a_view_raises_the_limit_the_caps_fit(telemetry: Telemetry) -> None:
    """A View of our instruments with a larger aggregation_cardinality_limit is read, so that max_task_names applies
    as configured; without one, the SDK's default limit (2,000 from version 1.45) fits the caps."""
    from opentelemetry.sdk.metrics.view import View

    if "aggregation_cardinality_limit" not in inspect.signature(View).parameters:
        pytest.skip("this OpenTelemetry SDK has no limit of attribute sets")
    plain = MeterProvider(metric_readers=[InMemoryMetricReader()])
    raised = MeterProvider(
        metric_readers=[InMemoryMetricReader()],
        views=[View(instrument_name="shop.background_task.*", aggregation_cardinality_limit=10_000)],
    )
    default = attribute_set_limit(plain, "shop")
    assert default in (None, 2000)
    assert attribute_set_limit(raised, "shop") == (None if default is None else 10_000)
    assert attribute_set_limit(raised, "") == default  # the view names other instruments


def test_the_last_success_is_in_every_collection(telemetry: Telemetry) -> None:
    """After a success, the last-success gauge is in every collection, not only the first one after it (a
    synchronous gauge of OpenTelemetry SDKs before 1.45 was), so BackgroundTaskStalled cannot fire for a task that
    succeeded."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    traced_tasks.configure(tracer_provider=telemetry.provider, meter_provider=provider)
    traffic(orders=1)
    for _ in range(5):
        (point,) = [
            point
            for point in points(reader)[names.LAST_SUCCESS.instrument]
            if point.attributes[names.LABEL_TASK] == NAME + "send_receipt"
        ]
        assert point.value > 0
    provider.shutdown()
