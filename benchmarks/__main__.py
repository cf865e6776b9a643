"""What traced_tasks costs per task, against bare Starlette and the alternatives, measured in one process.

    make bench                                  # the full run (a few minutes)
    make bench BENCH_ARGS="--quick"             # tiny counts, only to check that it runs

Variants run interleaved, in a new random order each round, and every figure is a median over rounds;
ratios are taken within a round, then their median is reported. Overhead is a variant's time minus bare.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import functools
import gc
import os
import platform
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import CollectorRegistry
from starlette import background

import traced_tasks
from benchmarks.backlog import backlog
from benchmarks.engines import engines
from benchmarks.variants import NullExporter, hand_written, span_only, span_with_code_attributes, two_histograms
from traced_tasks._web.metrics import render

TasksClass = type[background.BackgroundTasks]

# The services of the end-to-end run (benchmarks/service.py), each with the one it is compared to.
E2E_VARIANTS = {
    "starlette": "starlette",
    "traced-no-sdk": "starlette",
    "span-only": "starlette",
    "traced": "starlette",
    "asgi-otel": "asgi-otel",
    "asgi-otel-traced": "asgi-otel",
}
ROOT = Path(__file__).resolve().parent.parent


class NullMetricExporter(MetricExporter):
    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        pass


def noop_sync() -> None:
    pass


async def noop_async() -> None:
    pass


async def time_batches(tasks_class: TasksClass, func: Callable[[], Any], iterations: int) -> float:
    """Microseconds per task: make a batch, add one task, run it, as a request does."""
    started = time.perf_counter_ns()
    for _ in range(iterations):
        tasks = tasks_class()
        tasks.add_task(func)
        await tasks()
    return (time.perf_counter_ns() - started) / iterations / 1000


class Variant(NamedTuple):
    tasks_class: TasksClass
    prepare: Callable[[], None] | None = None  # run before each timing, outside it


def variants(sdk: bool, folder: str) -> tuple[dict[str, Variant], Callable[[], None]]:
    """The variants, and what shuts their providers down: the meter provider's own shutdown at exit would collect
    once more, after the benchmarks' servers are gone."""
    provider: TracerProvider | None = None
    tracer_provider: trace.TracerProvider
    if sdk:
        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(NullExporter()))
        tracer_provider = provider
    else:
        tracer_provider = trace.NoOpTracerProvider()
    tracer = tracer_provider.get_tracer("benchmarks")

    def in_process() -> None:
        traced_tasks.configure(tracer_provider=tracer_provider, registry=CollectorRegistry())

    # OpenTelemetry's metrics SDK with a reader that exports to nowhere, once a minute: the cost is the measurements.
    meter_provider = MeterProvider(metric_readers=[PeriodicExportingMetricReader(NullMetricExporter(), 60_000)])

    def opentelemetry_metrics() -> None:
        traced_tasks.configure(tracer_provider=tracer_provider, meter_provider=meter_provider)

    def multiprocess_backend() -> None:
        # The multiprocess backend, prometheus_client's metric objects, in this one process: prometheus_client
        # keeps their values in memory, since the variable was unset when it was first imported.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
        try:
            traced_tasks.configure(tracer_provider=tracer_provider, registry=CollectorRegistry())
        finally:
            del os.environ["PROMETHEUS_MULTIPROC_DIR"]

    return {
        "bare": Variant(background.BackgroundTasks),
        "span-only": Variant(span_only(tracer)),
        "span+attrs": Variant(span_with_code_attributes(tracer)),
        "hand-written": Variant(hand_written(tracer, CollectorRegistry())),
        "traced_tasks": Variant(traced_tasks.BackgroundTasks, in_process),
        "traced-mp": Variant(traced_tasks.BackgroundTasks, multiprocess_backend),
        "traced-otel": Variant(traced_tasks.BackgroundTasks, opentelemetry_metrics),
        "otel-floor": Variant(two_histograms(meter_provider.get_meter("benchmarks"))),
    }, functools.partial(shut_down, provider, meter_provider)


def multiprocess_folder() -> str:
    """The multiprocess variant's folder, kept until this process ends: its writer of runs in progress lives as long
    as the process does, and would write into a folder removed under it."""
    folder = tempfile.mkdtemp(prefix="traced_tasks_benchmarks_")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def run_case(sdk: bool, func: Callable[[], Any], rounds: int, iterations: int) -> dict[str, list[float]]:
    folder = multiprocess_folder()
    classes, close = variants(sdk, folder)
    results: dict[str, list[float]] = {name: [] for name in classes}
    warm_up = max(iterations // 10, 10)

    async def main() -> None:
        for variant in classes.values():  # warm caches, threads and the span queue
            if variant.prepare is not None:
                variant.prepare()
            await time_batches(variant.tasks_class, func, warm_up)
        for _ in range(rounds):
            order = list(classes)
            random.shuffle(order)
            for name in order:
                variant = classes[name]
                if variant.prepare is not None:
                    variant.prepare()
                    await time_batches(variant.tasks_class, func, warm_up)
                gc.collect()
                results[name].append(await time_batches(variant.tasks_class, func, iterations))

    asyncio.run(main())
    close()
    return results


def report_case(title: str, results: dict[str, list[float]]) -> None:
    bare = results["bare"]
    print(f"\n{title}")
    print(f"  {'variant':<14}{'median µs/task':>16}{'overhead µs':>14}{'÷ bare':>9}")
    for name, times in results.items():
        overhead = statistics.median(t - b for t, b in zip(times, bare, strict=True))
        ratio = statistics.median(t / b for t, b in zip(times, bare, strict=True))
        print(f"  {name:<14}{statistics.median(times):>16.2f}{overhead:>14.2f}{ratio:>9.3f}")
    ours = [t - b for t, b in zip(results["traced_tasks"], bare, strict=True)]
    for other in ("span-only", "span+attrs", "hand-written", "traced-mp", "traced-otel"):
        theirs = [t - b for t, b in zip(results[other], bare, strict=True)]
        ratios = [o / t for o, t in zip(ours, theirs, strict=True) if t > 0]
        # With tiny counts, noise can make an overhead negative in every round: then there is no ratio.
        shown = f"{statistics.median(ratios):.3f}" if ratios else "n/a (overhead lost in noise)"
        print(f"  traced_tasks overhead ÷ {other} overhead: {shown}")
    # What the OpenTelemetry path adds to the in-process counts, against the two measurements it cannot do without.
    added = [o - t for o, t in zip(results["traced-otel"], results["traced_tasks"], strict=True)]
    floor = [f - b for f, b in zip(results["otel-floor"], bare, strict=True)]
    ratios = [a / f for a, f in zip(added, floor, strict=True) if f > 0]
    shown = f"{statistics.median(ratios):.3f}" if ratios else "n/a (overhead lost in noise)"
    print(
        f"  OpenTelemetry path over in-process: {statistics.median(added):.2f} µs, ÷ two SDK histogram records: {shown}"
    )


def shut_down(provider: TracerProvider | None, meter_provider: MeterProvider) -> None:
    if provider is not None:
        provider.shutdown()
    meter_provider.shutdown()


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory(tasks: int) -> None:
    """RSS growth over `tasks` tasks after a warm-up, with the SDK and a batch span processor."""
    classes, close = variants(sdk=True, folder="")
    traced = classes["traced_tasks"].tasks_class
    classes["traced_tasks"].prepare()  # type: ignore[misc]

    async def main() -> None:
        await time_batches(traced, noop_async, min(tasks, 50_000))
        gc.collect()
        before = rss_mb()
        await time_batches(traced, noop_async, tasks)
        gc.collect()
        print(f"\nmemory: RSS {before:.1f} MB -> {rss_mb():.1f} MB over {tasks:,} tasks ({rss_mb() - before:+.2f} MB)")

    asyncio.run(main())
    close()


def scrape(names: int, repeats: int) -> None:
    """Time to render /metrics with `names` task names, in both formats, through prometheus_client's writers."""
    registry = CollectorRegistry()
    traced_tasks.configure(tracer_provider=trace.NoOpTracerProvider(), registry=registry, max_task_names=names)

    async def main() -> None:
        for index in range(names):
            namespace: dict[str, Any] = {}
            exec(f"def task_{index}():\n    pass", namespace)
            tasks = traced_tasks.BackgroundTasks()
            tasks.add_task(namespace[f"task_{index}"])
            await tasks()

    asyncio.run(main())
    for label, accept in (("text", "text/plain"), ("OpenMetrics", "application/openmetrics-text; version=1.0.0")):
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            size = len(render(registry, accept, "", [])[0])
            times.append((time.perf_counter() - started) * 1000)
        print(f"scrape: {names} task names, {label}: median {statistics.median(times):.1f} ms ({size / 1024:.0f} KiB)")


def end_to_end(rounds: int, seconds: int) -> None:
    """Requests per second through real uvicorn under wrk, Starlette's class against traced_tasks', interleaved."""
    wrk = shutil.which("wrk")
    if rounds < 1:
        return
    if wrk is None:
        print("\nend to end: skipped, wrk is not installed (apt-get install wrk)")
        return
    rates: dict[str, list[float]] = {name: [] for name in E2E_VARIANTS}
    for _ in range(rounds):
        for variant in random.sample(list(rates), len(rates)):
            port = _free_port()
            env = {**os.environ, "BENCH_VARIANT": variant, "PYTHONPATH": str(ROOT)}
            env.pop("PROMETHEUS_MULTIPROC_DIR", None)
            command = [sys.executable, "-m", "uvicorn", "benchmarks.service:app", "--port", str(port)]
            command += ["--log-level", "warning", "--no-access-log"]
            server = subprocess.Popen(command, env=env, cwd=ROOT)
            try:
                url = f"http://127.0.0.1:{port}/"
                _wait_for(url)
                subprocess.run([wrk, "-t1", "-c16", "-d1s", url], capture_output=True, check=True)  # warm up
                result = subprocess.run(
                    [wrk, "-t1", "-c16", f"-d{seconds}s", url], capture_output=True, text=True, check=True
                )
                match = re.search(r"Requests/sec:\s+([\d.]+)", result.stdout)
                assert match, result.stdout
                rates[variant].append(float(match.group(1)))
            finally:
                server.terminate()
                server.wait(timeout=30)
    print(f"\nend to end: uvicorn, 1 worker, wrk -t1 -c16, {seconds}s x {rounds} rounds")
    for variant, values in rates.items():
        baseline = rates[E2E_VARIANTS[variant]]
        ratio = statistics.median(v / b for v, b in zip(values, baseline, strict=True))
        print(
            f"  {variant:<17} median {statistics.median(values):>9.0f} requests/s"
            f"   ÷ {E2E_VARIANTS[variant]} {ratio:.3f}"
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for(url: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--iterations", type=int, default=4000, help="batches per variant per round")
    parser.add_argument("--memory-tasks", type=int, default=1_000_000)
    parser.add_argument("--scrape-names", type=int, default=1000)
    parser.add_argument("--e2e-rounds", type=int, default=5)
    parser.add_argument("--e2e-seconds", type=int, default=10)
    parser.add_argument("--engine-rounds", type=int, default=9)
    parser.add_argument("--engine-iterations", type=int, default=300, help="tasks per engine variant per round")
    parser.add_argument("--backlog-rounds", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="tiny counts: check that everything runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.iterations, args.memory_tasks, args.scrape_names = 2, 20, 200, 20
        args.e2e_rounds, args.e2e_seconds = 1, 1
        args.engine_rounds, args.engine_iterations = 1, 5
        args.backlog_rounds = 1

    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}")
    print(f"rounds={args.rounds} iterations={args.iterations}")
    for sdk in (True, False):
        for func in (noop_async, noop_sync):
            kind = "async" if func is noop_async else "sync"
            title = f"{kind} no-op task, {'SDK + BatchSpanProcessor' if sdk else 'no SDK (API no-op tracer)'}"
            report_case(title, run_case(sdk, func, args.rounds, args.iterations))
    memory(args.memory_tasks)
    scrape(args.scrape_names, repeats=5 if args.quick else 21)
    end_to_end(args.e2e_rounds, args.e2e_seconds)
    # The backlog first: every instrumented application of the process is read at a scrape, and the engines'
    # applications outlive their benchmark, with their redis-server gone.
    backlog(args.backlog_rounds)
    engines(args.engine_rounds, args.engine_iterations)
    traced_tasks.configure(registry=CollectorRegistry())
    sys.stdout.flush()


if __name__ == "__main__":
    main()
