"""A FastAPI service that hands tasks over to the Celery worker of tests/apps/celery_shop.py."""

from __future__ import annotations

from fastapi import FastAPI

import traced_tasks
from tests.apps.celery_shop import (
    SCENARIOS,
    audit,
    charge,
    notify_partner,
    reconcile,
    render_invoice,
    render_report,
    send_receipt,
)
from traced_tasks import BackgroundTasks

app = FastAPI()
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
    tasks.add_task(send_receipt, order_id)  # ...so this one is skipped, and never published
    return {"order_id": order_id}


@app.post("/cancellations/{order_id}")
def cancel(order_id: int, tasks: BackgroundTasks) -> dict[str, int]:
    tasks.add_task(audit, order_id)
    raise RuntimeError("the endpoint fails after add_task: Starlette drops the task, which is never published")


@app.post("/direct/{order_id}")
def direct(order_id: int) -> dict[str, int]:
    send_receipt.delay(order_id)
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
    tasks.add_task(send_receipt, object())
    return {"scheduled": "no"}


@app.post("/run/{name}")
def run(name: str, marker: str, tasks: BackgroundTasks) -> dict[str, str]:
    """Hand over one of the scenario tasks, which notes its start in `marker`."""
    tasks.add_task(SCENARIOS[name], marker)
    return {"task": name}


@app.post("/urgent/{order_id}")
def urgent(order_id: int) -> dict[str, int]:
    """A direct publish at the highest priority: on Redis, to the queue's list of priority 9."""
    send_receipt.apply_async((order_id,), priority=9)
    return {"order_id": order_id}


@app.post("/invoices/{order_id}")
def invoice(order_id: int, tasks: BackgroundTasks) -> dict[str, int]:
    tasks.add_task(render_invoice, order_id)  # routed to the invoices queue
    return {"order_id": order_id}
