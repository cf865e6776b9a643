"""Helpers for testing code that schedules background tasks.

from traced_tasks.testing import capture_tasks

def test_signup_sends_the_welcome_email(client):
    with capture_tasks() as runs:
        client.post("/signup", json={"email": "new@example.com"})
    assert [(run.task, run.status) for run in runs] == [("shop.emails.send_welcome", "success")]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from traced_tasks import _activity
from traced_tasks._activity import TaskRun

__all__ = ["TaskRun", "capture_tasks"]


@contextlib.contextmanager
def capture_tasks() -> Iterator[list[TaskRun]]:
    """Collect every task run that ends inside the block, in the order they end: each a `TaskRun`, whose `status` is
    `success`, `error`, `cancelled` or `skipped`. No exporter or registry to set up; spans and metrics go on as
    usual.

        with capture_tasks() as runs:
            client.post("/orders/7")
        assert runs[0].status == "error" and runs[0].exception == "PaymentDeclined"
    """
    captured: list[TaskRun] = []
    _activity.captures.append(captured)
    try:
        yield captured
    finally:
        _activity.captures.remove(captured)
