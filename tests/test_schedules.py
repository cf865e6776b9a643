"""Schedules: Celery beat and taskiq's scheduler serve each periodic task's period and next due time, and their
heartbeat, read from the schedule the application declared; what they send is counted as scheduled and begins its
trace there; and the alerts built on them fire, and stop firing, against a real Prometheus scraping a real
scheduler and a real worker. The proof: real redis-server, `celery beat`, `taskiq scheduler` and workers."""

from __future__ import annotations

import datetime
import re
import time
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.engines import CELERY, TASKIQ, Shop, value
from tests.support import Collector, Prometheus, require_tool, samples, wait_until
from traced_tasks import _conventions as names

pytestmark = pytest.mark.integration

AUDIT = CELERY.tasks + "audit"  # every 2 seconds
NIGHTLY = CELERY.tasks + "send_receipt"  # every day at 03:00 UTC
REFRESH = TASKIQ.tasks + "refresh_cache"  # taskiq's, every five minutes


def next_at(now: float, hour: int | None, every_minutes: int) -> float:
    """The next time after `now`, UTC, at `hour`:00 every day, or at a multiple of `every_minutes` minutes."""
    when = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).replace(second=0, microsecond=0)
    while True:
        when += datetime.timedelta(minutes=1)
        if (hour is None or (when.hour == hour and when.minute == 0)) and when.minute % every_minutes == 0:
            return when.timestamp()


def test_beat_serves_the_schedule_it_holds(tmp_path: Path, broker: str, collector: Collector) -> None:
    """`celery beat` with the app's beat_schedule, a 2-second interval and a daily crontab: its /metrics serves each
    task's period (2 s, and a day: the gap between the crontab's next two due times) and next due time, a fresh
    heartbeat, and counts what it sends as scheduled; its console lists the schedules."""
    shop = Shop(CELERY, tmp_path, broker, collector)
    try:
        url = shop.start_scheduler()
        wait_until(lambda: (value(samples(url + "/metrics"), names.SCHEDULED.total, task=AUDIT) or 0) >= 2)
        before = time.time()
        found = samples(url + "/metrics")
        now = time.time()  # after the scrape, which may have taken a heartbeat later than a time taken before it
        assert value(found, names.SCHEDULE_PERIOD.name, task=AUDIT) == 2.0
        assert value(found, names.SCHEDULE_PERIOD.name, task=NIGHTLY) == 86400.0
        due = value(found, names.SCHEDULE_NEXT.name, task=AUDIT)
        assert due is not None
        assert now - 1 <= due <= now + 3
        # Due next after the tick that computed it, within the heartbeat's 10 s: before or after 03:00 if it fell there.
        assert value(found, names.SCHEDULE_NEXT.name, task=NIGHTLY) in {next_at(before - 10, 3, 1), next_at(now, 3, 1)}
        heartbeat = value(found, names.SCHEDULER_HEARTBEAT.name, engine="celery")
        assert heartbeat is not None
        assert now - 10 <= heartbeat <= now
        listed = {entry["task"]: entry for entry in httpx.get(url + "/tasks/data.json").json()["schedules"]}
        assert (listed[AUDIT]["period_seconds"], listed[NIGHTLY]["period_seconds"]) == (2.0, 86400.0)
    finally:
        shop.stop()


def test_a_periodic_runs_trace_begins_at_the_scheduler(tmp_path: Path, broker: str, collector: Collector) -> None:
    """A run beat sent is a CONSUMER span on the worker whose parent is beat's PRODUCER span of the send, `publish
    <task>`, the first span of its trace."""
    shop = Shop(CELERY, tmp_path, broker, collector)
    try:
        shop.start_worker()
        shop.start_scheduler()

        def sends() -> list[Span]:
            return [span for span in collector.spans_of("shop-beat") if span.name == names.PUBLISH_SPAN_PREFIX + AUDIT]

        def pairs() -> list[tuple[Span, Span]]:
            # The queue may still hold sends of an earlier beat, whose runs have no parent here: wait for a pair.
            runs = {span.parent_span_id: span for span in shop.task_spans("audit")}
            return [(send, runs[send.span_id]) for send in sends() if send.span_id in runs]

        try:
            wait_until(pairs)
        except AssertionError:
            raise AssertionError(shop.logs()) from None
        send, run = pairs()[0]
        assert send.kind == Span.SPAN_KIND_PRODUCER
        assert send.parent_span_id == b""
        assert run.trace_id == send.trace_id
    finally:
        shop.stop()


def test_taskiqs_scheduler_serves_a_cron_label(tmp_path: Path, broker: str, collector: Collector) -> None:
    """`taskiq scheduler` with LabelScheduleSource and a task labelled `*/5 * * * *`: its /metrics serves the task's
    period (the gap between its next two due times, 5 minutes), its next due time and a fresh heartbeat."""
    shop = Shop(TASKIQ, tmp_path, broker, collector)
    try:
        url = shop.start_scheduler()
        wait_until(lambda: value(samples(url + "/metrics"), names.SCHEDULE_PERIOD.name, task=REFRESH) is not None)
        before = time.time()
        found = samples(url + "/metrics")
        now = time.time()  # after the scrape, which may have taken a heartbeat later than a time taken before it
        assert value(found, names.SCHEDULE_PERIOD.name, task=REFRESH) == 300.0
        # Due next after the tick that computed it, within the heartbeat's 5 s: either side of a 5-minute mark.
        assert value(found, names.SCHEDULE_NEXT.name, task=REFRESH) in {
            next_at(before - 5, None, 5),
            next_at(now, None, 5),
        }
        heartbeat = value(found, names.SCHEDULER_HEARTBEAT.name, engine="taskiq")
        assert heartbeat is not None
        assert now - 5 <= heartbeat <= now
    finally:
        shop.stop()


def test_the_schedule_alerts_against_real_prometheus(tmp_path: Path, broker: str, collector: Collector) -> None:
    """A real Prometheus scraping beat and a worker, with the shipped rules, their grace of 300 s edited down to 3 s
    and their `for` to a second, as the rules say one edits them: with no worker, the 2-second task is overdue (it
    never succeeded since its schedule appeared) and sent but never started, the daily one is neither; once the
    worker runs, neither fires for it; once beat stops, the scheduler is down."""
    binary = require_tool("prometheus")
    shop = Shop(CELERY, tmp_path, broker, collector)
    prometheus = None
    try:
        beat = shop.start_scheduler()
        jobs = {"shop-beat": (beat.removeprefix("http://"), "/metrics")}

        def shortened(rules: str) -> str:
            return re.sub(
                r"for: \d+m", "for: 1s", rules.replace("_period_seconds:max + 300", "_period_seconds:max + 3")
            )

        (tmp_path / "prometheus-1").mkdir()
        prometheus = Prometheus(binary, tmp_path / "prometheus-1", jobs=jobs, edit=shortened)

        def firing(alert: str) -> set[str]:
            found = prometheus.query(f'ALERTS{{alertname="{alert}", alertstate="firing"}}') if prometheus else []
            return {sample["metric"].get("task", sample["metric"].get("job", "")) for sample in found}

        wait_until(lambda: AUDIT in firing("BackgroundTaskScheduleOverdue"), 60)
        wait_until(lambda: AUDIT in firing("BackgroundTaskScheduledNeverStarts"), 60)
        assert NIGHTLY not in firing("BackgroundTaskScheduleOverdue")
        assert firing("BackgroundTaskSchedulerDown") == set()
        prometheus.stop()
        worker = shop.start_worker()
        jobs["shop-worker"] = (worker.removeprefix("http://"), "/metrics")
        (tmp_path / "prometheus-2").mkdir()
        prometheus = Prometheus(binary, tmp_path / "prometheus-2", jobs=jobs, edit=shortened)
        succeeded = f'{names.LAST_SUCCESS.name}{{task="{AUDIT}"}} > 0'
        wait_until(lambda: prometheus is not None and prometheus.query(succeeded), 60)
        time.sleep(8)  # rules evaluated for several seconds with a worker that runs the task every 2 s
        assert AUDIT not in firing("BackgroundTaskScheduleOverdue")
        assert AUDIT not in firing("BackgroundTaskScheduledNeverStarts")
        assert shop.scheduler is not None
        shop.scheduler.stop(grace=10)
        wait_until(lambda: "shop-beat" in firing("BackgroundTaskSchedulerDown"), 60)
    finally:
        if prometheus is not None:
            prometheus.stop()
        shop.stop()
