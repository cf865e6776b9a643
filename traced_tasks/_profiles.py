"""What every run of one callable from one route shares, found once and kept."""

from __future__ import annotations

import threading
import types
from collections.abc import Callable
from typing import Any

from traced_tasks import _conventions as names
from traced_tasks._backends import Backend, TaskCounts
from traced_tasks._callables import code_of, describe, utf8
from traced_tasks._labels import MAX_ROUTES, Labels


class Profile:
    """The span name and attributes, names and counts of every run of one callable scheduled from one route."""

    __slots__ = ("attributes", "counts", "name", "route", "span_name", "task", "values")

    def __init__(
        self,
        name: str,
        values: tuple[str, ...],
        route: str | None,
        attributes: dict[str, str | int],
        counts: TaskCounts,
    ) -> None:
        self.name = name  # module.qualname
        self.values = values  # the label values: (task,) or (task, route), past the caps the overflow value
        self.task = values[0]
        self.route = route  # the route template, as on the span
        self.span_name = names.SPAN_NAME_PREFIX + name
        self.attributes = attributes
        self.counts = counts


class _Callable:
    """One callable's name, label and attributes, and its Profiles by route."""

    __slots__ = ("attributes", "code", "label", "name", "profiles")

    def __init__(self, name: str, label: str, attributes: dict[str, str | int], code: object) -> None:
        self.name = name
        self.label = label
        self.attributes = attributes
        self.profiles: dict[str | None, Profile] = {}
        self.code = code  # keeps the code object, whose id() is part of the cache key, alive


class Profiles:
    """The Profiles of one configuration, by callable and route."""

    def __init__(self, labels: Labels, backend: Backend, max_task_names: int) -> None:
        self._labels = labels
        self._backend = backend
        self._max_callables = 4 * max_task_names
        self._callables: dict[object, _Callable] = {}
        # One TaskCounts per set of label values, whatever callable or route reaches it: what a backend keeps per
        # set (runs in progress, series made at 0) exists once.
        self._counts: dict[tuple[str, ...], TaskCounts] = {}
        self._lock = threading.Lock()

    def get(self, func: Callable[..., Any], route: str | None) -> Profile:
        if type(func) is types.FunctionType:  # most tasks: _key(), written out
            code: object = func.__code__
            key: object = (id(code), func.__module__, func.__qualname__)
        else:
            key, code = _key(func)
        entry = self._callables.get(key)
        if entry is None:
            entry = self._add(func, key, code)
        profile = entry.profiles.get(route)
        if profile is None:
            profile = self._add_route(entry, route)
        return profile

    def _add_route(self, entry: _Callable, route: str | None) -> Profile:
        with self._lock:
            profile = entry.profiles.get(route)
            if profile is not None:
                return profile
            template = None if route is None else utf8(route)
            values = self._labels.values(entry.label, template)
            counts = self._counts.get(values)
            if counts is None:
                counts = self._counts[values] = self._backend.counts(values)
            attributes = entry.attributes if template is None else {**entry.attributes, names.ATTR_ROUTE: template}
            profile = Profile(entry.name, values, template, attributes, counts)
            if len(entry.profiles) < MAX_ROUTES:  # past that, an application adding routes without end
                entry.profiles[route] = profile
            return profile

    def _add(self, func: Callable[..., Any], key: object, code: object) -> _Callable:
        with self._lock:
            entry = self._callables.get(key)
            if entry is not None:
                return entry
            description = describe(func)
            attributes: dict[str, str | int] = {names.ATTR_FUNCTION: description.name}
            if description.file is not None and description.line is not None:
                attributes[names.ATTR_FILE] = description.file
                attributes[names.ATTR_LINE] = description.line
            entry = _Callable(description.name, self._labels.task(description.name), attributes, code)
            # Only code generated at run time (exec, eval) makes new keys without end; past this, describe each time.
            if len(self._callables) < self._max_callables:
                self._callables[key] = entry
            return entry

    def routes(self, func: Callable[..., Any]) -> list[str | None]:
        """The routes of the Profiles kept for `func`."""
        entry = self._callables.get(_key(func)[0])
        return [] if entry is None else list(entry.profiles)


def _key(func: Callable[..., Any]) -> tuple[object, object]:
    """The cache key of what `func` runs, and the code object the cache entry must keep alive for it."""
    found = code_of(func)
    if found is None:
        return describe(func).name, None
    code, module, qualname = found
    # id(): equal code objects can live in different modules, and the entry keeps the code, so its id stays unique.
    return (id(code), module, qualname), code
