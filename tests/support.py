"""Helpers the tests share: real uvicorn servers in a thread or in worker processes, Python in a subprocess,
polling, and external tools."""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import fastapi
import httpx
import pytest
import starlette
import uvicorn
import yaml
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from starlette.types import ASGIApp

ROOT = Path(__file__).resolve().parent.parent

# Starlette records the route a request matched in its scope from 1.7 on; FastAPI always did.
STARLETTE_RECORDS_ROUTES = tuple(int(part) for part in starlette.__version__.split(".")[:2]) >= (1, 7)
# FastAPI's own telemetry, FastAPI(telemetry=...), is there from 0.165 on.
FASTAPI_NATIVE_TELEMETRY = "telemetry" in inspect.signature(fastapi.FastAPI).parameters
needs_starlette_routes = pytest.mark.skipif(
    not STARLETTE_RECORDS_ROUTES, reason="plain Starlette routes have an http.route from Starlette 1.7 on"
)
OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A real uvicorn server on a loopback port, run in a thread of the test process."""

    def __init__(self, app: ASGIApp, **options: object) -> None:
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", **options)  # type: ignore[arg-type]
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)


def wait_until(condition: Callable[[], object], timeout: float = 30.0) -> None:
    """Poll until `condition()` is true; background tasks finish after the response is sent."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


def require_tool(name: str) -> str:
    """The path of an external tool; a missing tool fails the test in CI and skips it elsewhere."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required in CI (.ci/run installs it)")
        pytest.skip(f"{name} is not installed (.ci/run installs it)")
    return path


def answers(url: str) -> bool:
    """Whether `url` answers 200 now."""
    try:
        return httpx.get(url).status_code == 200
    except httpx.TransportError:
        return False


def wait_for_http(url: str, timeout: float = 60.0) -> None:
    """Wait until `url` answers 200, as a server that is starting eventually does."""
    wait_until(lambda: answers(url), timeout=timeout)


def clean_environment(**env: str) -> dict[str, str]:
    """This process's environment without the variables that switch modes (multiprocess, OpenTelemetry, tokens),
    plus `env`, with the project importable."""
    switches = ("PROMETHEUS_MULTIPROC_DIR", "OTEL_", "TRACED_TASKS_")
    kept = {key: value for key, value in os.environ.items() if not key.startswith(switches)}
    return {**kept, "PYTHONPATH": str(ROOT), **env}


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a new Python process, as a service's first import would, with a clean environment plus `env`."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=clean_environment(**env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@contextlib.contextmanager
def start_workers(tmp_path: Path, app: str = "tests.apps.workers:app") -> Iterator[str]:
    """`uvicorn --workers 2` serving `app` in multiprocess mode; yields its base URL."""
    port = free_port()
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = clean_environment(PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    command = [sys.executable, "-m", "uvicorn", app, "--workers", "2", "--port", str(port)]
    log = (tmp_path / "uvicorn.log").open("wb")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/metrics/")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


class Process:
    """A program started in a process group of its own, from the project's folder, with a clean environment plus
    `env`; its output goes to `log`. stop() ends the group with SIGTERM, then SIGKILL after `grace` seconds: a
    program's own worker processes go with it."""

    def __init__(self, command: list[str], log: Path, **env: str) -> None:
        self.log = log
        self._output = log.open("wb")
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=clean_environment(**env),
            stdout=self._output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, grace: float = 30.0) -> int:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self._output.close()
        return self.process.returncode


@contextlib.contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    """Debian's redis-server on a free loopback port, keeping nothing on disk; yields its URL."""
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    command = [require_tool("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    command += ["--appendonly", "no", "--dir", str(folder)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(timeout=30)


@contextlib.contextmanager
def rabbitmq_server(folder: Path) -> Iterator[str]:
    """Debian's RabbitMQ, a node of its own on free loopback ports, its files in `folder`; yields its AMQP URL. The
    Debian wrapper in /usr/sbin switches to the rabbitmq user, so the server script itself is started, as root."""
    script = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
    if not script.exists():
        require_tool("rabbitmq-server")  # fails in CI, skips elsewhere
    port, distribution = free_port(), free_port()
    for name in ("mnesia", "log", "home"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    plugins = folder / "enabled_plugins"
    plugins.write_text("[].\n")
    environment = {
        **os.environ,
        "HOME": str(folder / "home"),
        "RABBITMQ_NODENAME": f"traced{port}@localhost",
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(distribution),
        "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
        "RABBITMQ_LOG_BASE": str(folder / "log"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(plugins),
    }
    log = (folder / "rabbitmq.log").open("wb")
    server = subprocess.Popen(
        [str(script)], env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"rabbitmq-server did not start: {(folder / 'rabbitmq.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield f"amqp://guest:guest@127.0.0.1:{port}//"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        log.close()


class Prometheus:
    """Debian's Prometheus on a loopback port, with the shipped rules (their text edited by `edit`), scraping `target`
    as the job JOB, or each job of `jobs` (job name: (target, metrics path))."""

    JOB = "traced-tasks-test"

    def __init__(
        self,
        binary: str,
        folder: Path,
        target: str = "",
        jobs: dict[str, tuple[str, str]] | None = None,
        edit: Callable[[str], str] = lambda rules: rules,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        rule_file = yaml.safe_load(edit((ROOT / "dashboards" / "rules.yml").read_text()))
        for group in rule_file["groups"]:
            group["interval"] = "1s"  # evaluate soon enough for the test to read each rule's health
        (folder / "rules.yml").write_text(yaml.safe_dump(rule_file))
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["rules.yml"],
            "scrape_configs": [
                {"job_name": job, "metrics_path": path, "static_configs": [{"targets": [address]}]}
                for job, (address, path) in (jobs or {self.JOB: (target, "/metrics/")}).items()
            ],
        }
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (folder / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--enable-feature=exemplar-storage",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

        wait_for_http(self.url + "/-/ready")

    def api(self, path: str, **params: Any) -> Any:
        response = httpx.get(self.url + "/api/v1/" + path, params=params, timeout=30)
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


class Collector:
    """A minimal OTLP/HTTP receiver on a loopback port, as an OpenTelemetry collector or Jaeger would be: it decodes
    each export request, traces and metrics, with the OTLP protobuf schema. With `hang`, it never answers."""

    def __init__(self, hang: bool = False) -> None:
        self.traces: list[ExportTraceServiceRequest] = []
        self.metrics: list[ExportMetricsServiceRequest] = []
        self.hang = threading.Event() if hang else None
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                if collector.hang is not None:
                    collector.hang.wait(120)
                    return
                if self.path.endswith("/v1/metrics"):
                    metrics = ExportMetricsServiceRequest()
                    metrics.ParseFromString(body)
                    collector.metrics.append(metrics)
                else:
                    traces = ExportTraceServiceRequest()
                    traces.ParseFromString(body)
                    collector.traces.append(traces)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def spans(self) -> list[Span]:
        return [
            span
            for request in self.traces
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]

    def spans_of(self, service: str) -> list[Span]:
        """The spans exported by the processes whose resource's service.name is `service`."""
        return [
            span
            for request in self.traces
            for resource_spans in request.resource_spans
            if any(
                attribute.key == "service.name" and attribute.value.string_value == service
                for attribute in resource_spans.resource.attributes
            )
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]

    def services(self) -> set[str]:
        return {
            attribute.value.string_value
            for request in self.traces
            for resource_spans in request.resource_spans
            for attribute in resource_spans.resource.attributes
            if attribute.key == "service.name"
        }

    def __enter__(self) -> Collector:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.hang is not None:
            self.hang.set()
        self.server.shutdown()
        self.server.server_close()


def samples(url: str, **headers: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples a /metrics endpoint serves now: (name, sorted labels) to value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url, headers=headers, timeout=30).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def attributes(span: Span) -> dict[str, Any]:
    """An OTLP span's attributes as a dict of plain values."""
    found: dict[str, Any] = {}
    for attribute in span.attributes:
        value = attribute.value
        found[attribute.key] = getattr(value, value.WhichOneof("value") or "string_value")
    return found


def chromium(user_data: Path, width: int = 1400, height: int = 1000) -> Any:
    """Headless Chromium from Debian's chromium and chromium-driver packages, driven by selenium; quit() it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = require_tool("chromium")
    # The background-networking flags keep Chromium from reaching for Google's hosts, which this network refuses.
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        "--no-first-run",
        f"--user-data-dir={user_data}",
        f"--window-size={width},{height}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(require_tool("chromedriver")), options=options)
