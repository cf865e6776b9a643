"""A small shop whose follow-up work is traced and counted, and that sends itself orders.

    make demo            # or: python examples/demo.py

Open the task console it prints, at http://127.0.0.1:8000/tasks/. Some payments fail, and the tasks after them are
skipped; reports are slow; once, a ledger reconciliation hangs for a few minutes. When redis-server is installed, it
also starts a Celery worker (examples/demo_worker.py), which renders the invoices the shop hands over, with a task
console of its own. Spans go to an OpenTelemetry collector or Jaeger when OTEL_EXPORTER_OTLP_ENDPOINT is set.
DEMO_SECONDS stops it after that many seconds; by default it runs until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# A Celery worker beside the shop, when a broker can be had: redis-server, started by main() on this port.
REDIS = shutil.which("redis-server") if os.environ.get("DEMO_WORKER", "1") != "0" else None
if REDIS is not None:
    os.environ["DEMO_BROKER"] = f"redis://127.0.0.1:{free_port()}/0"
    from demo_worker import render_invoice  # examples/ is on sys.path, as the script's own folder

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


def totals(console: str) -> dict[str, float] | None:
    try:
        with urllib.request.urlopen(console + "/data.json", timeout=5) as response:
            found: dict[str, float] = json.load(response)["totals"]
            return found
    except OSError:
        return None


def report(base: str, worker: str | None, stop: threading.Event, every: float) -> None:
    """One line every few seconds, from the consoles' own data.json."""
    while not stop.wait(every):
        shop = totals(base + "/tasks")
        if shop is None:
            continue
        oldest = shop["oldest_running_seconds"]
        line = (
            f"{time.strftime('%H:%M:%S')}  runs {shop['finished']:.0f}  failed {shop['failed']:.0f}  "
            f"skipped {shop['skipped']:.0f}  running {shop['running']:.0f}"
        )
        if oldest is not None:
            line += f"  oldest running {oldest:.0f} s" + (f"  ({shop['hung']:.0f} hung)" if shop["hung"] else "")
        on_worker = None if worker is None else totals(worker + "/tasks")
        if on_worker is not None:
            line += f"  | worker: runs {on_worker['finished']:.0f}  failed {on_worker['failed']:.0f}"
        print(line, flush=True)


@contextlib.contextmanager
def celery_worker(folder: Path, port: int) -> Iterator[str]:
    """redis-server, and a Celery worker with two processes serving its metrics and console on `port`."""
    assert REDIS is not None
    broker = os.environ["DEMO_BROKER"]
    redis_port = broker.rsplit(":", 1)[1].split("/")[0]
    redis = subprocess.Popen(
        [REDIS, "--port", redis_port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
    )
    metrics = folder / "worker-metrics"
    metrics.mkdir()
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(metrics),
        "TRACED_TASKS_METRICS_PORT": str(port),
        "TRACED_TASKS_HUNG_AFTER": str(HUNG_AFTER),
        "PYTHONPATH": str(Path(__file__).resolve().parent),
    }
    celery = Path(sys.executable).parent / "celery"
    command = [str(celery), "-A", "demo_worker", "worker", "-P", "prefork", "-c", "2", "--loglevel=WARNING"]
    log = (folder / "worker.log").open("wb")
    worker = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        log.close()
        redis.terminate()
        redis.wait(timeout=30)


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
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="traced-tasks-demo-")))
        worker = None
        if REDIS is not None:
            worker = stack.enter_context(celery_worker(folder, int(os.environ.get("DEMO_WORKER_PORT", "9100"))))
        print(
            f"traced_tasks demo: a small shop that sends itself orders\n"
            f"  task console  http://{host}:{port}/tasks/\n"
            f"  metrics       http://{host}:{port}/metrics/\n"
            + (
                f"  Celery worker {worker}/tasks/ and {worker}/metrics, rendering invoices\n"
                f"                (its log: {folder}/worker.log)\n"
                if worker
                else "  Celery worker not started: install redis-server to see tasks run on one\n"
            )
            + f"  spans         {spans}\nCtrl-C stops it.",
            flush=True,
        )
        for target, arguments in (
            (drive_traffic, (base, stop)),
            (report, (base, worker, stop, float(os.environ.get("DEMO_EVERY", "5")))),
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
