"""What travels with a task handed to an engine, in the message's own metadata (Celery's headers, taskiq's labels):
the trace context, through the configured propagator, the time the task was scheduled, and its route. Written by
the process that schedules, and read by the one that runs it, which trusts none of it: a producer without
traced_tasks, or a hostile one, can put anything there.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Protocol

from opentelemetry import propagate
from opentelemetry.context import Context

SCHEDULED_AT = "traced_tasks_scheduled_at"  # Unix time, as text: when scheduled, or the start it was given
ROUTE = "traced_tasks_route"  # the route template of the request that scheduled it

# A time of scheduling is believed from this long before the run's start (a queue with no consumer for weeks is
# still a wait) to this long after it (the two hosts' clocks disagree): a time outside is a producer's mistake (0,
# milliseconds for seconds), and the run's wait is unknown, as for a message that carries none.
MAX_WAIT_SECONDS = 30 * 86_400.0
MAX_SKEW_SECONDS = 300.0
# Longer values are not ours: a W3C traceparent is 55 characters, a tracestate 512, a baggage header 8,192.
_MAX_TEXT = 8192
_MAX_ROUTE = 1024


class Carrier(Protocol):
    """Where a message's metadata is read from: a dict, or an engine's request."""

    def get(self, key: str, /) -> object: ...


@dataclass(frozen=True)
class Carried:
    """What a message carried, as far as it can be believed."""

    context: Context  # the trace context it was scheduled in; empty when it carries none, or none that parses
    scheduled_at: float | None  # Unix time; None when unknown
    route: str | None


def write(context: Context, scheduled_at: float, route: str | None) -> dict[str, str]:
    """The metadata of a message: the trace context (traceparent, tracestate, baggage), the time of scheduling and
    the route, all text."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    carrier[SCHEDULED_AT] = repr(scheduled_at)
    if route is not None:
        carrier[ROUTE] = route
    return carrier


def read(carrier: Carrier, now: float | None = None) -> Carried:
    """What `carrier` says, never raising: a value of the wrong type, too long, or that does not parse is ignored,
    as a missing one is."""
    return Carried(
        _context(carrier), scheduled_at(carrier.get(SCHEDULED_AT), now), _text(carrier.get(ROUTE), _MAX_ROUTE)
    )


def scheduled_at(value: object, now: float | None = None) -> float | None:
    """A carried time of scheduling, as a Unix time no later than `now`; None when it is not one to believe."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    try:
        when = float(value)
    except (ValueError, OverflowError):
        return None
    now = time.time() if now is None else now
    if not math.isfinite(when) or not now - MAX_WAIT_SECONDS <= when <= now + MAX_SKEW_SECONDS:
        return None
    return min(when, now)


def _context(carrier: Carrier) -> Context:
    texts = {
        key: value for key in propagate.get_global_textmap().fields if (value := _text(carrier.get(key))) is not None
    }
    if not texts:
        return Context()
    try:
        return propagate.extract(texts, context=Context())
    except Exception:  # a propagator that cannot read what it was given
        return Context()


def _text(value: object, limit: int = _MAX_TEXT) -> str | None:
    return value if isinstance(value, str) and len(value) <= limit else None
