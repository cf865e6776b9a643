"""What a task's callable is called, and where its code lives."""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_MAX_UNWRAP = 32


@dataclass(frozen=True)
class Description:
    """A callable's name and code location, each valid UTF-8."""

    name: str  # module.qualname
    file: str | None
    line: int | None


def describe(func: Callable[..., Any]) -> Description:
    """The fully qualified name and code location of what `func` runs. Any callable gets a name: objects that
    answer every attribute (mocks, proxies) and builtins included."""
    target = _unwrap(func)
    owner: Any = target
    qualname = _text(target, "__qualname__")
    if qualname is None:
        owner = type(target)  # a callable object: name it by its class
        qualname = owner.__qualname__
        target = owner.__call__
    module = _text(owner, "__module__")
    if module is None and hasattr(owner, "__objclass__"):
        module = _text(owner.__objclass__, "__module__")  # a method of a builtin type: `str.upper`
    elif module is None and hasattr(owner, "__self__"):
        module = type(owner.__self__).__module__  # a bound one: `some_list.append`
    qualname = _written(qualname)
    name = utf8(f"{module}.{qualname}" if module else qualname)
    code = getattr(target, "__code__", None)
    file = getattr(code, "co_filename", None)
    line = getattr(code, "co_firstlineno", None)
    if isinstance(file, str) and type(line) is int:
        return Description(name, utf8(file), line)
    return Description(name, None, None)


def utf8(text: str) -> str:
    """`text`, with what UTF-8 cannot hold written as escapes: a lone surrogate, as os.fsdecode makes from a file name
    that is not UTF-8, would fail every exposition and span export it reaches."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def code_of(func: Callable[..., Any]) -> tuple[types.CodeType, str, str] | None:
    """What every call of `func` runs, for plain functions and their bound methods and partials, and for the task
    objects of Celery and taskiq, which wrap a function (`__wrapped__`): the code object, the module and the
    qualified name. None for other callables."""
    target: Any = func
    while type(target) is functools.partial:
        target = target.func
    if type(target) is not types.FunctionType and type(target) is not types.MethodType:
        wrapped = getattr(target, "__wrapped__", None)
        if type(wrapped) is types.FunctionType or type(wrapped) is types.MethodType:
            target = wrapped
    if type(target) is types.MethodType:
        target = target.__func__
    if type(target) is not types.FunctionType:
        return None
    return target.__code__, target.__module__, _written(target.__qualname__)


# taskiq's @broker.task renames the function it wraps `<name>__taskiq_original`; the task keeps the name it was
# written with, as in process, so that its series go on unchanged when it moves to a taskiq worker.
_RENAMED = "__taskiq_original"


def _written(qualname: str) -> str:
    return qualname.removesuffix(_RENAMED)


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


def _text(value: object, attribute: str) -> str | None:
    found = getattr(value, attribute, None)
    return found if isinstance(found, str) else None
