"""The Celery page's shop/tasks.py: the module that makes the Celery app, which the web process and the worker both
import."""

from __future__ import annotations

# --8<-- [start:example]
import os

from celery import Celery

import traced_tasks.celery

celery_app = Celery("shop", broker=os.environ.get("REDIS_URL", "redis://localhost:6379/0"))
traced_tasks.celery.instrument(celery_app)  # the one line


@celery_app.task
def send_receipt(order_id: int) -> None: ...


# --8<-- [end:example]
