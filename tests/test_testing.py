"""traced_tasks.testing.capture_tasks(): what users assert on in their own tests."""

from __future__ import annotations

import asyncio
import contextlib

from prometheus_client import CollectorRegistry

import traced_tasks
from tests.apps.tasks import NAME, fail, ok, ok_async, run
from tests.conftest import Telemetry
from traced_tasks import BackgroundTask
from traced_tasks.testing import TaskRun, capture_tasks


async def cancelled() -> None:
    raise asyncio.CancelledError()


def test_capture_tasks_records_each_run_in_order(telemetry: Telemetry) -> None:
    """Each run that ends inside the block is one TaskRun, in the order they end: the task label, the outcome, the
    exception's class name and never its message, the run time, and the trace ID of its span."""
    with capture_tasks() as runs:
        run((ok, ()), (fail, ()), (ok_async, ()))
    assert [(each.task, each.status, each.exception, each.route) for each in runs] == [
        (NAME + "ok", "success", None, None),
        (NAME + "fail", "error", "KeyError", None),
        (NAME + "ok_async", "skipped", None, None),
    ]
    spans = {span.name.removeprefix("BackgroundTask "): span for span in telemetry.task_spans()}
    assert [each.trace_id for each in runs[:2]] == [
        format(spans[NAME + "ok"].context.trace_id, "032x"),
        format(spans[NAME + "fail"].context.trace_id, "032x"),
    ]
    assert runs[2].trace_id is None  # a skipped task never had a span
    assert all(each.duration >= 0 for each in runs)
    assert runs[2].duration == 0
    assert "secret-customer-id" not in repr(runs)
    assert all(isinstance(each, TaskRun) for each in runs)


def test_capture_tasks_needs_no_sdk_and_stops_at_the_end_of_the_block() -> None:
    """With no SDK and an unconfigured registry, runs are still captured, without a trace ID; runs after the block
    are not, and a cancelled run is its own outcome."""
    traced_tasks.configure(registry=CollectorRegistry())

    async def main() -> None:
        await BackgroundTask(ok)()
        with contextlib.suppress(asyncio.CancelledError):
            await BackgroundTask(cancelled)()

    with capture_tasks() as runs:
        asyncio.run(main())
    asyncio.run(main())
    assert [(each.task, each.status, each.trace_id) for each in runs] == [
        (NAME + "ok", "success", None),
        (__name__ + ".cancelled", "cancelled", None),
    ]


def test_nested_captures_each_see_their_runs() -> None:
    """Two capture_tasks() blocks, one inside the other, each get the runs that ended while they were open."""
    with capture_tasks() as outer:
        run((ok, ()))
        with capture_tasks() as inner:
            run((ok_async, ()))
    assert [each.task for each in outer] == [NAME + "ok", NAME + "ok_async"]
    assert [each.task for each in inner] == [NAME + "ok_async"]
