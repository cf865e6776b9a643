"""The two Prometheus backends (in-process numbers, prometheus_client's objects for multiprocess) agree exactly."""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from opentelemetry.trace import SpanContext, TraceFlags
from prometheus_client import CollectorRegistry
from prometheus_client import generate_latest as generate_text
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from tests.support import wait_until
from traced_tasks import _conventions as names
from traced_tasks._activity import Activity, View
from traced_tasks._backends import Backend
from traced_tasks._backends import in_process as in_process_module
from traced_tasks._backends.in_process import InProcessBackend
from traced_tasks._backends.multiprocess import MultiprocessBackend, _ActivityFiles
from traced_tasks._options import Options

EXEMPLAR = SpanContext(
    0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED)
)

EVENTS = st.lists(
    st.tuples(
        st.sampled_from([("send", ""), ("charge", ""), ("notify", "/orders/{order_id}"), ("notify", "/users/{id}")]),
        st.sampled_from(["schedule", "start", "succeed", "error", "cancel", "skip"]),
        st.sampled_from([0.0001, 0.003, 0.005, 0.2, 1.0, 7.5, 45.0, 3600.0, 5000.0]),  # some on a bound exactly
        st.booleans(),
        st.sampled_from(["KeyError", "ValueError", "TimeoutError"]),
    ),
    max_size=40,
)


@dataclass(frozen=True)
class Running:
    """A run in progress, as the activity record holds it."""

    task: str
    route: str | None
    values: tuple[str, ...]
    started_at: float

    def trace_id(self) -> str | None:
        return None

    def where(self) -> list[str] | None:
        return None


def apply(
    backend: Backend,
    activity: Activity,
    events: list[tuple[Any, ...]],
    route_label: bool,
    tick: float = 1,
    where: Callable[[int, Callable[[], None]], None] | None = None,
) -> None:
    """Play events through a backend's TaskCounts, as runs do, with the runs in progress in the activity record: a
    finish only for a run that started. The clock moves `tick` seconds per event; `where(i, update)` makes the i-th
    update, in a thread it chooses."""
    started: dict[tuple[str, ...], list[Running]] = {}
    counted: dict[tuple[str, ...], Any] = {}  # one TaskCounts per set of values, as traced_tasks asks for them
    clock = 1_700_000_000.0
    for index, ((task, route), event, seconds, sampled, exception) in enumerate(events):
        values = (task, route) if route_label else (task,)
        if values not in counted:
            counted[values] = backend.counts(values)
        clock += tick
        running = started.setdefault(values, [])
        exemplar = EXEMPLAR if sampled else None
        run = Running(task, route, values, clock)
        update = functools.partial(_play, counted[values], activity, running, run, event, seconds, exemplar, exception)
        if where is None:
            update()
        else:
            where(index, update)


def _play(
    counts: Any,
    activity: Activity,
    running: list[Running],
    new: Running,
    event: str,
    seconds: float,
    exemplar: SpanContext | None,
    exception: str,
) -> None:
    """One event: `new` is the run a start begins; a finish ends the oldest of `running`."""
    if event == "schedule":
        counts.schedule()
    elif event == "start":
        running.append(new)
        counts.start(seconds, new.started_at, activity.started(new))
    elif event == "skip":
        counts.skip()
    elif running:
        run = running.pop(0)
        oldest = activity.ended(run)
        if event == "succeed":
            counts.succeed(seconds, run.started_at, exemplar, oldest)
        elif event == "error":
            counts.fail(names.STATUS_ERROR, seconds, run.started_at, exemplar, exception, oldest)
        else:
            counts.fail(names.STATUS_CANCELLED, seconds, run.started_at, exemplar, None, oldest)


def samples(registry: CollectorRegistry, times: bool = False) -> set[tuple[Any, ...]]:
    """Every sample, without the _created series (prometheus_client's only), and the values read from a clock (the
    last success, exemplars' times) only with `times`."""
    found = set()
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name.endswith("_created"):
                continue
            value = sample.value > 0 if sample.name == names.LAST_SUCCESS.name and not times else sample.value
            exemplar = (
                (
                    tuple(sorted(sample.exemplar.labels.items())),
                    sample.exemplar.value,
                    sample.exemplar.timestamp if times else None,
                )
                if sample.exemplar
                else None
            )
            found.add((sample.name, tuple(sorted(sample.labels.items())), value, exemplar))
    return found


def in_process(
    route_label: bool = False, namespace: str = "", activity: Activity | None = None
) -> tuple[InProcessBackend, CollectorRegistry]:
    registry = CollectorRegistry()
    options = Options(registry=registry, route_label=route_label, namespace=namespace)
    activities = (activity or Activity(),)
    backend = InProcessBackend(options, registry, lambda: activities)
    backend.open()
    return backend, registry


def multiprocess(
    folder: Path, route_label: bool = False, activity: Activity | None = None
) -> tuple[MultiprocessBackend, CollectorRegistry]:
    # prometheus_client keeps these objects' values in memory: it chose so when first imported, without the folder.
    registry = CollectorRegistry()
    options = Options(registry=registry, route_label=route_label)
    backend = MultiprocessBackend(options, str(folder), activity or Activity())
    backend.open()
    return backend, registry


@settings(max_examples=150, deadline=None)
@given(EVENTS, st.booleans())
def test_backends_expose_the_same_samples(tmp_path_factory: pytest.TempPathFactory, events: Any, route: bool) -> None:
    """For any sequence of events, with or without the route label, both backends expose the same samples: counts,
    bucket counts, sums, exemplars, and the oldest start of the runs in progress, absent when none runs."""
    activity = Activity()
    local, local_registry = in_process(route, activity=activity)
    client_activity = Activity()  # which the multiprocess backend indexes by label values
    client, client_registry = multiprocess(tmp_path_factory.mktemp("multiprocess"), route, client_activity)
    apply(local, activity, events, route)
    apply(client, client_activity, events, route)
    ours = samples(local_registry)
    theirs = {sample for sample in samples(client_registry) if not _nothing_runs(sample)}
    assert ours == theirs


def _nothing_runs(sample: tuple[Any, ...]) -> bool:
    # The multiprocess backend writes +Inf where no run is in progress; its collector leaves those out when scraped.
    return bool(sample[0] == names.IN_PROGRESS_SINCE.name and sample[2] == float("inf"))


@settings(max_examples=100, deadline=None)
@given(EVENTS, st.lists(st.booleans(), min_size=40, max_size=40))
@example(  # the later exemplar of a bucket, whichever thread kept it
    [(("send", ""), event, 5000.0, True, "KeyError") for event in ("start", "start", "succeed", "succeed")],
    [False, False, True, False] * 10,
).via("the later exemplar")
@example(
    [(("send", ""), event, 5000.0, True, "KeyError") for event in ("start", "start", "succeed", "succeed")],
    [False, False, False, True] * 10,
).via("the later exemplar, from the other thread")
def test_counts_kept_by_two_threads_read_as_by_one(events: Any, elsewhere: list[bool]) -> None:
    """Counts updated partly by the main thread, without a lock, and partly by another thread, under the backend's
    lock, expose the samples the same updates expose from one thread: counts, bucket counts, sums (but for their last
    bit), in_progress, the last success, and each bucket's last exemplar, with its time. The clock moves more per
    event than any run time, so that a later end is a later exemplar, as it is for real runs."""
    one, one_registry = in_process()
    two, two_registry = in_process()
    apply(one, Activity(), events, route_label=False, tick=10_000)
    with ThreadPoolExecutor(max_workers=1) as other:

        def where(index: int, update: Callable[[], None]) -> None:
            if elsewhere[index]:
                other.submit(update).result()
            else:
                update()

        apply(two, Activity(), events, route_label=False, tick=10_000, where=where)
    # Sums add in another order, so they may differ in their last bit; every value played has at most four decimals.
    assert rounded(samples(two_registry, times=True)) == rounded(samples(one_registry, times=True))


def rounded(found: set[tuple[Any, ...]]) -> set[tuple[Any, ...]]:
    """The samples, with sums to 12 significant digits."""
    return {
        (name, labels, float(f"{value:.12g}") if name.endswith("_sum") else value, exemplar)
        for name, labels, value, exemplar in found
    }


def test_counts_updated_from_many_threads_at_once_lose_nothing() -> None:
    """The main thread and four others update one set of counts at once, switching threads as often as the
    interpreter allows: no update is lost, including those of an exception's count, which reads its count before
    it writes it back."""
    backend, registry = in_process()
    counts = backend.counts(("send",))
    runs = 10_000

    def update() -> None:
        for number in range(runs):
            counts.schedule()
            counts.start(0.001, 0.0, None)
            if number % 5:
                counts.fail(names.STATUS_ERROR, 0.002, 0.0, None, "KeyError", None)
            else:
                counts.succeed(0.002, 0.0, None, None)

    others = [threading.Thread(target=update) for _ in range(4)]
    with switching_often():
        for thread in others:
            thread.start()
        update()
        for thread in others:
            thread.join()
    total = 5 * runs
    assert registry.get_sample_value(names.SCHEDULED.total, {"task": "send"}) == total
    assert registry.get_sample_value(names.WAIT.count, {"task": "send"}) == total
    assert registry.get_sample_value(names.DURATION.count, {"task": "send", "status": "success"}) == total // 5
    assert registry.get_sample_value(names.DURATION.count, {"task": "send", "status": "error"}) == total * 4 // 5
    assert (
        registry.get_sample_value(names.EXCEPTIONS.total, {"task": "send", "exception": "KeyError"}) == total * 4 // 5
    )
    assert registry.get_sample_value(names.IN_PROGRESS.name, {"task": "send"}) == 0


def test_counts_read_while_their_writer_goes_on_never_contradict_themselves() -> None:
    """A thread reads a set of counts over and over while the main thread, which takes no lock, schedules,
    starts and ends runs, switching threads as often as the interpreter allows: no read shows more runs started than
    scheduled, or more ended than started, which would be a negative number in progress."""
    backend, _ = in_process()
    counts = backend.counts(("send",))
    reads: list[tuple[float, float, float]] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            for task in backend.totals():
                reads.append((task.scheduled, task.started, sum(task.outcomes.values())))

    reader = threading.Thread(target=read)
    with switching_often():
        reader.start()
        for _ in range(200_000):
            counts.schedule()
            counts.start(0.001, 0.0, None)
            counts.succeed(0.002, 0.0, None, None)
        stop.set()
        reader.join()
    assert len(reads) > 100, "the reader hardly read"
    assert all(scheduled >= started >= ended for scheduled, started, ended in reads)


@pytest.mark.parametrize("gil", [True, False], ids=["gil", "free-threaded"])
def test_the_main_thread_counts_without_the_lock_whichever_thread_made_the_counts(
    gil: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counts made in another thread (a sync endpoint's first add_task, in a threadpool) are still kept by the main
    thread without the lock, in the first tally, and by the other thread in the second; on a build without a GIL,
    every thread keeps the second, under the lock."""
    monkeypatch.setattr(in_process_module, "_GIL", gil)
    backend, registry = in_process()
    with ThreadPoolExecutor(max_workers=1) as other:
        counts = other.submit(backend.counts, ("send",)).result()
        counts.schedule()
        counts.schedule()
        other.submit(counts.schedule).result()
    own, others = counts._own, counts._others
    assert others is not None
    assert (own.scheduled, others.scheduled) == ((2, 1) if gil else (0, 3))
    assert registry.get_sample_value(names.SCHEDULED.total, {"task": "send"}) == 3


def test_a_count_a_finalizer_makes_in_the_middle_of_another_is_not_lost() -> None:
    """The garbage collector can run a finalizer in the middle of an update on the main thread, which takes no lock,
    and the finalizer can end a run too (a dropped run's coroutine, closed): here the first cancelled run of a task
    is being counted when the collector, set off by that update's own allocation, counts another. Both are counted,
    and nothing is left in progress."""
    backend, registry = in_process()
    counts = backend.counts(("send",))
    for _ in range(2):
        counts.start(0.001, 0.0, None)

    class Dropped:
        """Garbage only the collector frees: it refers to itself."""

        def __init__(self) -> None:
            self.itself = self

        def __del__(self) -> None:
            counts.fail(names.STATUS_CANCELLED, 0.002, 0.0, None, None, None)

    Dropped()
    threshold = gc.get_threshold()
    gc.set_threshold(1)  # a collection at the next allocation of a tracked object
    try:
        counts.fail(names.STATUS_CANCELLED, 0.002, 0.0, None, None, None)
    finally:
        gc.set_threshold(*threshold)
    gc.collect()
    assert registry.get_sample_value(names.DURATION.count, {"task": "send", "status": "cancelled"}) == 2
    assert registry.get_sample_value(names.IN_PROGRESS.name, {"task": "send"}) == 0


@contextlib.contextmanager
def switching_often() -> Iterator[None]:
    """Threads switch as often as the interpreter allows."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


def test_error_series_exist_from_the_first_schedule(tmp_path: Path) -> None:
    """Both backends expose a task's error duration series at 0 from its first schedule, so that rate() counts its
    first failures; cancelled appears with the first cancelled run."""
    for backend, registry in (in_process(), multiprocess(tmp_path)):
        backend.counts(("send",)).schedule()
        assert registry.get_sample_value(names.DURATION.count, {"task": "send", "status": "error"}) == 0
        assert registry.get_sample_value(names.DURATION.count, {"task": "send", "status": "success"}) == 0
        assert registry.get_sample_value(names.DURATION.count, {"task": "send", "status": "cancelled"}) is None


def test_local_backend_openmetrics_has_exemplars() -> None:
    """The in-process backend's exemplars reach the OpenMetrics exposition, on the bucket of the observation."""
    backend, registry = in_process(namespace="shop")
    task = backend.counts(("send",))
    task.schedule()
    task.start(0.001, 1.0, 1.0)
    task.succeed(0.2, 1.0, EXEMPLAR, None)
    text = generate_openmetrics(registry).decode()
    (line,) = [line for line in text.splitlines() if "# {" in line]
    assert line.startswith(
        'shop_background_task_duration_seconds_bucket{le="0.25",status="success",task="send"} 1.0 # {'
    )
    assert 'span_id="00f067aa0ba902b7",trace_id="4bf92f3577b34da6a3ce929d0e0e4736"} 0.2' in line


@pytest.mark.parametrize("kind", ["in-process", "prometheus_client"])
def test_span_ids_that_are_not_numbers_drop_the_exemplar_only(kind: str, tmp_path: Path) -> None:
    """A span context whose IDs cannot be written in hex, as only a tracer other than the SDK's could make,
    costs its exemplar and nothing else: the run is counted, and both expositions of the registry still work."""
    backend, registry = in_process() if kind == "in-process" else multiprocess(tmp_path)
    odd = SpanContext(Decimal(5), 7, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))  # type: ignore[arg-type]
    task = backend.counts(("send",))
    task.schedule()
    task.start(0.001, 1.0, 1.0)
    task.succeed(0.2, 1.0, odd, None)
    task.start(0.001, 2.0, 2.0)
    task.fail(names.STATUS_ERROR, 0.2, 2.0, odd, "KeyError", None)
    for text in (generate_text(registry).decode(), generate_openmetrics(registry).decode()):
        assert f'{names.DURATION.count}{{status="success",task="send"}} 1.0' in text
        assert f'{names.DURATION.count}{{status="error",task="send"}} 1.0' in text
        assert "trace_id" not in text


def watched(folder: Path) -> tuple[Activity, _ActivityFiles]:
    """An activity with one run in progress, and the activity files of `folder`, made empty, watching it."""
    folder.mkdir()
    activity = Activity()
    activity.started(Running("send", None, ("send",), 1.0))
    files = _ActivityFiles(str(folder))
    files.watch(activity)
    return activity, files


def test_the_activity_file_comes_back_after_a_write_failed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A process whose activity file cannot be written for a while (its folder emptied and gone, a full disk) logs
    it once and writes it again once it can, rather than stop writing for the rest of its life."""
    folder = tmp_path / "multiprocess"
    activity, files = watched(folder)
    files.publish()
    mine = folder / f"traced_tasks_activity_{os.getpid()}.json"
    try:
        wait_until(mine.exists)
        shutil.rmtree(folder)
        activity.started(Running("refund", None, ("refund",), 2.0))  # a change, so a write
        wait_until(lambda: "cannot write the runs of this process" in caplog.text)
        folder.mkdir()
        wait_until(mine.exists)
        assert [run.task for run in View.from_json(json.loads(mine.read_text())).listed] == ["send", "refund"]
        assert caplog.text.count("cannot write the runs of this process") == 1
    finally:
        files.stop()


def test_a_start_that_fails_after_counting_leaves_nothing_in_progress(tmp_path: Path) -> None:
    """When starting this process's activity writer fails at a run's start, the run still counts as in progress
    until it ends, and then not: the gauge never goes below 0 and the end does not raise."""
    backend, registry = multiprocess(tmp_path)

    def fail() -> None:
        raise RuntimeError("can't start new thread")

    backend._files.publish = fail  # type: ignore[method-assign]
    task = backend.counts(("send",))
    task.schedule()
    with pytest.raises(RuntimeError):
        task.start(0.001, 1.0, 1.0)
    assert registry.get_sample_value(names.IN_PROGRESS.name, {"task": "send"}) == 1
    task.succeed(0.2, 1.0, None, None)
    assert registry.get_sample_value(names.IN_PROGRESS.name, {"task": "send"}) == 0


def test_a_writer_that_could_not_start_is_started_at_the_next_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When this process's activity writer cannot start (no thread to be had), the next run starts it, rather than
    none ever again: the process's runs reach the console once threads can be had."""
    folder = tmp_path / "multiprocess"
    _, files = watched(folder)
    start = threading.Thread.start

    def fail(thread: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", fail)
    with pytest.raises(RuntimeError):
        files.publish()
    monkeypatch.setattr(threading.Thread, "start", start)
    try:
        files.publish()
        wait_until((folder / f"traced_tasks_activity_{os.getpid()}.json").exists)
    finally:
        files.stop()
