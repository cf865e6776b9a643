"""What a task handed to Celery or taskiq costs, against the engine's own publish and its own OpenTelemetry
instrumentation, in one process, with a real redis-server as the broker and the SDK exporting to nowhere.

- publish: what the web process pays for one task, from scheduling it to the broker having it. The baseline is what a
  service does without traced_tasks: a Starlette background task that calls apply_async (or awaits kiq), traced by
  the engine's own instrumentation (opentelemetry-instrumentation-celery, taskiq's OpenTelemetryMiddleware).
- run: what a worker pays per run, around the task's own work. Celery: task.apply(), which runs the task through
  Celery's tracer and its signals, as a worker does. taskiq: InMemoryBroker(await_inplace=True), whose receiver runs
  the middlewares of both sides, as a kick and a worker do.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import CollectorRegistry
from starlette.background import BackgroundTasks as StarletteTasks

import traced_tasks
from benchmarks.variants import NullExporter

Timed = Callable[[int], Awaitable[float]]  # microseconds per task, over so many tasks


@contextlib.contextmanager
def redis() -> Iterator[str | None]:
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        server = subprocess.Popen([*command, "--dir", folder], stdout=subprocess.DEVNULL)
        try:
            for _ in range(300):
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                    break
                time.sleep(0.01)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            server.terminate()
            server.wait(timeout=30)


def timed(step: Callable[[], Awaitable[None]]) -> Timed:
    async def run(count: int) -> float:
        started = time.perf_counter_ns()
        for _ in range(count):
            await step()
        return (time.perf_counter_ns() - started) / count / 1000

    return run


def through_a_batch(tasks_class: type[StarletteTasks], func: Callable[..., Any], *args: Any) -> Timed:
    async def step() -> None:
        tasks = tasks_class()
        tasks.add_task(func, *args)
        await tasks()

    return timed(step)


Variants = dict[str, tuple[Timed, bool]]  # per name: how to time it, and whether the engine's instrumentation is on


def celery_variants(
    url: str, exporting: TracerProvider
) -> tuple[dict[str, tuple[Timed, bool]], Callable[[bool], None]]:
    """Per variant: how to time it, and whether Celery's own instrumentation is on for it; and how to turn it on."""
    from celery import Celery
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    import traced_tasks.celery

    plain, ours = Celery("plain", broker=url), Celery("ours", broker=url)
    traced_tasks.celery.instrument(ours)

    def send_receipt(order_id: int) -> None:
        pass

    plain_task = plain.task(name="plain.send_receipt", ignore_result=True)(send_receipt)
    our_task = ours.task(name="ours.send_receipt", ignore_result=True)(send_receipt)
    instrumentor = CeleryInstrumentor()  # type: ignore[no-untyped-call]

    async def apply_plain() -> None:
        plain_task.apply((7,))

    async def apply_ours() -> None:
        our_task.apply((7,))

    publish_plain = through_a_batch(StarletteTasks, plain_task.apply_async, (7,))
    variants = {
        "publish: Starlette task calls apply_async": (publish_plain, False),
        "publish: the same, Celery's instrumentation": (publish_plain, True),
        "publish: traced_tasks hands it over": (through_a_batch(traced_tasks.BackgroundTasks, our_task, 7), False),
        "run: task.apply(), bare": (timed(apply_plain), False),
        "run: task.apply(), Celery's instrumentation": (timed(apply_plain), True),
        "run: task.apply(), traced_tasks": (timed(apply_ours), False),
    }

    def toggle(on: bool) -> None:
        if on and not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument(tracer_provider=exporting)
        elif not on and instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()

    return variants, toggle


async def taskiq_variants(url: str, exporting: TracerProvider) -> Variants:
    """Per variant: how to time it. Each has a broker of its own, with or without a middleware."""
    from taskiq import InMemoryBroker
    from taskiq.middlewares.opentelemetry_middleware import OpenTelemetryMiddleware
    from taskiq_redis import ListQueueBroker

    import traced_tasks.taskiq

    async def send_receipt(order_id: int) -> None:
        pass

    brokers: list[Any] = []

    def task(broker: Any, *middlewares: Any) -> Any:
        brokers.append(broker.with_middlewares(*middlewares))
        return broker.task(send_receipt)

    def kicking(task: Any) -> Timed:
        async def step() -> None:
            await task.kiq(7)

        return timed(step)

    theirs = OpenTelemetryMiddleware
    plain, instrumented = task(ListQueueBroker(url)), task(ListQueueBroker(url), theirs(tracer_provider=exporting))
    ours = task(ListQueueBroker(url), traced_tasks.taskiq.Middleware())
    memory_plain, memory_instrumented, memory_ours = (
        task(InMemoryBroker(await_inplace=True)),
        task(InMemoryBroker(await_inplace=True), theirs(tracer_provider=exporting)),
        task(InMemoryBroker(await_inplace=True), traced_tasks.taskiq.Middleware()),
    )
    for broker in brokers:
        await broker.startup()
    return {
        "publish: Starlette task awaits kiq": (through_a_batch(StarletteTasks, plain.kiq, 7), False),
        "publish: the same, taskiq's instrumentation": (through_a_batch(StarletteTasks, instrumented.kiq, 7), False),
        "publish: traced_tasks hands it over": (through_a_batch(traced_tasks.BackgroundTasks, ours, 7), False),
        "run: kiq in memory, bare": (kicking(memory_plain), False),
        "run: kiq in memory, taskiq's instrumentation": (kicking(memory_instrumented), False),
        "run: kiq in memory, traced_tasks": (kicking(memory_ours), False),
    }


def engines(rounds: int, iterations: int) -> None:
    if rounds < 1:
        return
    with redis() as url:
        if url is None:
            print("\nengines: skipped, redis-server is not installed (apt-get install redis-server)")
            return
        exporting = TracerProvider()
        exporting.add_span_processor(BatchSpanProcessor(NullExporter()))
        traced_tasks.configure(tracer_provider=exporting, registry=CollectorRegistry())
        celery, toggle = celery_variants(url, exporting)
        title = "{}, per task (µs), redis broker, SDK exporting to nowhere"
        asyncio.run(report(title.format("Celery"), celery, toggle, rounds, iterations))

        async def taskiq() -> None:
            await report(title.format("taskiq"), await taskiq_variants(url, exporting), None, rounds, iterations)

        asyncio.run(taskiq())
        exporting.shutdown()


async def report(
    title: str, variants: Variants, toggle: Callable[[bool], None] | None, rounds: int, iterations: int
) -> None:
    results: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name in random.sample(list(variants), len(variants)):
            timing, instrumented = variants[name]
            if toggle is not None:
                toggle(instrumented)
            await timing(max(iterations // 10, 5))  # warm up
            gc.collect()
            results[name].append(await timing(iterations))
    if toggle is not None:
        toggle(False)
    print(f"\n{title}")
    for name, times in results.items():
        print(f"  {name:<48}{statistics.median(times):>10.1f}")
    for side in ("publish", "run"):
        names = [name for name in results if name.startswith(side)]
        ours, theirs = names[2], names[1]
        ratio = statistics.median(o / t for o, t in zip(results[ours], results[theirs], strict=True))
        print(f"  {side}: traced_tasks ÷ the engine's own instrumentation: {ratio:.2f}")
