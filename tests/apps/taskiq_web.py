"""A FastAPI service that kicks tasks to the taskiq workers of tests/apps/taskiq_shop.py."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

import traced_tasks
from tests.apps.taskiq_shop import SCENARIOS, broker, charge, notify_partner, reconcile, render_report, send_receipt
from traced_tasks import BackgroundTasks


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await broker.startup()
    yield
    await broker.shutdown()


app = FastAPI(lifespan=lifespan)
app.mount("/metrics", traced_tasks.metrics_app)
app.mount("/tasks", traced_tasks.console_app)


class OutOfStock(Exception):
    pass


def reserve_stock(order_id: int) -> None:
    raise OutOfStock()


@app.post("/orders/{order_id}")
def place_order(order_id: int, tasks: BackgroundTasks) -> dict[str, int]:
    tasks.add_task(send_receipt, order_id)
    return {"order_id": order_id}


@app.post("/charges/{order_id}")
def place_charge(order_id: int, tasks: BackgroundTasks) -> dict[str, int]:
    tasks.add_task(charge, order_id)
    return {"order_id": order_id}


@app.post("/backorders/{order_id}")
def place_backorder(order_id: int, tasks: BackgroundTasks) -> dict[str, int]:
    tasks.add_task(reserve_stock, order_id)  # in this process, and it fails...
    tasks.add_task(send_receipt, order_id)  # ...so this one is skipped, and never kicked
    return {"order_id": order_id}


@app.post("/direct/{order_id}")
async def direct(order_id: int) -> dict[str, int]:
    await send_receipt.kiq(order_id)
    return {"order_id": order_id}


@app.post("/partners/{order_id}")
def notify(order_id: int, tasks: BackgroundTasks) -> dict[str, int]:
    tasks.add_task(notify_partner, order_id)
    return {"order_id": order_id}


@app.post("/reports")
def report(seconds: float, tasks: BackgroundTasks) -> dict[str, float]:
    tasks.add_task(render_report, seconds)
    return {"seconds": seconds}


@app.post("/reconcile")
def start_reconcile(marker: str, tasks: BackgroundTasks) -> dict[str, str]:
    tasks.add_task(reconcile, marker)
    return {"marker": marker}


@app.post("/unserializable")
def unserializable(tasks: BackgroundTasks) -> dict[str, str]:
    tasks.add_task(send_receipt, object())  # type: ignore[arg-type]
    return {"scheduled": "no"}


@app.post("/run/{name}")
def run(name: str, marker: str, tasks: BackgroundTasks) -> dict[str, str]:
    """Kick one of the scenario tasks, which notes its start in `marker`."""
    tasks.add_task(SCENARIOS[name], marker)
    return {"task": name}
