"""Which queues are read for their backlog: those the Celery application names, and one more that a router function
picks at run time."""

from __future__ import annotations

# --8<-- [start:example]
import os

from celery import Celery

import traced_tasks.celery

celery_app = Celery("shop", broker=os.environ.get("REDIS_URL", "redis://localhost:6379/0"))
celery_app.conf.task_routes = {"shop.tasks.build_report": {"queue": "reports"}}  # found: celery, reports

# Found, plus the queue a router function sends invoices to, which no setting names:
traced_tasks.celery.instrument(celery_app, queues=lambda found: found | {"invoices"})
# --8<-- [end:example]
