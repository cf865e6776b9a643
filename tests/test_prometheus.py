"""Every dashboard query and rule, run against a real Prometheus scraping a real service that uses traced_tasks."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route

import traced_tasks
from tests.conftest import Telemetry
from tests.dashboards import concrete, queries, rules
from tests.engines import CELERY, Shop
from tests.support import (
    ROOT,
    Collector,
    Prometheus,
    Server,
    clean_environment,
    free_port,
    require_tool,
    wait_for_http,
    wait_until,
)
from traced_tasks import BackgroundTasks
from traced_tasks import _conventions as names

pytestmark = pytest.mark.integration  # real servers and processes: slow

JOB = Prometheus.JOB


class ChargeFailed(Exception):
    pass


def send_receipt(order: int) -> None:
    time.sleep(random.uniform(0.001, 0.02))


async def charge(order: int) -> None:
    await asyncio.sleep(random.uniform(0.001, 0.02))
    if order % 3 == 0:
        raise ChargeFailed()


async def notify_warehouse(order: int) -> None:
    await asyncio.sleep(0.001)


def audit(order: int) -> None:
    pass


def build_report(done: threading.Event) -> None:
    done.wait(300)  # runs for as long as the test does: the longest-running panel has something to show


def shop(done: threading.Event) -> Starlette:
    async def build(request: Request) -> Response:
        return PlainTextResponse("ok", background=traced_tasks.BackgroundTask(build_report, done))

    async def place_order(request: Request) -> Response:
        order = int(request.path_params["order"])
        tasks = BackgroundTasks()
        tasks.add_task(send_receipt, order)
        tasks.add_task(charge, order)  # fails for every third order...
        tasks.add_task(notify_warehouse, order)  # ...which then skips this one
        return PlainTextResponse("ok", background=tasks)

    async def cancel_order(request: Request) -> Response:
        tasks = BackgroundTasks()
        tasks.add_task(audit, int(request.path_params["order"]))
        raise RuntimeError("the endpoint fails after add_task: Starlette drops the task")

    return Starlette(
        routes=[
            Route("/orders/{order:int}", place_order, methods=["POST"]),
            Route("/orders/{order:int}/cancel", cancel_order, methods=["POST"]),
            Route("/reports", build, methods=["POST"]),
            Mount("/metrics", traced_tasks.metrics_app),
        ]
    )


@pytest.fixture
def prometheus_binary() -> str:
    return require_tool("prometheus")


@pytest.mark.parametrize("path", ["prometheus_client", "opentelemetry"])
def test_dashboards_and_rules_against_real_prometheus(
    telemetry: Telemetry, serve: type[Server], prometheus_binary: str, tmp_path: Path, path: str
) -> None:
    """With live traffic (successes, failures, skips, dropped tasks), counted by prometheus_client or through an
    OpenTelemetry MeterProvider read by OpenTelemetry's Prometheus exporter (scope labels and target_info
    included), every dashboard query and rule expression succeeds, every panel query returns data that has moved
    (not only zeros), every recording rule returns data, and every rule evaluates healthily. On the
    prometheus_client path, Prometheus also holds exemplars whose trace IDs are spans the service exported;
    OpenTelemetry's Prometheus exporter writes none (they travel over OTLP)."""
    provider = None
    if path == "opentelemetry":
        registry = CollectorRegistry()
        provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
        traced_tasks.configure(tracer_provider=telemetry.provider, meter_provider=provider, registry=registry)
    stop = threading.Event()
    service = serve(shop(stop))
    target = f"127.0.0.1:{service.port}"
    prometheus = Prometheus(prometheus_binary, tmp_path, target)
    httpx.post(service.url + "/reports")

    def traffic() -> None:
        order = 0
        # Connection: close, since uvicorn drops a kept-alive connection after a task of its request failed.
        with httpx.Client(base_url=service.url, headers={"connection": "close"}) as client:
            while not stop.wait(0.02):
                order += 1
                client.post(f"/orders/{order}")
                if order % 5 == 0:
                    client.post(f"/orders/{order}/cancel")

    driver = threading.Thread(target=traffic, daemon=True)
    driver.start()
    try:
        # Enough scrapes for rates over 5 s windows, and rules evaluated more than once.
        wait_until(lambda: prometheus.query(f'count_over_time(up{{job="{JOB}"}}[1m]) >= 8'), timeout=90)
        check_every_query(prometheus, (target,))
        check_rules(prometheus)
        if provider is None:
            check_exemplars(prometheus, telemetry)
    finally:
        stop.set()
        driver.join(timeout=30)
        prometheus.stop()
        if provider is not None:
            provider.shutdown()


def grafana_regex(values: list[str]) -> str:
    """A multi-value variable as Grafana renders it in a regex matcher."""
    return "(" + "|".join(value.replace(".", "\\\\.") for value in values) + ")"


SAMPLED = tuple(family.name for family in names.SAMPLED_FAMILIES)


def check_every_query(
    prometheus: Prometheus,
    targets: tuple[str, ...],
    jobs: tuple[str, ...] = (JOB,),
    tasks: tuple[str, ...] = ("send_receipt", "charge", "notify_warehouse", "build_report", "audit"),
    module: str = "tests.test_prometheus",
    sampled: bool = False,
    may_be_empty: tuple[str, ...] = (),
) -> None:
    """Every panel query returns data, and data that has moved; with `sampled`, the queue and schedule panels too,
    which a service with no engine has no data for; but for the queries of `may_be_empty`."""
    variables = {
        "job": grafana_regex(list(jobs)),
        "instance": grafana_regex(list(targets)),
        "task": grafana_regex([f"{module}.{name}" for name in tasks]),
        "__rate_interval": "5s",
        "__range": "1m",
        "__interval": "1s",
    }
    problems = []
    checked = 0
    for query in queries():
        if not sampled and any(name in query.expr for name in SAMPLED):
            continue
        result = prometheus.query(concrete(query.expr, variables))
        checked += 1
        values = [float(sample["value"][1]) for sample in result]
        # Running and not-yet-started counts are legitimately 0 between requests, and so are a queue's depth and the
        # overdue flag; everything else has moved.
        may_be_zero = any(
            name in query.expr
            for name in (names.IN_PROGRESS.name, "wait_seconds_count", names.QUEUE_DEPTH.name, "> bool")
        )
        if not values and any(name in query.expr for name in may_be_empty):
            continue
        if not values:
            problems.append(f"no data: {query.dashboard} / {query.panel}: {query.expr}")
        elif not may_be_zero and not any(value > 0 for value in values):
            problems.append(f"only zeros: {query.dashboard} / {query.panel}: {query.expr}")
    assert checked >= 20
    assert problems == []
    # A task that is always dropped: never started, on both paths, though it has no wait series at all.
    (never_started,) = [query for query in queries() if query.panel == "Scheduled, never started"]
    dropped = {
        sample["metric"]["task"]: float(sample["value"][1])
        for sample in prometheus.query(concrete(never_started.expr, variables))
    }
    assert dropped.get(f"{module}.audit", 0) > 0, dropped
    for name, selector in (
        ("job", names.SCHEDULED.total),
        ("instance", f'{names.SCHEDULED.total}{{job=~"{variables["job"]}"}}'),
        ("task", f'{names.SCHEDULED.total}{{job=~"{variables["job"]}", instance=~".*"}}'),
    ):
        values = prometheus.api(f"label/{name}/values", **{"match[]": selector})
        assert values, name
    assert set(prometheus.api("label/job/values", **{"match[]": names.SCHEDULED.total})) >= set(jobs)


def check_rules(
    prometheus: Prometheus,
    skipped: str = "tests.test_prometheus.notify_warehouse",
    sampled: bool = False,
    may_be_empty: tuple[str, ...] = (),
) -> None:
    """Every recording rule returns data (with `sampled`, those of queues and schedules too, but those of
    `may_be_empty`), and every rule evaluates healthily."""
    for rule in rules():
        result = prometheus.query(rule["expr"])
        expected = sampled or not any(name in rule["expr"] for name in SAMPLED)
        if "record" in rule and expected and not any(name in rule["expr"] for name in may_be_empty):
            assert result, rule["record"]

    def all_evaluated() -> bool:
        groups = prometheus.api("rules")["groups"]
        return all(rule.get("lastEvaluation", "").startswith("20") for group in groups for rule in group["rules"])

    wait_until(all_evaluated, timeout=60)
    loaded = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
    assert len(loaded) == len(list(rules()))
    assert [(rule["name"], rule.get("lastError")) for rule in loaded if rule["health"] != "ok"] == []
    # The recorded series exist, under the names the alerts read.
    assert prometheus.query("job_task:background_task_errors:ratio_rate5m")
    assert prometheus.query(f'job_task:background_task_skipped:increase10m{{task="{skipped}"}} > 0')


def check_exemplars(prometheus: Prometheus, telemetry: Telemetry) -> None:
    now = time.time()
    data = prometheus.api("query_exemplars", query=names.DURATION.bucket, start=now - 300, end=now + 60)
    exemplars = [exemplar for series in data for exemplar in series["exemplars"]]
    assert exemplars
    exported = {format(span.context.trace_id, "032x") for span in telemetry.task_spans()}
    trace_ids = {exemplar["labels"]["trace_id"] for exemplar in exemplars}
    assert trace_ids <= exported
    statuses = {series["seriesLabels"]["status"] for series in data}
    assert {"success", "error"} <= statuses


def test_prometheus_fixture_can_fail(prometheus_binary: str, tmp_path: Path) -> None:
    """Control: a query for a metric nothing exposes returns no data, so an empty panel would be caught."""
    prometheus = Prometheus(prometheus_binary, tmp_path, f"127.0.0.1:{free_port()}")
    try:
        assert prometheus.query(names.SCHEDULED.name + "_nonexistent_total") == []
    finally:
        prometheus.stop()


def test_panels_and_alerts_read_no_infinity_from_prometheus_clients_collector(
    prometheus_binary: str, tmp_path: Path
) -> None:
    """Through prometheus_client's own multiprocess collector, which serves +Inf as the oldest start of a task no
    process runs now, the longest-running panels show nothing for it rather than -Inf, and BackgroundTaskHung stays
    quiet."""
    folder = tmp_path / "multiprocess"
    folder.mkdir()
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "tests.apps.standard_multiprocess:app", "--port", str(port)]
    env = clean_environment(PROMETHEUS_MULTIPROC_DIR=str(folder))
    service = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(url + "/metrics/")
        httpx.post(url + "/orders")
        prometheus = Prometheus(prometheus_binary, tmp_path, f"127.0.0.1:{port}")
        try:
            since = f'{names.IN_PROGRESS_SINCE.name}{{task="tests.apps.standard_multiprocess.send_receipt"}}'
            wait_until(lambda: prometheus.query(since), timeout=60)
            assert [sample["value"][1] for sample in prometheus.query(since)] == ["+Inf"]
            variables = {"job": JOB, "instance": ".*", "task": ".*", "__rate_interval": "5s", "__range": "1m"}
            longest = [query for query in queries() if query.panel == "Longest-running run"]
            assert len(longest) == 2  # one on each dashboard
            for query in longest:
                assert prometheus.query(concrete(query.expr, variables)) == [], query.expr
            hung = next(rule for rule in rules() if rule.get("alert") == "BackgroundTaskHung")
            assert prometheus.query(hung["expr"]) == []
        finally:
            prometheus.stop()
    finally:
        service.terminate()
        service.wait(timeout=30)


def test_dashboards_and_rules_across_a_web_and_a_worker_job(
    prometheus_binary: str, tmp_path: Path, broker: str, collector: Collector
) -> None:
    """With tasks handed over to a real Celery worker and sent by a real beat, and Prometheus scraping the web
    process, the worker and beat as three jobs: every dashboard query returns data that has moved, the Waiting and
    Schedules panels included (the web process and the worker read the queues), every recording rule returns data,
    every rule evaluates healthily, and 'Scheduled, never started' subtracts the worker's starts from the web's
    schedules."""
    shop = Shop(CELERY, tmp_path, broker, collector)
    stop = threading.Event()
    try:
        web = shop.start_web(TRACED_TASKS_QUEUE_EVERY="1")
        worker = shop.start_worker(TRACED_TASKS_QUEUE_EVERY="1")
        beat = shop.start_scheduler()
        httpx.post(web + "/reports", params={"seconds": 120})  # the longest-running panel has something to show
        web_target, worker_target = web.removeprefix("http://"), worker.removeprefix("http://")
        jobs = {
            "shop-web": (web_target, "/metrics/"),
            "shop-worker": (worker_target, "/metrics"),
            "shop-beat": (beat.removeprefix("http://"), "/metrics"),
        }
        prometheus = Prometheus(prometheus_binary, tmp_path, jobs=jobs)

        def traffic() -> None:
            order = 0
            with httpx.Client(base_url=web, headers={"connection": "close"}) as client:
                while not stop.wait(0.05):
                    order += 1
                    client.post(f"/orders/{order}")
                    if order % 3 == 0:
                        client.post(f"/charges/{order}")
                    if order % 4 == 0:
                        client.post(f"/backorders/{order}")
                    if order % 5 == 0:
                        client.post(f"/cancellations/{order}")
                    if order % 10 == 0:
                        client.post(f"/invoices/{order}")  # routed to a queue no worker consumes: it waits

        driver = threading.Thread(target=traffic, daemon=True)
        driver.start()
        try:
            wait_until(lambda: prometheus.query('count_over_time(up{job="shop-worker"}[1m]) >= 8'), timeout=90)
            check_every_query(
                prometheus,
                (web_target, worker_target),
                jobs=tuple(jobs),
                tasks=("send_receipt", "charge", "render_report", "audit"),
                module="tests.apps.celery_shop",
                sampled=True,
                may_be_empty=(names.QUEUE_CONSUMERS.name,),  # Redis lists tell no consumers
            )
            check_rules(
                prometheus,
                skipped="tests.apps.celery_shop.send_receipt",
                sampled=True,
                may_be_empty=(names.QUEUE_CONSUMERS.name,),
            )
        finally:
            stop.set()
            driver.join(timeout=30)
            prometheus.stop()
    finally:
        shop.stop()
