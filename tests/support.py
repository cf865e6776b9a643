"""Helpers the tests share: a real uvicorn server in a thread, polling, and external tools."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Callable

import pytest
import uvicorn
from starlette.types import ASGIApp


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
