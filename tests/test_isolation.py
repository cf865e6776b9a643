from __future__ import annotations

import asyncio
import logging

import pytest

import traced_tasks
from tests.conftest import Telemetry
from traced_tasks import BackgroundTasks
from traced_tasks import _conventions as names

PREFIX = "tests.test_isolation."


class First(Exception):
    pass


class Second(Exception):
    pass


def first() -> None:
    raise First()


async def second() -> None:
    raise Second()


def fine(ran: list[str]) -> None:
    ran.append("fine")


@pytest.fixture
def isolated(telemetry: Telemetry) -> Telemetry:
    traced_tasks.configure(tracer_provider=telemetry.provider, registry=telemetry.registry, isolate_tasks=True)
    return telemetry


def test_isolated_batch_runs_every_task_and_raises_the_first_failure(
    isolated: Telemetry, caplog: pytest.LogCaptureFixture
) -> None:
    """With isolate_tasks, tasks after a failure still run, every failure is counted, the first exception surfaces
    after the batch (for the server to log), and later failures are logged instead of lost."""
    ran: list[str] = []

    async def main() -> None:
        tasks = BackgroundTasks()
        tasks.add_task(first)
        tasks.add_task(fine, ran)
        tasks.add_task(second)
        tasks.add_task(fine, ran)
        with pytest.raises(First):
            await tasks()

    with caplog.at_level(logging.ERROR, logger="traced_tasks"):
        asyncio.run(main())
    assert ran == ["fine", "fine"]
    assert isolated.value(names.EXCEPTIONS.total, task=PREFIX + "first", exception="First") == 1
    assert isolated.value(names.EXCEPTIONS.total, task=PREFIX + "second", exception="Second") == 1
    assert isolated.value(names.SKIPPED.total, task=PREFIX + "fine") == 0
    (logged,) = [record for record in caplog.records if record.name == "traced_tasks"]
    assert logged.exc_info is not None
    assert logged.exc_info[0] is Second


def test_cancellation_still_stops_an_isolated_batch(isolated: Telemetry) -> None:
    """Isolation never swallows cancellation: a cancelled task stops the batch and the rest count as skipped."""
    ran: list[str] = []

    async def cancelled() -> None:
        raise asyncio.CancelledError()

    async def main() -> None:
        tasks = BackgroundTasks()
        tasks.add_task(cancelled)
        tasks.add_task(fine, ran)
        with pytest.raises(asyncio.CancelledError):
            await tasks()

    asyncio.run(main())
    assert ran == []
    assert isolated.value(names.SKIPPED.total, task=PREFIX + "fine") == 1


def test_cancellation_after_an_isolated_failure_still_reports_it(
    isolated: Telemetry, caplog: pytest.LogCaptureFixture
) -> None:
    """A failure held back for the end of the batch is logged when a later cancellation stops the batch first."""

    async def cancelled() -> None:
        raise asyncio.CancelledError()

    async def main() -> None:
        tasks = BackgroundTasks()
        tasks.add_task(first)
        tasks.add_task(cancelled)
        with pytest.raises(asyncio.CancelledError):
            await tasks()

    with caplog.at_level(logging.ERROR, logger="traced_tasks"):
        asyncio.run(main())
    (logged,) = [record for record in caplog.records if record.name == "traced_tasks"]
    assert logged.exc_info is not None
    assert logged.exc_info[0] is First


def test_default_stays_starlettes(telemetry: Telemetry) -> None:
    """Without the option, the first failure stops the batch, as in Starlette."""
    ran: list[str] = []

    async def main() -> None:
        tasks = BackgroundTasks()
        tasks.add_task(first)
        tasks.add_task(fine, ran)
        with pytest.raises(First):
            await tasks()

    asyncio.run(main())
    assert ran == []


def test_tasks_keep_the_isolation_they_were_scheduled_with(telemetry: Telemetry) -> None:
    """configure() between add_task and the run changes nothing for tasks already scheduled: a batch scheduled with
    isolate_tasks runs on after a failure, and one scheduled without stops, whatever is configured when it runs."""
    ran: list[str] = []

    def batch() -> BackgroundTasks:
        tasks = BackgroundTasks()
        tasks.add_task(first)
        tasks.add_task(fine, ran)
        return tasks

    traced_tasks.configure(tracer_provider=telemetry.provider, registry=telemetry.registry, isolate_tasks=True)
    isolated_batch = batch()
    traced_tasks.configure(tracer_provider=telemetry.provider, registry=telemetry.registry, isolate_tasks=False)
    plain_batch = batch()
    traced_tasks.configure(tracer_provider=telemetry.provider, registry=telemetry.registry, isolate_tasks=True)

    async def main() -> None:
        for tasks in (isolated_batch, plain_batch):
            with pytest.raises(First):
                await tasks()

    asyncio.run(main())
    assert ran == ["fine"]  # the isolated batch's, not the other's
