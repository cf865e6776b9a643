"""/metrics on a port of its own, for applications that do not mount metrics_app."""

from __future__ import annotations

import errno
import logging
import os
from typing import Any

from prometheus_client import start_http_server

from traced_tasks import _config, _multiprocess

PORT_ENV = "TRACED_TASKS_METRICS_PORT"
ADDR_ENV = "TRACED_TASKS_METRICS_ADDR"

logger = logging.getLogger("traced_tasks")


def start_from_environment() -> Any | None:
    """Serve /metrics on TRACED_TASKS_METRICS_PORT (bound to TRACED_TASKS_METRICS_ADDR, default all addresses).

    Returns the server, or None when the variable is unset or, in multiprocess mode, another worker already
    serves the port: any one worker serves the sum of all.
    """
    port = os.environ.get(PORT_ENV)
    if not port:
        return None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{PORT_ENV} must be a TCP port number, got {port!r}")
    address = os.environ.get(ADDR_ENV, "0.0.0.0")
    folder = _multiprocess.directory()
    registry = _multiprocess.registry(folder) if folder is not None else _config.current().registry
    try:
        server, _thread = start_http_server(int(port), address, registry)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE and folder is not None:
            logger.debug("traced_tasks: another worker serves metrics on port %s", port)
            return None
        raise
    return server
