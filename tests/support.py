"""Helpers the tests share: real uvicorn servers in a thread or in worker processes, Python in a subprocess,
polling, and external tools."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.types import ASGIApp

ROOT = Path(__file__).resolve().parent.parent
OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A real uvicorn server on a loopback port, run in a thread of the test process."""

    def __init__(self, app: ASGIApp, **options: object) -> None:
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", **options)  # type: ignore[arg-type]
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)


def wait_until(condition: Callable[[], object], timeout: float = 30.0) -> None:
    """Poll until `condition()` is true; background tasks finish after the response is sent."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


def require_tool(name: str) -> str:
    """The path of an external tool; a missing tool fails the test in CI and skips it elsewhere."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required in CI (.ci/run installs it)")
        pytest.skip(f"{name} is not installed (apt-get install prometheus)")
    return path


def answers(url: str) -> bool:
    """Whether `url` answers 200 now."""
    try:
        return httpx.get(url).status_code == 200
    except httpx.TransportError:
        return False


def wait_for_http(url: str, timeout: float = 60.0) -> None:
    """Wait until `url` answers 200, as a server that is starting eventually does."""
    wait_until(lambda: answers(url), timeout=timeout)


def clean_environment(**env: str) -> dict[str, str]:
    """This process's environment without the variables that switch modes (multiprocess, OpenTelemetry, tokens),
    plus `env`, with the project importable."""
    switches = ("PROMETHEUS_MULTIPROC_DIR", "OTEL_", "TRACED_TASKS_")
    kept = {key: value for key, value in os.environ.items() if not key.startswith(switches)}
    return {**kept, "PYTHONPATH": str(ROOT), **env}


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a new Python process, as a service's first import would, with a clean environment plus `env`."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=clean_environment(**env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@contextlib.contextmanager
def start_workers(tmp_path: Path, app: str = "tests.apps.workers:app") -> Iterator[str]:
    """`uvicorn --workers 2` serving `app` in multiprocess mode; yields its base URL."""
    port = free_port()
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = clean_environment(PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    command = [sys.executable, "-m", "uvicorn", app, "--workers", "2", "--port", str(port)]
    log = (tmp_path / "uvicorn.log").open("wb")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/metrics/")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
