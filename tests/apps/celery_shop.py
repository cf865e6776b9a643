"""A Celery application for the Celery tests: its worker runs these tasks, and tests/apps/celery_web.py hands them
over. The broker is CELERY_BROKER; spans go where setup_tracing() sends them (OTEL_EXPORTER_OTLP_ENDPOINT)."""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery
from celery.schedules import crontab

import traced_tasks
import traced_tasks.celery

traced_tasks.setup_tracing("shop")

app = Celery("shop", broker=os.environ.get("CELERY_BROKER", "memory://"))
# Fail at once when the broker is down, rather than after Celery's retries; redeliver the message of a run whose
# worker died as soon as the worker is back.
app.conf.task_publish_retry_policy = {"max_retries": 0}
app.conf.broker_transport_options = {"visibility_timeout": 5, "unacked_restore_interval": 1}
traced_tasks.celery.instrument(app)

SECRET = "card 4111-1111-1111-1111 of jane@example.com"


class Declined(Exception):
    pass


@app.task
def send_receipt(order_id: int) -> None:
    time.sleep(0.01)


@app.task
def audit(order_id: int) -> None:
    pass


@app.task
def charge(order_id: int) -> None:
    raise Declined(f"{SECRET} declined for order {order_id}")


@app.task(name="shop.reports.render")  # a Celery name of its own: the task label stays module.qualname
def render_report(seconds: float) -> None:
    time.sleep(seconds)


@app.task(bind=True, autoretry_for=(ConnectionError,), retry_kwargs={"countdown": 1, "max_retries": 1})
def notify_partner(self: Any, order_id: int) -> None:
    if self.request.retries == 0:
        raise ConnectionError("the partner's endpoint is down")


@app.task(bind=True, acks_late=True, reject_on_worker_lost=True)
def reconcile(self: Any, marker: str) -> None:
    """Runs for a while, and notes each start in the file `marker`, so that a test can kill its worker mid-run."""
    note(marker, self.request.id)
    time.sleep(2)


def note(marker: str, task_id: str | None) -> None:
    """Note a run's start, its process and its task ID, in the file `marker`: a test then ends it its own way."""
    with open(marker, "a") as file:
        file.write(f"{os.getpid()} {task_id}\n")


@app.task(bind=True, time_limit=1)
def overrun(self: Any, marker: str) -> None:
    note(marker, self.request.id)
    time.sleep(30)


@app.task(bind=True)
def revoked(self: Any, marker: str) -> None:
    note(marker, self.request.id)
    time.sleep(60)


@app.task(bind=True)
def terminated(self: Any, marker: str) -> None:
    note(marker, self.request.id)
    time.sleep(60)


@app.task(bind=True)
def killed(self: Any, marker: str) -> None:
    note(marker, self.request.id)
    time.sleep(60)


SCENARIOS = {task.__name__: task for task in (overrun, revoked, terminated, killed, reconcile)}


# A queue of its own, which the test worker does not consume: work routed there waits.
app.conf.task_routes = {"tests.apps.celery_shop.render_invoice": {"queue": "invoices"}}


@app.task
def render_invoice(order_id: int) -> None:
    pass


# What `celery beat` sends: an audit every 2 seconds, and a receipt every day at 03:00 (UTC, Celery's default zone).
app.conf.beat_schedule = {
    "audit": {"task": "tests.apps.celery_shop.audit", "schedule": 2.0, "args": (0,)},
    "nightly receipt": {
        "task": "tests.apps.celery_shop.send_receipt",
        "schedule": crontab(minute="0", hour="3"),
        "args": (0,),
    },
}
