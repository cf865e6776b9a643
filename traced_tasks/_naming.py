"""Turn a task's callable into a stable name, a code location and a cache key."""

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


def cache_key(func: Callable[..., Any]) -> object:
    """The key under which a callable's identity is cached.

    Code objects are shared by every closure made from one `def`, so closures created per request
    do not grow the cache; decorated functions share their wrapper's code, so they are unwrapped first.
    """
    code: object = getattr(func, "__code__", None)
    if code is not None and not hasattr(func, "__wrapped__"):
        return code
    target = _unwrap(func)
    code = getattr(target, "__code__", None)
    if code is not None:
        return code
    if isinstance(target, (type, types.BuiltinFunctionType, types.BuiltinMethodType)):
        # Bound builtins such as `some_list.append` are new objects on every access: key them by name.
        return identify(target).name
    return type(target)


def identify(func: Callable[..., Any]) -> TaskIdentity:
    """The fully qualified name and code location of what `func` runs."""
    target = _unwrap(func)
    owner: Any = target
    if not hasattr(target, "__qualname__"):
        owner = type(target)  # a callable object: name it by its class
        target = owner.__call__
    module = getattr(owner, "__module__", None)
    bound_to = getattr(owner, "__self__", None)
    if module is None and bound_to is not None:
        module = type(bound_to).__module__  # a bound builtin method such as `some_list.append`
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
