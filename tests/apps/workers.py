"""A FastAPI service for the multiprocess tests, run by `uvicorn --workers N` in a subprocess."""

from __future__ import annotations

import asyncio
import os

from fastapi import FastAPI

import traced_tasks
from traced_tasks import BackgroundTasks

app = FastAPI()
app.mount("/metrics", traced_tasks.metrics_app)
app.mount("/tasks", traced_tasks.make_console_app(hung_after=1))


def record_order(order_id: int) -> None:
    pass


@app.post("/orders/{order_id}")
def place_order(order_id: int, tasks: BackgroundTasks) -> dict[str, int]:
    tasks.add_task(record_order, order_id)
    return {"pid": os.getpid()}


async def long_job() -> None:
    await asyncio.sleep(3600)


@app.post("/long")
def start_long_job(tasks: BackgroundTasks) -> dict[str, int]:
    tasks.add_task(long_job)
    return {"pid": os.getpid()}


class Declined(Exception):
    pass


def charge(order_id: int) -> None:
    raise Declined()


@app.post("/charges/{order_id}")
def place_charge(order_id: int, tasks: BackgroundTasks) -> dict[str, int]:
    tasks.add_task(charge, order_id)
    return {"pid": os.getpid()}
