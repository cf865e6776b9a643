"""Counts add up exactly: scheduled = success + error + cancelled + skipped + in progress, for every task."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import traced_tasks
from tests.conftest import Telemetry
from tests.support import Server, wait_until
from traced_tasks import BackgroundTasks
from traced_tasks import _conventions as names

PREFIX = "tests.test_accounting."
REQUESTS = 3000
CONCURRENCY = 50


class Declined(Exception):
    pass


def audit(request_id: int) -> None:
    time.sleep(0.0005)


async def charge(request_id: int) -> None:
    await asyncio.sleep(0.001)
    if request_id % 4 == 0:
        raise Declined()


def send_receipt(request_id: int) -> None:
    if request_id % 10 == 0:
        raise ValueError("mail server said no")


async def notify(request_id: int) -> None:
    await asyncio.sleep(0)


TASKS = [audit, charge, send_receipt, notify]


def ledger(value: Callable[..., float | None], task: str) -> dict[str, float]:
    def sample(name: str, **labels: str) -> float:
        found = value(name, task=task, **labels)
        return 0.0 if found is None else found

    return {
        "scheduled": sample(names.SCHEDULED.total),
        "success": sample(names.DURATION.count, status="success"),
        "error": sample(names.DURATION.count, status="error"),
        "cancelled": sample(names.DURATION.count, status="cancelled"),
        "skipped": sample(names.SKIPPED.total),
        "in_progress": sample(names.IN_PROGRESS.name),
    }


def balanced(entry: dict[str, float]) -> bool:
    return entry["scheduled"] == sum(entry[key] for key in ("success", "error", "cancelled", "skipped", "in_progress"))


def ended(entry: dict[str, float]) -> bool:
    """Every scheduled run has its outcome and none is in progress.

    Each sample is read from its own collection, so a ledger read while runs move on can be torn; a check for
    `balanced` may then pass while runs are still in flight. Outcomes only grow, and they are read before
    `in_progress`: once they account for all `REQUESTS`, nothing starts again and the ledger no longer moves.
    """
    outcomes = sum(entry[key] for key in ("success", "error", "cancelled", "skipped"))
    return outcomes == REQUESTS and entry["in_progress"] == 0


@pytest.mark.integration
def test_counts_add_up_under_load(telemetry: Telemetry, serve: type[Server]) -> None:
    """3,000 requests at 50 concurrent connections through real uvicorn, each scheduling 4 sync and async tasks, some
    failing and some skipped: for every task the counts add up exactly, match what really ran, and in_progress ends
    at 0."""

    async def endpoint(request: Request) -> Response:
        request_id = int(request.query_params["id"])
        tasks = BackgroundTasks()
        for func in TASKS:
            tasks.add_task(func, request_id)
        return PlainTextResponse("ok", background=tasks)

    server = serve(Starlette(routes=[Route("/", endpoint)]), limit_concurrency=1000)

    async def send_all() -> None:
        limits = httpx.Limits(max_connections=CONCURRENCY)
        # Connection: close, since uvicorn drops a kept-alive connection after a task of its request failed.
        headers = {"connection": "close"}
        async with httpx.AsyncClient(base_url=server.url, limits=limits, headers=headers, timeout=120) as client:
            semaphore = asyncio.Semaphore(CONCURRENCY)

            async def one(request_id: int) -> int:
                async with semaphore:
                    return (await client.get("/", params={"id": request_id})).status_code

            statuses = await asyncio.gather(*(one(request_id) for request_id in range(REQUESTS)))
        assert set(statuses) == {200}

    asyncio.run(send_all())
    names = [PREFIX + func.__name__ for func in TASKS]
    wait_until(lambda: all(ended(ledger(telemetry.value, name)) for name in names))

    failures = {request_id for request_id in range(REQUESTS) if request_id % 4 == 0}
    receipts_failed = {request_id for request_id in range(REQUESTS) if request_id % 10 == 0} - failures
    assert ledger(telemetry.value, PREFIX + "audit") == {
        "scheduled": REQUESTS, "success": REQUESTS, "error": 0, "cancelled": 0, "skipped": 0, "in_progress": 0,
    }  # fmt: skip
    assert ledger(telemetry.value, PREFIX + "charge") == {
        "scheduled": REQUESTS, "success": REQUESTS - len(failures), "error": len(failures), "cancelled": 0,
        "skipped": 0, "in_progress": 0,
    }  # fmt: skip
    assert ledger(telemetry.value, PREFIX + "send_receipt") == {
        "scheduled": REQUESTS, "success": REQUESTS - len(failures) - len(receipts_failed),
        "error": len(receipts_failed), "cancelled": 0, "skipped": len(failures), "in_progress": 0,
    }  # fmt: skip
    assert ledger(telemetry.value, PREFIX + "notify") == {
        "scheduled": REQUESTS, "success": REQUESTS - len(failures) - len(receipts_failed), "error": 0,
        "cancelled": 0, "skipped": len(failures) + len(receipts_failed), "in_progress": 0,
    }  # fmt: skip
    assert len(telemetry.task_spans()) == sum(
        ledger(telemetry.value, name)[key] for name in names for key in ("success", "error", "cancelled")
    )


OUTCOMES = st.sampled_from(["success", "error", "cancelled"])


def make_task(index: int, outcome: str) -> Callable[[], Any]:
    async def task() -> None:
        if outcome == "error":
            raise RuntimeError()
        if outcome == "cancelled":
            raise asyncio.CancelledError()

    task.__qualname__ = f"step{index}"  # a name per position, shared across batches
    return task


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(OUTCOMES, min_size=1, max_size=6), min_size=1, max_size=8))
def test_counts_add_up_for_any_batches(batches: list[list[str]]) -> None:
    """For random batches of succeeding, failing and cancelled tasks, each task's counts add up exactly, and the
    number of runs and skips per task equals what Starlette's stop-at-first-failure rule predicts."""
    registry = CollectorRegistry()
    traced_tasks.configure(registry=registry)
    expected: Counter[tuple[str, str]] = Counter()

    async def main() -> None:
        for batch in batches:
            tasks = BackgroundTasks()
            for index, outcome in enumerate(batch):
                tasks.add_task(make_task(index, outcome))
            with contextlib.suppress(RuntimeError, asyncio.CancelledError):
                await tasks()
            stopped = False
            for index, outcome in enumerate(batch):
                expected[f"{PREFIX}step{index}", "skipped" if stopped else outcome] += 1
                stopped = stopped or outcome != "success"

    try:
        asyncio.run(main())
        names = {name for name, _ in expected}
        for name in names:
            entry = ledger(lambda metric, **labels: registry.get_sample_value(metric, labels), name)
            assert balanced(entry), (name, entry)
            assert entry["in_progress"] == 0
            for key in ("success", "error", "cancelled", "skipped"):
                assert entry[key] == expected[name, key], (name, key, entry)
    finally:
        traced_tasks.configure(registry=CollectorRegistry())
