"""The engines a task can be handed to, Celery and taskiq: what the batch asks of one, and the ones in use.

traced_tasks never queues work itself: a task of an engine's that reaches add_task is published to the engine's
broker, through the engine's own API, when its batch runs it."""

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

    async def hand_off(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], carried: dict[str, str]
    ) -> None:
        """Publish the task to the engine's broker, with `carried` in its message's own metadata."""


class TaskFailed(Exception):  # the outcome's name, never raised
    """The outcome of a run its engine marked failed without an exception to say why."""


installed: list[Engine] = []


def install(engine: Engine) -> None:
    if engine not in installed:
        installed.append(engine)


def engine_for(func: Callable[..., Any]) -> Engine | None:
    for engine in installed:
        if engine.owns(func):
            return engine
    return None


_handing_off: contextvars.ContextVar[bool] = contextvars.ContextVar("traced_tasks_handing_off", default=False)


@contextlib.contextmanager
def handing_off() -> Iterator[None]:
    """Around a publish traced_tasks makes: its message carries the run's metadata already, and was counted."""
    token = _handing_off.set(True)
    try:
        yield
    finally:
        _handing_off.reset(token)


def is_handing_off() -> bool:
    return _handing_off.get()
