from __future__ import annotations

import signal
import subprocess
import sys

import httpx
import pytest

from tests.support import ROOT, clean_environment, free_port, wait_until
from traced_tasks import _conventions as names

pytestmark = pytest.mark.integration  # real servers and processes: slow


def test_demo_serves_traffic_spans_and_metrics() -> None:
    """The demo behind `make demo` drives its own traffic, prints task spans and serves live task metrics."""
    port = free_port()
    env = clean_environment(DEMO_PORT=str(port), DEMO_SECONDS="60")
    process = subprocess.Popen(
        [sys.executable, "examples/demo.py"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: dict[str, str] = {}

    def skipped_after_failure() -> bool:
        try:
            seen["metrics"] = httpx.get(f"http://127.0.0.1:{port}/metrics/").text
        except httpx.TransportError:
            return False
        return f'{names.SKIPPED.total}{{task="__main__.send_receipt"}} 1.0' in seen["metrics"]

    try:
        wait_until(skipped_after_failure, timeout=60)
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C
        output, _ = process.communicate(timeout=30)
    assert (
        f'{names.EXCEPTIONS.total}{{exception="PaymentProviderDown",task="__main__.capture_payment"}}'
        in seen["metrics"]
    )
    assert '"name": "BackgroundTask __main__.notify_warehouse"' in output
    assert '"name": "BackgroundTask __main__.refresh_recommendations"' in output
