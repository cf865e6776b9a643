"""The demo's Celery worker, started by examples/demo.py when redis-server is installed: the shop's invoices are
rendered there, handed over by the web process with the same add_task as its in-process tasks."""

from __future__ import annotations

import os
import random
import time

from celery import Celery

import traced_tasks
import traced_tasks.celery

traced_tasks.setup_tracing("traced-tasks-demo-worker")

celery_app = Celery("demo", broker=os.environ.get("DEMO_BROKER", "memory://"))
traced_tasks.celery.instrument(celery_app)


class PdfRendererDown(Exception):
    pass


@celery_app.task
def render_invoice(order_id: int) -> None:
    time.sleep(random.uniform(0.05, 0.3))
    if order_id % 13 == 0:
        raise PdfRendererDown(f"the PDF renderer timed out for order {order_id}")


@celery_app.task
def restock() -> None:
    """Sent by the demo's Celery beat every ten seconds."""
    time.sleep(0.02)


celery_app.conf.beat_schedule = {"restock": {"task": "demo_worker.restock", "schedule": 10.0}}
