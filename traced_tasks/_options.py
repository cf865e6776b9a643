"""Every option of traced_tasks, with its default, validated once: the keywords of `configure()`, and the
environment variables, each read through `Switch.read()`."""

from __future__ import annotations

import logging
import math
import numbers
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, Generic, TypeVar

from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider
from prometheus_client import REGISTRY, CollectorRegistry

from traced_tasks import _conventions as names

# Background work runs from milliseconds (a cache write) to many minutes (a report): the client's
# default buckets stop at 10 s.
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
)  # fmt: skip

DEFAULT_MAX_TASK_NAMES = 1000

# A letter first: OpenTelemetry's instrument names must start with one.
_NAMESPACE = re.compile(r"[a-zA-Z][a-zA-Z0-9_]*")


@dataclass(frozen=True, kw_only=True)
class Options:
    """What `traced_tasks.configure()` takes; its docstring says what each option does."""

    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None
    registry: CollectorRegistry = REGISTRY
    namespace: str = ""
    buckets: Sequence[float] = DEFAULT_BUCKETS
    max_task_names: int = DEFAULT_MAX_TASK_NAMES
    use_span_links: bool = False
    isolate_tasks: bool = False
    route_label: bool = False
    queue_every: float | None = None

    @property
    def prefix(self) -> str:
        """What every metric name starts with before `background_task_`: `shop_` for the namespace `shop`."""
        return f"{self.namespace}_" if self.namespace else ""

    @property
    def label_names(self) -> tuple[str, ...]:
        """The labels of every family, before a family's own (`status`, `exception`)."""
        return (names.LABEL_TASK, names.LABEL_ROUTE) if self.route_label else (names.LABEL_TASK,)

    def __post_init__(self) -> None:
        _provider("tracer_provider", self.tracer_provider, "get_tracer", "an OpenTelemetry TracerProvider")
        _provider("meter_provider", self.meter_provider, "get_meter", "an OpenTelemetry MeterProvider")
        if not isinstance(self.registry, CollectorRegistry):
            raise TypeError(f"registry must be a prometheus_client CollectorRegistry, got {self.registry!r}")
        if not isinstance(self.namespace, str) or (self.namespace and not _NAMESPACE.fullmatch(self.namespace)):
            raise ValueError(
                "namespace must be a Prometheus metric name prefix like 'shop' (letters, digits, _), "
                f"got {self.namespace!r}"
            )
        object.__setattr__(self, "buckets", _buckets(self.buckets))
        if type(self.max_task_names) is not int or self.max_task_names < 1:
            raise ValueError(f"max_task_names must be an int of at least 1, got {self.max_task_names!r}")
        every = self.queue_every
        if every is not None and (
            isinstance(every, bool) or not isinstance(every, numbers.Real) or not 0 < every < math.inf
        ):
            raise ValueError(f"queue_every must be a positive, finite number of seconds (or None), got {every!r}")
        for name in ("use_span_links", "isolate_tasks", "route_label"):
            value = getattr(self, name)
            if type(value) is not bool:
                raise TypeError(f"{name} must be True or False, got {value!r}")


def option_names() -> list[str]:
    return [field.name for field in fields(Options)]


def _provider(name: str, value: object, method: str, what: str) -> None:
    if value is None:
        return
    if isinstance(value, type) or not callable(getattr(value, method, None)):
        raise TypeError(f"{name} must be {what} instance (or None for the global one), got {value!r}")


def _buckets(value: Any) -> tuple[float, ...]:
    """The bounds as floats, without the +Inf bucket every histogram has anyway."""
    problem = "buckets must be a sequence of positive, strictly increasing upper bounds in seconds"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{problem}, such as (0.1, 1, 10), got {value!r}")
    if not all(isinstance(bound, numbers.Real) and not isinstance(bound, bool) for bound in value):
        raise TypeError(f"{problem}, got {value!r}")
    bounds = [float(bound) for bound in value]
    if bounds and bounds[-1] == math.inf:
        bounds.pop()
    if not bounds or any(not 0 < bound < math.inf for bound in bounds) or bounds != sorted(set(bounds)):
        raise ValueError(f"{problem}, got {value!r}")
    return tuple(bounds)


# The thresholds the console flags at, as the alerts of dashboards/rules.yml fire at (a test ties each to its rule):
# a run in progress for longer than this is hung (BackgroundTaskHung);
HUNG_AFTER_SECONDS = 900.0
# a queue whose oldest message waits longer than this is behind (BackgroundTaskBacklogOld);
BACKLOG_AGE_SECONDS = 300.0
# a queue not read for longer than this cannot be read (BackgroundTaskQueueUnread);
QUEUE_STALE_SECONDS = 120.0
# a periodic task with no success within its period and this much more is overdue (BackgroundTaskScheduleOverdue).
SCHEDULE_GRACE_SECONDS = 300.0
# How often a process reads the queues it watches, at most.
QUEUE_EVERY_SECONDS = 15.0

logger = logging.getLogger("traced_tasks")
T = TypeVar("T")


@dataclass(frozen=True)
class Switch(Generic[T]):
    """An environment variable traced_tasks reads, with what it does and what it takes. Read when needed, never
    cached, so a value set after the imports (load_dotenv()) applies. A value that does not parse is logged once,
    naming the variable and what it takes, and the default applies."""

    name: str
    meaning: str
    parse: Callable[[str], T]  # raises ValueError saying what it takes
    default: str | None = None

    def read(self) -> str | None:
        """The value as set, None when unset."""
        return os.environ.get(self.name)

    def value(self) -> T | None:
        """The parsed value, or the default's when the variable is unset, blank or does not parse; None when there
        is no default."""
        raw = (self.read() or "").strip()
        if raw:
            try:
                return self.parse(raw)
            except ValueError as exc:
                if (self.name, raw) not in _refused:
                    _refused.add((self.name, raw))
                    default = "unset" if self.default is None else self.default
                    logger.error("traced_tasks: %s=%r: %s; it is taken as %s", self.name, raw, exc, default)
        return None if self.default is None else self.parse(self.default)


_refused: set[tuple[str, str]] = set()


def _port(value: str) -> int:
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise ValueError("it takes a TCP port number, 1 to 65535")
    return int(value)


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise ValueError("it takes a positive, finite number of seconds")
    return seconds


def _metrics(value: str) -> str:
    if value.lower() not in ("prometheus", "opentelemetry"):
        raise ValueError("it takes prometheus or opentelemetry")
    return value.lower()


def _urls(value: str) -> dict[str, str]:
    found = {}
    for item in value.split(","):
        engine, equals, url = item.strip().partition("=")
        if not equals or not engine.strip() or not url.strip().startswith(("http://", "https://", "/")):
            raise ValueError("it takes engine=URL pairs separated by commas, such as celery=http://worker:9100/tasks/")
        found[engine.strip()] = url.strip()
    return found


METRICS = Switch(
    "TRACED_TASKS_METRICS",
    "`opentelemetry` counts through the global MeterProvider instead of prometheus_client, unless configure() "
    "names a registry or a meter provider.",
    _metrics,
    "prometheus",
)
TOKEN = Switch(
    "TRACED_TASKS_METRICS_TOKEN",
    "The bearer token `/metrics` and the task console require, read at each request. Unset: no token.",
    str,
)
PORT = Switch(
    "TRACED_TASKS_METRICS_PORT",
    "Serve `/metrics` and the task console (`/tasks/`) on this port, from the first request or lifespan of the "
    "instrumented app, or from the start of a Celery or taskiq worker or scheduler.",
    _port,
)
ADDR = Switch(
    "TRACED_TASKS_METRICS_ADDR",
    "The address the metrics port listens on: `0.0.0.0` (or `::`) in a container that Prometheus scrapes from outside.",
    str,
    "127.0.0.1",
)
HUNG_AFTER = Switch(
    "TRACED_TASKS_HUNG_AFTER",
    "Seconds after which the task console marks a run in progress hung, where make_console_app() is not given "
    "hung_after: the console on the metrics port, for one. Read at each request. Unset: 900, as the "
    "BackgroundTaskHung alert.",
    _seconds,
    repr(HUNG_AFTER_SECONDS),
)
QUEUE_EVERY = Switch(
    "TRACED_TASKS_QUEUE_EVERY",
    "Seconds between two reads of the queues a process watches, at most, where configure() is not given queue_every.",
    _seconds,
    repr(QUEUE_EVERY_SECONDS),
)
CONSOLE_URLS = Switch(
    "TRACED_TASKS_CONSOLE_URLS",
    "Where the consoles of the engines' workers are, as `celery=http://worker:9100/tasks/,taskiq=...`: a web "
    "process's console links the tasks it hands over to them, where make_console_app() is not given engine_consoles.",
    _urls,
)
MULTIPROCESS_DIR = Switch(
    "PROMETHEUS_MULTIPROC_DIR",
    "prometheus_client's multiprocess mode: every process counts in files in this folder, and `/metrics` sums them. "
    "Set it, to an empty folder, before the server or worker starts.",
    str,
)

SWITCHES: tuple[Switch[Any], ...] = (
    METRICS,
    TOKEN,
    PORT,
    ADDR,
    HUNG_AFTER,
    QUEUE_EVERY,
    CONSOLE_URLS,
    MULTIPROCESS_DIR,
)


def counts_through_opentelemetry() -> bool:
    """TRACED_TASKS_METRICS=opentelemetry: count through the global MeterProvider, as opentelemetry-instrument sets
    it up from OTEL_METRICS_EXPORTER; prometheus (the default) keeps prometheus_client."""
    return METRICS.value() == "opentelemetry"
