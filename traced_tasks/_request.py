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
    """The route template of the request being served, such as `/orders/{order_id}`, once routing matched it:
    the whole template under FastAPI's include_router(prefix=...), and nothing under a Starlette Mount."""
    scope = _scope.get()
    if scope is None:
        return None
    # Under a Mount the route's path is relative to it, and the scope keeps only the matched prefix, with its
    # values (/tenants/acme), not its template: report nothing rather than a value or half a route.
    if scope.get("root_path", "") != scope.get("app_root_path", scope.get("root_path", "")):
        return None
    matched = scope.get("route")
    # FastAPI 0.137 and later keep an included router's own route in the scope, its path without the prefixes
    # include_router added, and the route as the application serves it beside it.
    fastapi = scope.get("fastapi")
    included = fastapi.get("effective_route_context") if isinstance(fastapi, dict) else None
    if included is not None and getattr(included, "original_route", None) is matched:
        matched = included
    path = getattr(matched, "path", None)
    return path if isinstance(path, str) else None
