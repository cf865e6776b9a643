"""A small shop whose follow-up work is traced and counted, and that sends itself orders.

    make demo            # or: python examples/demo.py

Open the task console it prints, at http://127.0.0.1:8000/tasks/. Some payments fail, and the tasks after them are
skipped; reports are slow; once, a ledger reconciliation hangs for a few minutes. Spans go to an OpenTelemetry
collector or Jaeger when OTEL_EXPORTER_OTLP_ENDPOINT is set. DEMO_SECONDS stops it after that many seconds; by
default it runs until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import threading
import time
import urllib.request

import uvicorn
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

app = FastAPI(title="traced_tasks demo")
app.add_middleware(traced_tasks.TraceContextMiddleware)  # each task's route, and the caller's trace when it sends one
app.mount("/metrics", traced_tasks.metrics_app)
app.mount("/tasks", traced_tasks.make_console_app(trace_url=TRACE_URL, hung_after=HUNG_AFTER))


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


class DeliberateFailures(logging.Filter):
    """The demo's own failures, and the tasks cancelled when it stops, are on the console page: keep their
    tracebacks out of the terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], (PaymentProviderDown, asyncio.CancelledError)))


def send(base: str, method: str, path: str) -> bool:
    try:
        urllib.request.urlopen(urllib.request.Request(base + path, method=method), timeout=5).read()
    except OSError:  # the server is starting or stopping
        return False
    return True


def drive_traffic(base: str, stop: threading.Event) -> None:
    while not send(base, "POST", "/ledger") and not stop.wait(0.1):
        pass
    order = 0
    while not stop.wait(0.5):
        order += 1
        send(base, "POST", f"/orders/{order}")
        send(base, "GET", f"/users/{order % 7}")
        if order % 10 == 0:
            send(base, "POST", f"/reports/{order // 10}")


def report(base: str, stop: threading.Event, every: float) -> None:
    """One line every few seconds, from the console's own data.json."""
    while not stop.wait(every):
        try:
            with urllib.request.urlopen(base + "/tasks/data.json", timeout=5) as response:
                totals = json.load(response)["totals"]
        except OSError:
            continue
        oldest = totals["oldest_running_seconds"]
        line = (
            f"{time.strftime('%H:%M:%S')}  runs {totals['finished']:.0f}  failed {totals['failed']:.0f}  "
            f"skipped {totals['skipped']:.0f}  running {totals['running']:.0f}"
        )
        if oldest is not None:
            line += f"  oldest running {oldest:.0f} s" + (f"  ({totals['hung']} hung)" if totals["hung"] else "")
        print(line, flush=True)


def main() -> None:
    host, port = os.environ.get("DEMO_HOST", "127.0.0.1"), int(os.environ.get("DEMO_PORT", "8000"))
    base = f"http://127.0.0.1:{port}"
    logging.getLogger("uvicorn.error").addFilter(DeliberateFailures())
    # At the stop, tasks still running (the ledger) are cancelled after 3 s rather than waited for.
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    stop = threading.Event()
    seconds = float(os.environ.get("DEMO_SECONDS", "0"))
    if seconds:
        timer = threading.Timer(seconds, lambda: setattr(server, "should_exit", True))
        timer.daemon = True
        timer.start()
    spans = f"sent to {ENDPOINT} over OTLP" if ENDPOINT else "recorded, not exported (set OTEL_EXPORTER_OTLP_ENDPOINT)"
    print(
        f"traced_tasks demo: a small shop that sends itself orders\n"
        f"  task console  http://{host}:{port}/tasks/\n"
        f"  metrics       http://{host}:{port}/metrics/\n"
        f"  spans         {spans}\n"
        f"Ctrl-C stops it.",
        flush=True,
    )
    for target, arguments in (
        (drive_traffic, (base, stop)),
        (report, (base, stop, float(os.environ.get("DEMO_EVERY", "5")))),
    ):
        threading.Thread(target=target, args=arguments, daemon=True).start()
    try:
        server.run()
    except KeyboardInterrupt:  # Ctrl-C: uvicorn stopped gracefully, then raised it again
        print("stopped", flush=True)
    finally:
        stop.set()


if __name__ == "__main__":
    main()
