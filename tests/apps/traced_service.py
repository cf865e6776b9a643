"""A service that sets up tracing with setup_tracing(), for the shutdown tests: run by uvicorn or gunicorn."""

from __future__ import annotations

import asyncio
import os
import time

from fastapi import FastAPI

import traced_tasks
from traced_tasks import BackgroundTasks

traced_tasks.setup_tracing("shutdown-test")

app = FastAPI()
app.mount("/metrics", traced_tasks.metrics_app)


def send_receipt(order: int) -> None:
    pass


async def build_report(order: int) -> None:
    await asyncio.sleep(1)  # still running when the stop signal arrives: the graceful shutdown waits for it


@app.get("/ping")
async def ping() -> dict[str, int]:
    return {"pid": os.getpid()}


@app.post("/orders/{order}")
async def place_order(order: int, tasks: BackgroundTasks) -> dict[str, int]:
    tasks.add_task(send_receipt, order)
    return {"pid": os.getpid()}


@app.post("/reports/{order}")
async def order_report(order: int, tasks: BackgroundTasks) -> dict[str, int]:
    tasks.add_task(build_report, order)
    return {"pid": os.getpid()}


async def cleans_up() -> None:
    try:
        await asyncio.sleep(3600)
    finally:
        await asyncio.sleep(0.2)  # awaits once cancelled


async def waits() -> None:
    await asyncio.sleep(3600)


def blocks() -> None:
    time.sleep(6)  # in its thread, which a cancellation does not stop


HANGING = {task.__name__: task for task in (cleans_up, waits, blocks)}


@app.post("/hang/{name}")
async def hang(name: str, tasks: BackgroundTasks) -> dict[str, int]:
    tasks.add_task(HANGING[name])
    return {"pid": os.getpid()}
