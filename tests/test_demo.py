"""The demo behind `make demo`, as a newcomer first sees it."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
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
        DEMO_PORT=str(port),
        DEMO_WORKER_PORT=str(worker_port),
        DEMO_BEAT_PORT=str(free_port()),
        DEMO_WORKER_DELAY="4",
        DEMO_SECONDS="40",
        DEMO_EVERY="2",
        DEMO_HUNG_AFTER="3",
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
        time.sleep(3)  # one more status line, once the worker answers
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
    assert "ERROR" not in output  # not even uvicorn's word of the hung task it cancels at the stop
    assert lines[-1] == "stopped", output
    data = seen["data"]
    failure = data["failures"][0]
    assert (failure["task"], failure["exception"]) == ("demo_shop.capture_payment", "PaymentProviderDown")
    assert len(failure["traces"][0]["trace_id"]) == 32
    assert [run["task"] for run in data["running"] if run["hung"]] == ["demo_shop.reconcile_ledger"]
    tasks = {task["task"] for task in data["tasks"]}
    assert {"demo_shop.send_receipt", "demo_shop.notify_warehouse", "demo_shop.refresh_recommendations"} <= tasks
    worker = seen["worker"]
    assert {task["task"] for task in worker["tasks"]} == {"demo_worker.render_invoice", "demo_worker.restock"}
    assert [queue["queue"] for queue in data["waiting"]] == ["celery"]  # its invoices' queue, read by the shop
    assert [entry["task"] for entry in worker["schedules"]] == ["demo_worker.restock"]
    assert worker["failures"][0]["exception"] == "PdfRendererDown"
    assert any("| worker: runs" in line for line in status), output
    assert f'{names.EXCEPTIONS.total}{{exception="PaymentProviderDown",task="demo_shop.capture_payment"}}' in metrics


def test_demo_on_a_port_that_is_taken_says_so_first() -> None:
    """With its port taken, the demo says so and how to choose another (DEMO_PORT), and stops: no banner, no URLs
    that would lead nowhere."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "examples/demo.py"],
            cwd=ROOT,
            env=clean_environment(DEMO_PORT=str(port)),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert f"port {port} is taken" in result.stderr
    assert "DEMO_PORT" in result.stderr
    assert "task console" not in result.stdout


def _children(pid: int) -> set[int]:
    """The processes whose parent is `pid`, from /proc."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_demo_stopped_by_sigterm_stops_what_it_started() -> None:
    """A SIGTERM (kill, a supervisor, a script that stops it) ends the demo as Ctrl-C does: it says "stopped", and its
    Redis, Celery worker and beat stop with it, none left running on their ports."""
    port, worker_port = free_port(), free_port()
    env = clean_environment(
        DEMO_PORT=str(port), DEMO_WORKER_PORT=str(worker_port), DEMO_BEAT_PORT=str(free_port()), DEMO_WORKER_DELAY="0"
    )
    process = subprocess.Popen(
        [sys.executable, "examples/demo.py"], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )

    def worker_serves() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{worker_port}/metrics/").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(worker_serves, timeout=60)
        started = _children(process.pid)
        assert len(started) >= 3, started  # redis-server, the worker, beat
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert output.splitlines()[-1] == "stopped", output
    wait_until(lambda: not any(_alive(pid) for pid in started), timeout=30)
