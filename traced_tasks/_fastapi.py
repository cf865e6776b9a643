"""Make FastAPI inject traced BackgroundTasks.

FastAPI recognises a parameter annotated with any subclass of Starlette's BackgroundTasks, then injects
an instance of its own class (fastapi/dependencies/utils.py: `BackgroundTasks()`), and it shares that
one instance between the path operation and all its dependencies. So the class FastAPI instantiates is
replaced, once, when traced_tasks is imported: every injected BackgroundTasks is then traced, whichever
of the two classes annotates it.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from traced_tasks._tasks import BackgroundTasks

_traced: dict[type[Any], type[BackgroundTasks]] = {}


def install() -> None:
    found = _fastapi()
    if found is not None:
        utils, fastapi_class = found
        utils.BackgroundTasks = _traced.get(fastapi_class) or _traced_class(fastapi_class)  # type: ignore[attr-defined]


def _fastapi() -> tuple[ModuleType, type[Any]] | None:
    try:
        from fastapi import background
        from fastapi.dependencies import utils
    except ImportError:
        return None
    return utils, background.BackgroundTasks


def _traced_class(fastapi_class: type[Any]) -> type[BackgroundTasks]:
    # Also a fastapi.BackgroundTasks, so isinstance checks against FastAPI's class keep passing.
    class FastAPIBackgroundTasks(BackgroundTasks, fastapi_class):  # type: ignore[misc]
        pass

    FastAPIBackgroundTasks.__module__ = __name__
    _traced[fastapi_class] = FastAPIBackgroundTasks
    return FastAPIBackgroundTasks
