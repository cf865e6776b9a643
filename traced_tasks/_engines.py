"""The engines a task can be handed to, Celery and taskiq: what the batch asks of one, the ones in use, and the ticket
of the task the batch is publishing now.

traced_tasks never queues work itself: a task of an engine's that reaches add_task is published to the engine's
broker, through the engine's own API, when its batch runs it. The engine's publish hook then writes what travels
with the message from the ticket the batch scheduled (`publishing()`), as it does for any publish.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any, Protocol


class Engine(Protocol):
    name: str  # as the console shows where a task runs: "celery", "taskiq"

    def owns(self, func: Callable[..., Any]) -> bool:
        """Whether `func` is a task of an application or broker this engine integration instruments."""

    def check(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Raise the engine's own error now, at add_task, when these arguments cannot travel to a worker."""

    async def hand_off(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Publish the task to the engine's broker, with the engine's own API, off the event loop."""


installed: list[Engine] = []


def install(engine: Engine) -> None:
    if engine not in installed:
        installed.append(engine)


def engine_for(func: Callable[..., Any]) -> Engine | None:
    for engine in installed:
        if engine.owns(func):
            return engine
    return None


# The ticket of the task the batch is publishing now, until the engine's publish hook, or a run the engine starts in
# place (Celery's eager mode), takes it: once, so that it never reaches what that run publishes in turn.
_publishing: contextvars.ContextVar[Any] = contextvars.ContextVar("traced_tasks_publishing", default=None)


@contextlib.contextmanager
def publishing(ticket: Any) -> Iterator[None]:
    token = _publishing.set(ticket)
    try:
        yield
    finally:
        _publishing.reset(token)


def take_publishing(accept: Callable[[Any], bool]) -> Any:
    """The ticket of the task being published from a batch now, once, when `accept(ticket)`; else None."""
    ticket = _publishing.get()
    if ticket is None or not accept(ticket):
        return None
    _publishing.set(None)
    return ticket
