"""What reading the queues costs a scrape: a Celery application on a real redis-server with five queues, each
holding a hundred messages, scraped with a read due at every scrape and with the last read served, in one process."""

from __future__ import annotations

import statistics
import time

from opentelemetry import trace
from prometheus_client import CollectorRegistry

from benchmarks.engines import redis
from traced_tasks._web.metrics import render

QUEUES = [f"queue{index}" for index in range(5)]


def backlog(rounds: int) -> None:
    with redis() as url:
        if url is None:
            print("\nbacklog: skipped, redis-server is not installed")
            return
        from celery import Celery
        from kombu import Queue

        import traced_tasks.celery

        app = Celery("bench", broker=url, set_as_current=False)
        app.conf.task_queues = [Queue(name) for name in QUEUES]

        @app.task(name="bench.noop")
        def noop() -> None:
            pass

        for name in QUEUES:
            for _ in range(100):
                noop.apply_async(queue=name)
        traced_tasks.celery.instrument(app)
        times: dict[str, list[float]] = {"reads": [], "served": []}
        for _ in range(rounds):
            for variant, every in (("reads", 1e-9), ("served", 3600.0)):
                registry = CollectorRegistry()
                traced_tasks.configure(tracer_provider=trace.NoOpTracerProvider(), registry=registry, queue_every=every)
                render(registry, "text/plain", "", [])  # a first read, connecting
                started = time.perf_counter()
                for _ in range(20):
                    body = render(registry, "text/plain", "", [])[0]
                times[variant].append((time.perf_counter() - started) / 20 * 1000)
                assert b'queue="queue0"} 100.0' in body, body
        reads, served = statistics.median(times["reads"]), statistics.median(times["served"])
        added = statistics.median(r - s for r, s in zip(times["reads"], times["served"], strict=True))
        print(f"\nbacklog: {len(QUEUES)} Celery queues on Redis, one pipelined round trip per read")
        print(f"  scrape with a read        median {reads:.2f} ms")
        print(f"  scrape serving the last   median {served:.2f} ms")
        print(
            f"  a read adds               median {added:.2f} ms to the scrape that makes it, at most once a queue_every"
        )
