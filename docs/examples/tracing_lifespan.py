"""A service that sets up OpenTelemetry itself, and exports the spans still queued when it stops."""

from __future__ import annotations

# --8<-- [start:example]
import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

provider = TracerProvider()
provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
trace.set_tracer_provider(provider)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    await asyncio.to_thread(provider.force_flush)  # after the last requests and their tasks


app = FastAPI(lifespan=lifespan)
# --8<-- [end:example]
