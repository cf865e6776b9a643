"""What the Celery and taskiq tests share: a shop of a web process and an engine's worker, and reading what they
report."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.support import Collector, Process, free_port, samples, wait_for_http
from traced_tasks import _conventions as names

BIN = Path(sys.executable).parent
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


@dataclass(frozen=True)
class Engine:
    name: str  # as the console marks a task handed to it
    web: str  # the web app, module:attribute
    tasks: str  # the module of its tasks, with a trailing dot: their labels' prefix
    worker: list[str]  # the command that starts the worker
    broker_variable: str  # the environment variable that names the broker to the app modules
    grace: float  # how long its processes get to stop before they are killed
    rejects: str  # the engine's error for arguments it cannot serialize
    main_serves: bool  # whether the worker's main process, which runs no task, serves its port
    scheduler: list[str]  # the command that starts its scheduler, sending the shop's periodic tasks

    def __str__(self) -> str:
        return self.name


CELERY = Engine(
    name="celery",
    web="tests.apps.celery_web:app",
    tasks="tests.apps.celery_shop.",
    worker=[
        *(str(BIN / "celery"), "-A", "tests.apps.celery_shop", "worker", "-P", "prefork", "-c", "2"),
        *("--loglevel=INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"),
    ],
    broker_variable="CELERY_BROKER",
    grace=15,
    rejects="EncodeError",
    main_serves=True,
    scheduler=[str(BIN / "celery"), "-A", "tests.apps.celery_shop", "beat", "--loglevel=INFO"],
)

TASKIQ = Engine(
    name="taskiq",
    web="tests.apps.taskiq_web:app",
    tasks="tests.apps.taskiq_shop.",
    worker=[str(BIN / "taskiq"), "worker", "tests.apps.taskiq_shop:broker", "--workers", "2"],
    broker_variable="TASKIQ_BROKER",
    # taskiq's redis streams worker does not stop on SIGTERM under Python 3.11 while it waits for messages (a
    # CPython bug it meets): the tests kill it, once they have read what they check.
    grace=0.5,
    rejects="SendTaskError",
    main_serves=False,  # the first of its worker processes to bind the port
    scheduler=[str(BIN / "taskiq"), "scheduler", "tests.apps.taskiq_shop:scheduler"],
)


def traceparent(order: int) -> str:
    return f"00-{TRACE_ID[:-4]}{order:04x}-00f067aa0ba902b7-01"


def value(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


class Shop:
    """The web process and, once started, the worker of one engine, around one broker and one OTLP receiver."""

    def __init__(self, engine: Engine, folder: Path, broker: str, collector: Collector) -> None:
        self.engine = engine
        self.folder = folder
        self.broker = broker
        self.collector = collector
        self.processes: list[Process] = []
        self.worker: Process | None = None
        self.worker_url = ""
        self.web = ""  # the web process's URL, once a test keeps one
        self.scheduler: Process | None = None
        self.scheduler_url = ""

    def environment(self, service: str, **env: str) -> dict[str, str]:
        return {
            self.engine.broker_variable: self.broker,
            "OTEL_SERVICE_NAME": service,
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.collector.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            **env,
        }

    def start_web(self, app: str = "", command: tuple[str, ...] = (), **env: str) -> str:
        port = free_port()
        app = app or self.engine.web
        argv = [*command, sys.executable, "-m", "uvicorn", app, "--port", str(port)]
        web = Process(argv, self.folder / f"web-{port}.log", **self.environment("shop-web", **env))
        self.processes.append(web)
        url = f"http://127.0.0.1:{port}"
        wait_for_http(url + "/metrics/")
        return url

    def start_worker(self, *args: str, **extra: str) -> str:
        """Start the engine's worker, with `args` after its command and `extra` in its environment."""
        port = free_port()
        metrics = self.folder / "worker-metrics"
        metrics.mkdir(exist_ok=True)
        env = {
            "PROMETHEUS_MULTIPROC_DIR": str(metrics),
            "TRACED_TASKS_METRICS_PORT": str(port),
            "TRACED_TASKS_HUNG_AFTER": "1",
            **extra,
        }
        log = self.folder / "worker.log"
        self.worker = Process([*self.engine.worker, *args], log, **self.environment("shop-worker", **env))
        self.processes.append(self.worker)
        self.worker_url = f"http://127.0.0.1:{port}"
        wait_for_http(self.worker_url + "/metrics")
        return self.worker_url

    def start_scheduler(self, **extra: str) -> str:
        """Start the engine's scheduler (Celery beat, taskiq's scheduler), serving its metrics on a port of its own;
        its URL."""
        port = free_port()
        arguments = ["-s", str(self.folder / "beat-schedule")] if self.engine.name == "celery" else []
        env = {"TRACED_TASKS_METRICS_PORT": str(port), **extra}
        self.scheduler = Process(
            [*self.engine.scheduler, *arguments], self.folder / "scheduler.log", **self.environment("shop-beat", **env)
        )
        self.processes.append(self.scheduler)
        self.scheduler_url = f"http://127.0.0.1:{port}"
        wait_for_http(self.scheduler_url + "/metrics")
        return self.scheduler_url

    def web_metrics(self, url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return samples(url + "/metrics/")

    def worker_metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return samples(self.worker_url + "/metrics")

    def task_spans(self, task: str) -> list[Span]:
        """The worker's spans of runs of `task`, by its name in the engine's test module."""
        return spans_named(self.collector.spans_of("shop-worker"), self.engine.tasks + task)

    def logs(self) -> str:
        return "\n".join(f"--- {process.log.name}\n{process.output()[-3000:]}" for process in self.processes)

    def stop(self) -> None:
        for process in self.processes:
            process.stop(grace=self.engine.grace)


def spans_named(spans: list[Span], task: str) -> list[Span]:
    """The spans of runs of `task`, by its label."""
    return [span for span in spans if span.name == names.SPAN_NAME_PREFIX + task]


def shape(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], task: str) -> set[tuple[str, tuple[str, ...]]]:
    """traced_tasks' sample names of `task`, with their label keys and bucket bounds."""
    return {
        (name, tuple(sorted(key if key != "le" else f"le={value}" for key, value in labels)))
        for name, labels in found
        if name.startswith(names.PREFIX)
        and not name.endswith("_created")
        and dict(labels).get(names.LABEL_TASK) == task
    }


def row(console: dict[str, Any], task: str) -> dict[str, Any]:
    """The task's row in a console's data.json."""
    found: list[dict[str, Any]] = [entry for entry in console["tasks"] if entry["task"] == task]
    assert len(found) == 1, console["tasks"]
    return found[0]
