"""The demo's shop: a FastAPI service whose follow-up work is traced and counted, run by examples/demo.py. Its
invoices are rendered by a Celery worker (examples/demo_worker.py) when the demo could start one."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import time

from fastapi import FastAPI

import traced_tasks
from traced_tasks import BackgroundTasks

ENDPOINT = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
# Spans are recorded either way, so failures have trace IDs; they leave the process only with an endpoint.
os.environ.setdefault("OTEL_TRACES_EXPORTER", "otlp" if ENDPOINT else "none")
traced_tasks.setup_tracing("traced-tasks-demo")
# Failures link to their traces in Jaeger when spans are sent, or wherever DEMO_TRACE_URL says.
TRACE_URL = os.environ.get("DEMO_TRACE_URL") or ("http://localhost:16686/trace/{trace_id}" if ENDPOINT else None)
HUNG_AFTER = float(os.environ.get("DEMO_HUNG_AFTER", "30"))  # the console marks hung runs; the alert waits 15 m


# A Celery worker beside the shop, when a broker can be had: the redis-server demo.py starts, at DEMO_BROKER.
REDIS = shutil.which("redis-server") if os.environ.get("DEMO_BROKER") else None
if REDIS is not None:
    from demo_worker import render_invoice  # examples/ is on sys.path, as the script's own folder

app = FastAPI(title="traced_tasks demo")
app.add_middleware(traced_tasks.TraceContextMiddleware)  # each task's route, and the caller's trace when it sends one
app.mount("/metrics", traced_tasks.metrics_app)
# The Celery worker's own console, which the tasks handed over to it link to.
WORKER_CONSOLE = os.environ.get("DEMO_WORKER_CONSOLE")
app.mount(
    "/tasks",
    traced_tasks.make_console_app(
        trace_url=TRACE_URL,
        hung_after=HUNG_AFTER,
        engine_consoles={"celery": WORKER_CONSOLE} if WORKER_CONSOLE else None,
    ),
)


class PaymentProviderDown(Exception):
    pass


def send_receipt(order_id: int, email: str) -> None:
    time.sleep(random.uniform(0.005, 0.05))


async def notify_warehouse(order_id: int) -> None:
    await asyncio.sleep(random.uniform(0.01, 0.1))


async def capture_payment(order_id: int) -> None:
    await asyncio.sleep(0.02)
    if order_id % 5 == 0:
        raise PaymentProviderDown(f"provider timed out for order {order_id}")


def refresh_recommendations(user_id: int) -> None:
    time.sleep(0.01)


async def build_report(report_id: int) -> None:
    await asyncio.sleep(random.uniform(2, 8))


async def reconcile_ledger() -> None:
    await asyncio.sleep(240)  # a socket with no timeout, say


@app.post("/orders/{order_id}")
async def place_order(order_id: int, tasks: BackgroundTasks) -> dict[str, int]:
    tasks.add_task(capture_payment, order_id)  # fails for every fifth order...
    tasks.add_task(send_receipt, order_id, email="customer@example.com")  # ...and then these are skipped
    tasks.add_task(notify_warehouse, order_id)
    if REDIS is not None:
        tasks.add_task(render_invoice, order_id)  # handed over to the Celery worker
    return {"order_id": order_id}


@app.get("/users/{user_id}")
def profile(user_id: int, tasks: BackgroundTasks) -> dict[str, int]:
    tasks.add_task(refresh_recommendations, user_id)
    return {"user_id": user_id}


@app.post("/reports/{report_id}")
async def order_report(report_id: int, tasks: BackgroundTasks) -> dict[str, int]:
    tasks.add_task(build_report, report_id)
    return {"report_id": report_id}


@app.post("/ledger")
async def reconcile(tasks: BackgroundTasks) -> dict[str, str]:
    tasks.add_task(reconcile_ledger)
    return {"status": "reconciling"}


# The shop's own failures, which the demo keeps out of the terminal: they are on the console.
DELIBERATE = (PaymentProviderDown, asyncio.CancelledError)
