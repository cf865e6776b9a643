"""A small shop whose follow-up work is traced and counted, and that sends itself orders.

    make demo            # or: python examples/demo.py; DEMO_PORT=8001 make demo when port 8000 is taken

Open the task console it prints, at http://127.0.0.1:8000/tasks/. Some payments fail, and the tasks after them are
skipped; reports are slow; once, a ledger reconciliation hangs for a few minutes. When redis-server is installed, it
also starts a Celery worker (examples/demo_worker.py), which renders the invoices the shop hands over, with a task
console of its own: it starts a little late, so that the invoices first wait in their queue. And a Celery beat,
which sends a restock every ten seconds. Spans go to an OpenTelemetry collector or Jaeger when
OTEL_EXPORTER_OTLP_ENDPOINT is set. DEMO_SECONDS stops it after that many seconds; by default it runs until Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def taken(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


class DeliberateFailures(logging.Filter):
    """The demo's own failures, the tasks cancelled when it stops, and uvicorn's word of that cancellation, are on
    the console page: keep their tracebacks out of the terminal."""

    def __init__(self, deliberate: tuple[type[BaseException], ...]) -> None:
        super().__init__()
        self._deliberate = deliberate

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Cancel ") and "running task" in record.getMessage():
            return False
        return not (record.exc_info and isinstance(record.exc_info[1], self._deliberate))


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


def totals(console: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(console + "/data.json", timeout=5) as response:
            found: dict[str, Any] = json.load(response)["totals"]
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
        if shop.get("waiting"):
            line += f"  waiting {shop['waiting']:.0f}"
        on_worker = None if worker is None else totals(worker + "/tasks")
        if on_worker is not None:
            line += f"  | worker: runs {on_worker['finished']:.0f}  failed {on_worker['failed']:.0f}"
        print(line, flush=True)


@contextlib.contextmanager
def celery(
    redis_server: str, folder: Path, broker: str, worker_port: int, beat_port: int, delay: float, hung_after: float
) -> Iterator[str]:
    """`redis_server`; a Celery worker with two processes, started `delay` seconds later, serving its metrics and
    console on `worker_port`; and a Celery beat, on `beat_port`."""
    redis_port = broker.rsplit(":", 1)[1].split("/")[0]
    redis = [redis_server, "--port", redis_port, "--bind", "127.0.0.1", "--save", ""]

    def spawn(command: list[str], output: Any, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        # In a session of its own, out of reach of the terminal's Ctrl-C: the demo stops it itself, once the shop has
        # stopped handing invoices over.
        return subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)

    started = [spawn([*redis, "--appendonly", "no", "--dir", str(folder)], subprocess.DEVNULL)]
    metrics = folder / "worker-metrics"
    metrics.mkdir()
    env = {
        **os.environ,
        "TRACED_TASKS_HUNG_AFTER": str(hung_after),
        "TRACED_TASKS_QUEUE_EVERY": "2",
        "PYTHONPATH": str(Path(__file__).resolve().parent),
    }
    bin_folder = Path(sys.executable).parent
    log = (folder / "celery.log").open("wb")
    beat = [str(bin_folder / "celery"), "-A", "demo_worker", "beat", "-s", str(folder / "beat"), "--loglevel=WARNING"]
    beat_env = {**env, "TRACED_TASKS_METRICS_PORT": str(beat_port)}
    started.append(spawn(beat, log, beat_env))
    worker = [str(bin_folder / "celery"), "-A", "demo_worker", "worker", "-P", "prefork", "-c", "2"]
    worker_env = {**env, "PROMETHEUS_MULTIPROC_DIR": str(metrics), "TRACED_TASKS_METRICS_PORT": str(worker_port)}

    def start_worker() -> None:
        started.append(spawn([*worker, "--loglevel=WARNING"], log, worker_env))

    timer = threading.Timer(delay, start_worker)
    timer.start()
    try:
        yield f"http://127.0.0.1:{worker_port}"
    finally:
        timer.cancel()
        for process in reversed(started):
            process.terminate()
            process.wait(timeout=30)
        log.close()


def main() -> None:
    host, port = os.environ.get("DEMO_HOST", "127.0.0.1"), int(os.environ.get("DEMO_PORT", "8000"))
    if taken(host, port):
        print(f"port {port} is taken: run the demo on another one, with DEMO_PORT=8001 make demo", file=sys.stderr)
        raise SystemExit(1)
    worker_port = int(os.environ.get("DEMO_WORKER_PORT", "9100"))
    beat_port = int(os.environ.get("DEMO_BEAT_PORT", "9101"))
    delay = float(os.environ.get("DEMO_WORKER_DELAY", "20"))
    wanted = os.environ.get("DEMO_WORKER", "1") != "0"
    redis = shutil.which("redis-server") if wanted else None
    no_worker = "install redis-server to see tasks run on one" if redis is None else ""
    if not wanted:
        no_worker = "DEMO_WORKER=0"
    elif redis is not None and (taken("127.0.0.1", worker_port) or taken("127.0.0.1", beat_port)):
        no_worker = f"port {worker_port} or {beat_port} is taken (set DEMO_WORKER_PORT, DEMO_BEAT_PORT)"
        redis = None
    if redis is not None:  # before the shop is imported: it hands its invoices over to this broker
        os.environ["DEMO_BROKER"] = f"redis://127.0.0.1:{free_port()}/0"
        os.environ["DEMO_WORKER_CONSOLE"] = f"http://{host}:{worker_port}/tasks/"
    import demo_shop  # examples/ is on sys.path, as the script's own folder

    base = f"http://127.0.0.1:{port}"
    logging.getLogger("uvicorn.error").addFilter(DeliberateFailures(demo_shop.DELIBERATE))
    # At the stop, tasks still running (the ledger) are cancelled after 3 s rather than waited for.
    config = uvicorn.Config(demo_shop.app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    stop = threading.Event()
    seconds = float(os.environ.get("DEMO_SECONDS", "0"))
    if seconds:
        timer = threading.Timer(seconds, lambda: setattr(server, "should_exit", True))
        timer.daemon = True
        timer.start()
    endpoint = demo_shop.ENDPOINT
    spans = f"sent to {endpoint} over OTLP" if endpoint else "recorded, not exported (set OTEL_EXPORTER_OTLP_ENDPOINT)"
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="traced-tasks-demo-")))
        worker = None
        if redis is not None:
            broker = os.environ["DEMO_BROKER"]
            worker = stack.enter_context(
                celery(redis, folder, broker, worker_port, beat_port, delay, demo_shop.HUNG_AFTER)
            )
        print(
            f"traced_tasks demo: a small shop that sends itself orders\n"
            f"  task console  http://{host}:{port}/tasks/\n"
            f"  metrics       http://{host}:{port}/metrics/\n"
            + (
                f"  Celery worker {worker}/tasks/ and {worker}/metrics, rendering invoices, from {delay:.0f} s on:\n"
                f"                until then they wait in their queue (the console's Waiting line)\n"
                f"  Celery beat   http://127.0.0.1:{beat_port}/tasks/, sending a restock every 10 s\n"
                f"                (their log: {folder}/celery.log)\n"
                if worker
                else f"  Celery worker not started: {no_worker}\n"
            )
            + f"  spans         {spans}\nCtrl-C stops it.",
            flush=True,
        )
        for target, arguments in (
            (drive_traffic, (base, stop)),
            (report, (base, worker, stop, float(os.environ.get("DEMO_EVERY", "5")))),
        ):
            threading.Thread(target=target, args=arguments, daemon=True).start()
        # A SIGTERM (kill, a supervisor) or a SIGHUP (a closed terminal) stops it as Ctrl-C does, so that the worker,
        # beat and Redis it started stop with it. uvicorn raises the signal again once it has stopped: this handler.
        for stopping in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(stopping, _interrupt)
        try:
            server.run()
        except KeyboardInterrupt:  # Ctrl-C: uvicorn stopped gracefully, then raised it again
            pass
        finally:
            stop.set()
    print("stopped", flush=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
