"""A small shop whose follow-up work is traced and counted.

    make demo            # or: python examples/demo.py

It serves on http://127.0.0.1:8000, sends itself a little traffic, prints every span to the console
(or sends them over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set) and serves /metrics.
DEMO_SECONDS stops it after that many seconds; by default it runs until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import threading
import time
import urllib.request

import uvicorn
from fastapi import FastAPI

import traced_tasks
from traced_tasks import BackgroundTasks

tracer_provider = traced_tasks.setup_tracing("traced-tasks-demo")

app = FastAPI(title="traced_tasks demo")
app.mount("/metrics", traced_tasks.metrics_app)


class PaymentProviderDown(Exception):
    pass


def send_receipt(order_id: int, email: str) -> None:
    time.sleep(random.uniform(0.005, 0.05))


async def notify_warehouse(order_id: int) -> None:
    await asyncio.sleep(random.uniform(0.01, 0.1))


async def capture_payment(order_id: int) -> None:
    await asyncio.sleep(0.02)
    if order_id % 5 == 0:
        raise PaymentProviderDown("provider timed out")


def refresh_recommendations(user_id: int) -> None:
    time.sleep(0.01)


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


def drive_traffic(base: str, stop: threading.Event) -> None:
    order = 0
    while not stop.wait(0.5):
        order += 1
        for method, path in (("POST", f"/orders/{order}"), ("GET", f"/users/{order % 7}")):
            with contextlib.suppress(OSError):  # the server is starting or stopping
                urllib.request.urlopen(urllib.request.Request(base + path, method=method), timeout=5).read()


def main() -> None:
    host, port = os.environ.get("DEMO_HOST", "127.0.0.1"), int(os.environ.get("DEMO_PORT", "8000"))
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    stop = threading.Event()
    traffic = threading.Thread(target=drive_traffic, args=(f"http://127.0.0.1:{port}", stop), daemon=True)
    seconds = float(os.environ.get("DEMO_SECONDS", "0"))
    if seconds:
        timer = threading.Timer(seconds, lambda: setattr(server, "should_exit", True))
        timer.daemon = True
        timer.start()
    print(f"traced_tasks demo on http://{host}:{port}  (metrics: http://{host}:{port}/metrics/)", flush=True)
    traffic.start()
    try:
        server.run()
    finally:
        stop.set()
        tracer_provider.shutdown()  # export the spans still queued


if __name__ == "__main__":
    main()
