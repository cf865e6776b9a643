"""The request being served, where a middleware or the instrumentor made it known."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from starlette.types import Scope

_scope: ContextVar[Scope | None] = ContextVar("traced_tasks_scope", default=None)


@contextmanager
def serving(scope: Scope) -> Iterator[None]:
    token = _scope.set(scope)
    try:
        yield
    finally:
        _scope.reset(token)


def route() -> str | None:
    """The route template of the request being served, such as `/orders/{order_id}`, once routing matched it,
    outside Starlette Mounts."""
    scope = _scope.get()
    if scope is None:
        return None
    matched = scope.get("route")
    path = getattr(matched, "path", None)
    if not isinstance(path, str):
        return None
    # Under a Mount the route's path is relative to it, and the scope keeps only the matched prefix, with its
    # values (/tenants/acme), not its template: report nothing rather than a value or half a route.
    if scope.get("root_path", "") != scope.get("app_root_path", scope.get("root_path", "")):
        return None
    return path
