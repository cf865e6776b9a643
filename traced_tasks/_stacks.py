"""Where a run in progress waits now: code locations only, `file:line in function`, innermost last, never a local, an
argument or a message. An async run's coroutine and what it awaits, down the await chain; a sync run's thread's
frames. Computed when asked, at most MAX_FRAMES frames deep."""

from __future__ import annotations

import asyncio
import os
import sys
from types import CodeType, FrameType
from typing import Any

MAX_FRAMES = 12


def of_thread(ident: int) -> list[str] | None:
    """The innermost frames of the thread `ident`, None when it is gone."""
    frame: FrameType | None = sys._current_frames().get(ident)
    if frame is None:
        return None
    found: list[str] = []
    while frame is not None and len(found) < MAX_FRAMES:
        found.append(_location(frame.f_code, frame.f_lineno))
        frame = frame.f_back
    return found[::-1]


def of_task(task: asyncio.Task[Any]) -> list[str] | None:
    """The await chain of an asyncio task, from its coroutine to the innermost one it waits in; None once it ended."""
    return None if task.done() else of_coroutine(task.get_coro())


def of_coroutine(awaited: Any) -> list[str] | None:
    """The await chain from a coroutine to the innermost one it waits in."""
    found = []
    for _ in range(256):  # a chain that loops on itself, which no coroutine makes, still ends
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is None:
            break
        found.append(_location(frame.f_code, frame.f_lineno))
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    return found[-MAX_FRAMES:]


def _location(code: CodeType, line: int | None) -> str:
    path = code.co_filename
    parent = os.path.basename(os.path.dirname(path))
    where = f"{parent}/{os.path.basename(path)}" if parent else os.path.basename(path)
    name = getattr(code, "co_qualname", code.co_name)  # co_qualname from Python 3.11
    return f"{where}:{line or 0} in {name}"
