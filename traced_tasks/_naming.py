"""Turn a task's callable into a stable name and a code location."""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_MAX_UNWRAP = 32


@dataclass(frozen=True)
class TaskIdentity:
    name: str
    file: str | None
    line: int | None


def identify(func: Callable[..., Any]) -> TaskIdentity:
    """The fully qualified name and code location of what `func` runs."""
    target = _unwrap(func)
    owner: Any = target
    if not hasattr(target, "__qualname__"):
        owner = type(target)  # a callable object: name it by its class
        target = owner.__call__
    module = getattr(owner, "__module__", None)
    if module is None and hasattr(owner, "__objclass__"):
        module = owner.__objclass__.__module__  # a method of a builtin type: `str.upper`
    elif module is None and hasattr(owner, "__self__"):
        module = type(owner.__self__).__module__  # a bound one: `some_list.append`
    qualname = owner.__qualname__
    name = f"{module}.{qualname}" if module else qualname
    code = getattr(target, "__code__", None)
    if code is None:
        return TaskIdentity(name, None, None)
    return TaskIdentity(name, code.co_filename, code.co_firstlineno)


def _unwrap(func: Callable[..., Any]) -> Any:
    target: Any = func
    # Bounded, because objects that answer every attribute (mocks, proxies) would unwrap forever.
    for _ in range(_MAX_UNWRAP):
        if isinstance(target, functools.partial):
            target = target.func
        elif isinstance(target, types.MethodType):
            target = target.__func__
        elif hasattr(target, "__wrapped__"):
            target = target.__wrapped__
        else:
            break
    return target
