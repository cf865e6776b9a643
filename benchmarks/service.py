"""The service the end-to-end benchmark loads: one background task per request.

BENCH_VARIANT=starlette uses Starlette's BackgroundTasks; `traced` uses traced_tasks', and `span-only` the
span-only wrapper, both with an SDK tracer provider whose batch processor exports to nowhere; `traced-no-sdk`
uses traced_tasks' with no SDK installed (the API's no-op tracer). `asgi-otel` and `asgi-otel-traced` are a
service traced as one with an SDK is: OpenTelemetry's ASGI middleware makes the request spans, and the tasks
are Starlette's or traced_tasks'.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from starlette import background
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import traced_tasks
from benchmarks.variants import span_only


class NullExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


async def record_view(page: int) -> None:
    pass


variant = os.environ.get("BENCH_VARIANT", "starlette")
tasks_class: type[background.BackgroundTasks] = background.BackgroundTasks
provider: TracerProvider | None = None
if variant == "traced-no-sdk":
    tasks_class = traced_tasks.BackgroundTasks
elif variant != "starlette":
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(NullExporter()))
    if variant in ("traced", "asgi-otel-traced"):
        traced_tasks.configure(tracer_provider=provider)
        tasks_class = traced_tasks.BackgroundTasks
    elif variant == "span-only":
        tasks_class = span_only(provider.get_tracer("benchmarks"))


async def page(request: Request) -> Response:
    tasks = tasks_class()
    tasks.add_task(record_view, 1)
    return PlainTextResponse("ok", background=tasks)


app = Starlette(routes=[Route("/", page)])
if variant.startswith("asgi-otel"):
    app.add_middleware(OpenTelemetryMiddleware, tracer_provider=provider)
