"""The one configuration entry point, and the configuration in force."""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Sequence

from opentelemetry.trace import TracerProvider
from prometheus_client import REGISTRY, CollectorRegistry

from traced_tasks._metrics import DEFAULT_BUCKETS
from traced_tasks._telemetry import DEFAULT_MAX_TASK_NAMES, Telemetry

_NAMESPACE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

logger = logging.getLogger("traced_tasks")

_lock = threading.Lock()
_current: Telemetry | None = None


def configure(
    *,
    tracer_provider: TracerProvider | None = None,
    registry: CollectorRegistry = REGISTRY,
    namespace: str = "",
    buckets: Sequence[float] = DEFAULT_BUCKETS,
    max_task_names: int = DEFAULT_MAX_TASK_NAMES,
    use_span_links: bool = False,
    isolate_tasks: bool = False,
    route_label: bool = False,
) -> None:
    """Set how tasks scheduled from now on are traced and counted. Call it once, at startup.

    Every option has a default, and calling nothing at all works: spans go to the global tracer
    provider (whenever the application sets it) and metrics to prometheus_client's default registry.

        traced_tasks.configure(namespace="shop", max_task_names=200, isolate_tasks=True)

    Calling it again replaces the previous configuration and unregisters its metrics.
    """
    if namespace and not _NAMESPACE.fullmatch(namespace):
        raise ValueError(
            f"namespace must be a Prometheus metric name prefix like 'shop' (letters, digits, _), got {namespace!r}"
        )
    bounds = [float(bound) for bound in buckets]
    if not bounds or any(not b > 0 or math.isnan(b) for b in bounds) or bounds != sorted(set(bounds)):
        raise ValueError(f"buckets must be positive, strictly increasing upper bounds in seconds, got {buckets!r}")
    if isinstance(max_task_names, bool) or not isinstance(max_task_names, int) or max_task_names < 1:
        raise ValueError(f"max_task_names must be an int of at least 1, got {max_task_names!r}")
    if not isinstance(registry, CollectorRegistry):
        raise TypeError(f"registry must be a prometheus_client CollectorRegistry, got {registry!r}")
    global _current
    with _lock:
        previous = _current
        if previous is not None:
            previous.metrics.unregister()
        try:
            _current = Telemetry(
                tracer_provider=tracer_provider,
                registry=registry,
                namespace=namespace,
                buckets=bounds,
                max_task_names=max_task_names,
                use_span_links=use_span_links,
                isolate_tasks=isolate_tasks,
                route_label=route_label,
            )
        except ValueError as exc:
            if previous is not None:
                previous.metrics.register()
            raise ValueError(
                f"traced_tasks metrics are already registered in this registry by something else ({exc}); "
                "pass another namespace or registry to traced_tasks.configure()"
            ) from exc


def current() -> Telemetry:
    """The configuration in force, made with the defaults on first use."""
    global _current
    telemetry = _current
    if telemetry is None:
        with _lock:
            if _current is None:
                try:
                    _current = Telemetry()
                except ValueError:
                    # Names taken in the default registry: count in a registry of our own, which
                    # metrics_app still serves, rather than fail every add_task.
                    logger.exception(
                        "traced_tasks: cannot register its metrics in prometheus_client's default registry; "
                        "they are served by traced_tasks.metrics_app only. Call traced_tasks.configure() "
                        "with another namespace or registry to choose"
                    )
                    _current = Telemetry(registry=CollectorRegistry())
            telemetry = _current
    return telemetry
