"""The demo behind `make demo`, as a newcomer first sees it."""

from __future__ import annotations

import signal
import subprocess
import sys
from typing import Any

import httpx
import pytest

from tests.support import ROOT, clean_environment, free_port, wait_until
from traced_tasks import _conventions as names

pytestmark = pytest.mark.integration  # a real server in a process of its own


def test_demo_says_where_to_look_and_prints_a_few_readable_lines() -> None:
    """The demo names its console and /metrics, then prints a short status line every few seconds: no span JSON and
    no traceback for its deliberate failures. Its console shows the shop's tasks live, failures by class with trace
    IDs, skipped tasks and the ledger task that hangs; /metrics serves the same counts. The invoices it hands to its
    Celery worker show on the worker's own console, failures included, and in the status line."""
    port, worker_port = free_port(), free_port()
    env = clean_environment(
        DEMO_PORT=str(port), DEMO_WORKER_PORT=str(worker_port), DEMO_SECONDS="40", DEMO_EVERY="2", DEMO_HUNG_AFTER="3"
    )
    process = subprocess.Popen(
        [sys.executable, "examples/demo.py"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: dict[str, Any] = {}

    def console_shows_everything() -> bool:
        try:
            seen["data"] = data = httpx.get(f"http://127.0.0.1:{port}/tasks/data.json").json()
        except httpx.TransportError:
            return False
        try:
            seen["worker"] = worker = httpx.get(f"http://127.0.0.1:{worker_port}/tasks/data.json").json()
        except httpx.TransportError:
            return False
        return bool(data["failures"] and data["totals"]["skipped"] and data["totals"]["hung"] and worker["failures"])

    try:
        wait_until(console_shows_everything, timeout=40)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics/").text
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C
        output, _ = process.communicate(timeout=30)
    lines = output.splitlines()
    assert lines[1].split() == ["task", "console", f"http://127.0.0.1:{port}/tasks/"]
    assert lines[2].split() == ["metrics", f"http://127.0.0.1:{port}/metrics/"]
    status = [line for line in lines if " runs " in line]
    assert status, output
    assert all(line.split()[1:3] == ["runs", line.split()[2]] and "failed" in line for line in status)
    assert len(lines) < 40, output  # a few lines in the half minute it ran, not thousands
    assert '"name":' not in output
    assert "Traceback" not in output
    data = seen["data"]
    failure = data["failures"][0]
    assert (failure["task"], failure["exception"]) == ("__main__.capture_payment", "PaymentProviderDown")
    assert len(failure["traces"][0]["trace_id"]) == 32
    assert [run["task"] for run in data["running"] if run["hung"]] == ["__main__.reconcile_ledger"]
    tasks = {task["task"] for task in data["tasks"]}
    assert {"__main__.send_receipt", "__main__.notify_warehouse", "__main__.refresh_recommendations"} <= tasks
    worker = seen["worker"]
    assert {task["task"] for task in worker["tasks"]} == {"demo_worker.render_invoice"}
    assert worker["failures"][0]["exception"] == "PdfRendererDown"
    assert any("| worker: runs" in line for line in status), output
    assert f'{names.EXCEPTIONS.total}{{exception="PaymentProviderDown",task="__main__.capture_payment"}}' in metrics
