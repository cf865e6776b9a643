"""The module that makes the Celery app: the web process and the worker both import it."""

from __future__ import annotations

import os

from celery import Celery

import traced_tasks.celery

celery_app = Celery("shop", broker=os.environ.get("CELERY_BROKER", "redis://localhost:6379/0"))
traced_tasks.celery.instrument(celery_app)  # the one line


@celery_app.task
def send_receipt(order_id: int) -> None: ...
