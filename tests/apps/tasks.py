"""Tasks, and ways to run them as a request would, that several test modules share."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from traced_tasks import BackgroundTasks

NAME = "tests.apps.tasks."  # the task label of a function below is NAME + its name


def ok() -> None:
    pass


async def ok_async() -> None:
    pass


def fail() -> None:
    raise KeyError("secret-customer-id")


def record(calls: list[str]) -> None:
    calls.append("ok")


async def fail_after(calls: list[str]) -> None:
    calls.append("fail")
    raise LookupError("task bug")


def run(*tasks: tuple[Callable[..., Any], tuple[Any, ...]]) -> None:
    """Run one batch after a real Starlette response, the way a request does."""

    async def endpoint(request: Request) -> Response:
        batch = BackgroundTasks()
        for func, args in tasks:
            batch.add_task(func, *args)
        return PlainTextResponse("ok", background=batch)

    TestClient(Starlette(routes=[Route("/", endpoint)]), raise_server_exceptions=False).get("/")


def run_batches(batches: int, calls: list[str]) -> list[BaseException | None]:
    """Run `batches` batches of [record, fail_after, record]; returns what each batch raised."""

    async def main() -> list[BaseException | None]:
        outcomes: list[BaseException | None] = []
        for _ in range(batches):
            tasks = BackgroundTasks()
            tasks.add_task(record, calls)
            tasks.add_task(fail_after, calls)
            tasks.add_task(record, calls)
            try:
                await tasks()
            except LookupError as exc:
                outcomes.append(exc)
            else:
                outcomes.append(None)
        return outcomes

    return asyncio.run(main())
