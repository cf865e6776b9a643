"""The request being served: its route, where a middleware or the instrumentor made it known, and FastAPI's
native telemetry of it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from opentelemetry.context import Context
from opentelemetry.trace import Span, TracerProvider
from starlette.types import Scope

# FastAPI 0.165 and later keep their telemetry of the request in the OpenTelemetry context, under this key.
NATIVE_KEY: str = "fastapi.request: no FastAPI with native telemetry here"  # in no context
try:
    from fastapi.telemetry._api import _REQUEST_TELEMETRY_KEY

    NATIVE_KEY = _REQUEST_TELEMETRY_KEY
except ImportError:
    pass

_scope: ContextVar[Scope | None] = ContextVar("traced_tasks_scope", default=None)


@contextmanager
def serving(scope: Scope) -> Iterator[None]:
    token = _scope.set(scope)
    try:
        yield
    finally:
        _scope.reset(token)


# The scope of the request being served, where a middleware or the instrumentor made it known; else None.
serving_scope = _scope.get


def route(scope: Scope) -> str | None:
    """The route template of the request `scope` is for, such as `/orders/{order_id}`, once routing matched it:
    the whole template under FastAPI's include_router(prefix=...), and nothing under a Starlette Mount."""
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


def native_tracing(context: Context) -> tuple[TracerProvider | None, Span, str | None] | None:
    """What FastAPI's native telemetry traces the request in `context` with: the tracer provider the application
    gave it (None: the global one), the request's server span, and the route template that span reports. None
    where it does not trace the request."""
    request: Any = context.get(NATIVE_KEY)
    span = getattr(request, "span", None)
    if not isinstance(span, Span):
        return None
    # FastAPI(telemetry={"tracer_provider": ...}) keeps it on the application.
    app = getattr(getattr(getattr(request, "data", None), "request", None), "app", None)
    settings = getattr(app, "_telemetry", None)
    provider = settings.get("tracer_provider") if isinstance(settings, dict) else None
    route = getattr(request, "route", None)
    return (
        provider if isinstance(provider, TracerProvider) else None,
        span,
        route if isinstance(route, str) else None,
    )
