"""Make FastAPI inject traced BackgroundTasks.

FastAPI recognises a parameter annotated with any subclass of Starlette's BackgroundTasks, then injects
an instance of its own class (fastapi/dependencies/utils.py: `BackgroundTasks()`), and it shares that
one instance between the path operation and all its dependencies. So the class FastAPI instantiates is
replaced, once, when traced_tasks is imported: every injected BackgroundTasks is then traced, whichever
of the two classes annotates it.
"""

from __future__ import annotations

from traced_tasks._background import BackgroundTasks


def install() -> None:
    try:
        from fastapi import background as fastapi_background
        from fastapi.dependencies import utils
    except ImportError:
        return
    if issubclass(utils.BackgroundTasks, BackgroundTasks):  # type: ignore[attr-defined]
        return

    # Also a fastapi.BackgroundTasks, so isinstance checks against FastAPI's class keep passing.
    class FastAPIBackgroundTasks(BackgroundTasks, fastapi_background.BackgroundTasks):
        pass

    FastAPIBackgroundTasks.__module__ = __name__
    utils.BackgroundTasks = FastAPIBackgroundTasks  # type: ignore[attr-defined]


def uninstall() -> None:
    """Give FastAPI its own class back (BackgroundTasksInstrumentor.uninstrument)."""
    try:
        from fastapi import background as fastapi_background
        from fastapi.dependencies import utils
    except ImportError:
        return
    utils.BackgroundTasks = fastapi_background.BackgroundTasks  # type: ignore[attr-defined]
