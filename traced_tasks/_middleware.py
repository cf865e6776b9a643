"""Join the caller's trace without a server span: W3C traceparent and baggage, extracted per request."""

from __future__ import annotations

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from starlette.types import ASGIApp, Receive, Scope, Send

from traced_tasks import _request


class _HeaderGetter(Getter[Scope]):
    def get(self, carrier: Scope, key: str) -> list[str] | None:
        name = key.lower().encode("latin-1")
        values = [value.decode("latin-1") for header, value in carrier.get("headers") or [] if header.lower() == name]
        return values or None

    def keys(self, carrier: Scope) -> list[str]:
        return [header.decode("latin-1") for header, _ in carrier.get("headers") or []]


_getter = _HeaderGetter()

# Set, in the context each request is handled in, to that request's scope.
_REQUEST = otel_context.create_key("traced_tasks.request")


class TraceContextMiddleware:
    """Make the caller's trace context and baggage current for each request, so background tasks join the
    caller's trace, and make the route known for `http.route` on task spans.

    It opens no server span: use it in services with no request instrumentation. Where OpenTelemetry's
    ASGI or FastAPI instrumentation runs, it already does the extraction; add this only for the route.

        app.add_middleware(traced_tasks.TraceContextMiddleware)
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        current = otel_context.get_current()
        handled = current.get(_REQUEST)
        if handled is scope:  # a middleware of an enclosing app made this request's context already
            context = current
        elif handled is None and trace.get_current_span(current).get_span_context().is_valid:
            # A server span that instrumentation outside this middleware made for this request: the tasks belong
            # under it. Only make the route known.
            context = otel_context.set_value(_REQUEST, scope, current)
        else:
            # This request's own headers decide, from nothing. What is current may be another request's: uvicorn
            # starts a pipelined request in the context of the one before it, which this middleware marked.
            extracted = propagate.extract(scope, context=Context(), getter=_getter)
            context = otel_context.set_value(_REQUEST, scope, extracted)
        token = otel_context.attach(context)
        try:
            with _request.serving(scope):
                await self.app(scope, receive, send)
        finally:
            otel_context.detach(token)
