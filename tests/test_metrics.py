from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import inspect
import logging
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from prometheus_client import CollectorRegistry
from starlette._utils import is_async_callable
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

import traced_tasks
from tests.apps.tasks import NAME, fail, ok, ok_async, run
from tests.conftest import Telemetry
from traced_tasks import BackgroundTask, BackgroundTasks
from traced_tasks import _conventions as names

PREFIX = "tests.test_metrics."
METRICS_PAGE = (Path(__file__).resolve().parent.parent / "docs" / "metrics.md").read_text()


class Mailer:
    def send(self) -> None:
        pass

    def __call__(self) -> None:
        pass


def traced_decorator(func: Callable[[], None]) -> Callable[[], None]:
    @functools.wraps(func)
    def wrapper() -> None:
        func()

    return wrapper


@traced_decorator
def decorated_one() -> None:
    pass


@traced_decorator
def decorated_two() -> None:
    pass


def test_success_counts(telemetry: Telemetry) -> None:
    """One successful run gives exact counts in every family it touches; the error series exists at 0 from the first
    schedule, so that rate() sees a first failure, while cancelled, which no rule reads, waits for its first run."""
    before = time.time()
    run((ok, ()))
    task = NAME + "ok"
    assert telemetry.value(names.SCHEDULED.total, task=task) == 1
    assert telemetry.value(names.WAIT.count, task=task) == 1
    assert telemetry.value(names.DURATION.count, task=task, status="success") == 1
    assert telemetry.value(names.DURATION.count, task=task, status="error") == 0
    assert telemetry.value(names.DURATION.count, task=task, status="cancelled") is None
    assert telemetry.value(names.IN_PROGRESS.name, task=task) == 0
    assert telemetry.value(names.SKIPPED.total, task=task) == 0
    last = telemetry.value(names.LAST_SUCCESS.name, task=task)
    assert last is not None
    assert before <= last <= time.time()


def test_failure_counts_exception_and_skips_the_rest(telemetry: Telemetry) -> None:
    """A failing task counts one error by exception class; the tasks after it count as skipped and never run."""
    ran: list[str] = []
    run((ok, ()), (fail, ()), (ran.append, ("never",)), (ok_async, ()))
    assert ran == []
    assert telemetry.value(names.DURATION.count, task=NAME + "ok", status="success") == 1
    assert telemetry.value(names.DURATION.count, task=NAME + "fail", status="error") == 1
    assert telemetry.value(names.EXCEPTIONS.total, task=NAME + "fail", exception="KeyError") == 1
    assert telemetry.value(names.SKIPPED.total, task=NAME + "ok_async") == 1
    assert telemetry.value(names.SKIPPED.total, task="builtins.list.append") == 1
    assert telemetry.value(names.SKIPPED.total, task=NAME + "ok") == 0
    assert telemetry.value(names.LAST_SUCCESS.name, task=NAME + "fail") == 0
    assert telemetry.value(names.IN_PROGRESS.name, task=NAME + "fail") == 0


def test_in_progress_while_running(telemetry: Telemetry) -> None:
    """The in-progress gauge is 1 while a task runs and 0 after, in the threadpool too."""
    seen: list[float | None] = []

    def look() -> None:
        seen.append(
            telemetry.value(names.IN_PROGRESS.name, task=PREFIX + "test_in_progress_while_running.<locals>.look")
        )

    run((look, ()))
    assert seen == [1.0]
    assert telemetry.value(names.IN_PROGRESS.name, task=PREFIX + "test_in_progress_while_running.<locals>.look") == 0


def test_wait_includes_earlier_tasks(telemetry: Telemetry) -> None:
    """A task's wait covers the run of the tasks before it in the batch."""
    run((time.sleep, (0.2,)), (ok, ()))
    wait = telemetry.value(names.WAIT.sum, task=NAME + "ok")
    duration = telemetry.value(names.DURATION.sum, task="time.sleep", status="success")
    assert wait is not None
    assert duration is not None
    assert duration >= 0.2
    assert wait >= duration


def test_duration_exemplar_carries_trace_and_span_id(telemetry: Telemetry) -> None:
    """The duration bucket of a sampled run holds an exemplar with the task span's trace and span IDs in hex."""
    from prometheus_client.openmetrics.exposition import generate_latest

    run((ok, ()))
    (span,) = telemetry.task_spans()
    trace_id = format(span.context.trace_id, "032x")
    span_id = format(span.context.span_id, "016x")
    text = generate_latest(telemetry.registry).decode()
    (line,) = [line for line in text.splitlines() if "duration_seconds_bucket" in line and " # {" in line]
    assert f'# {{span_id="{span_id}",trace_id="{trace_id}"}}' in line


def test_no_exemplar_when_not_sampled(telemetry: Telemetry) -> None:
    """With a sampler that drops everything, durations are counted but carry no exemplar."""
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
    from prometheus_client.openmetrics.exposition import generate_latest

    traced_tasks.configure(tracer_provider=TracerProvider(sampler=ALWAYS_OFF), registry=telemetry.registry)
    run((ok, ()))
    assert telemetry.value(names.DURATION.count, task=NAME + "ok", status="success") == 1
    assert "trace_id" not in generate_latest(telemetry.registry).decode()


def test_response_background_task_is_counted(telemetry: Telemetry) -> None:
    """A traced BackgroundTask passed straight to a Response is scheduled, run and counted like add_task's."""

    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("ok", background=BackgroundTask(ok_async))

    TestClient(Starlette(routes=[Route("/", endpoint)])).get("/")
    assert telemetry.value(names.SCHEDULED.total, task=NAME + "ok_async") == 1
    assert telemetry.value(names.DURATION.count, task=NAME + "ok_async", status="success") == 1


def test_scheduled_but_never_run_is_visible(telemetry: Telemetry) -> None:
    """When the endpoint raises after add_task, the task is scheduled but never finishes: the gap shows it."""

    async def endpoint(request: Request) -> Response:
        BackgroundTasks().add_task(ok)
        raise RuntimeError("handler bug")

    TestClient(Starlette(routes=[Route("/", endpoint)]), raise_server_exceptions=False).get("/")
    assert telemetry.value(names.SCHEDULED.total, task=NAME + "ok") == 1
    assert telemetry.value(names.DURATION.count, task=NAME + "ok", status="success") == 0


@pytest.mark.parametrize(
    ("func", "name"),
    [
        (functools.partial(functools.partial(ok)), NAME + "ok"),
        (Mailer().send, PREFIX + "Mailer.send"),
        (Mailer(), PREFIX + "Mailer"),
        (decorated_one, PREFIX + "decorated_one"),
        (decorated_two, PREFIX + "decorated_two"),
        (lambda: None, PREFIX + "<lambda>"),
        (print, "builtins.print"),
    ],
    ids=["partial", "bound-method", "callable-object", "decorated-1", "decorated-2", "lambda", "builtin"],
)
def test_task_label_is_the_qualified_function_name(telemetry: Telemetry, func: Callable[[], None], name: str) -> None:
    """Partials are unwrapped, bound methods and callable objects are named by class, decorators by what they wrap."""
    run((func, ()))
    assert telemetry.value(names.DURATION.count, task=name, status="success") == 1
    (span,) = telemetry.task_spans()
    assert span.name == "BackgroundTask " + name


def twin(module: str) -> Callable[[], None]:
    """A function named `send` in `module`, compiled from the same source as every other twin."""
    namespace: dict[str, Any] = {"__name__": module}
    exec(compile("def send():\n    pass\n", "<twin>", "exec"), namespace)
    func: Callable[[], None] = namespace["send"]
    return func


def renaming_decorator(func: Callable[[], None]) -> Callable[[], None]:
    def wrapper() -> None:
        func()

    wrapper.__qualname__ = func.__qualname__  # renamed, but no __wrapped__
    return wrapper


@renaming_decorator
def renamed_one() -> None:
    pass


@renaming_decorator
def renamed_two() -> None:
    pass


def test_functions_sharing_code_keep_their_names(telemetry: Telemetry) -> None:
    """Functions whose code objects are equal or shared still get their own names: twins from two modules,
    functions one decorator renamed, and method descriptors of different types."""
    emails, sms = twin("emails"), twin("sms")
    assert emails.__code__ == sms.__code__
    run((emails, ()), (sms, ()), (renamed_one, ()), (renamed_two, ()), (str.upper, ("a",)), (list.clear, ([],)))
    for name in ("emails.send", "sms.send", PREFIX + "renamed_one", PREFIX + "renamed_two", "builtins.str.upper"):
        assert telemetry.value(names.DURATION.count, task=name, status="success") == 1, name
    assert telemetry.value(names.DURATION.count, task="builtins.list.clear", status="success") == 1


def nestings() -> list[tuple[str, Callable[[BackgroundTasks, BackgroundTasks], None]]]:
    """Every way a batch can hold another: in its list, through add_task, as a task's func, two levels deep."""

    def deeper(outer: BackgroundTasks, inner: BackgroundTasks) -> None:
        middle = BackgroundTasks()
        middle.add_task(inner)
        outer.add_task(middle)

    return [
        ("in the list", lambda outer, inner: outer.tasks.append(inner)),
        ("add_task", lambda outer, inner: outer.add_task(inner)),
        ("BackgroundTask", lambda outer, inner: outer.tasks.append(BackgroundTask(inner))),
        ("two levels", deeper),
    ]


@pytest.mark.parametrize(("how", "nest"), nestings(), ids=[how for how, _ in nestings()])
def test_nested_batch_counts_as_skipped(
    telemetry: Telemetry, how: str, nest: Callable[[BackgroundTasks, BackgroundTasks], None]
) -> None:
    """A batch nested in a batch, behind a failing task, has each of its tasks counted as skipped, however it is
    nested; the nested batch is a container, not a task: no span and no series of its own. Run, its tasks are
    counted as theirs."""
    inner = BackgroundTasks()
    inner.add_task(ok)
    inner.add_task(ok_async)

    async def main(failing: bool) -> None:
        outer = BackgroundTasks()
        if failing:
            outer.add_task(fail)
        nest(outer, inner)
        if failing:
            with pytest.raises(KeyError):
                await outer()
        else:
            await outer()

    asyncio.run(main(failing=True))
    assert telemetry.value(names.SKIPPED.total, task=NAME + "ok") == 1
    assert telemetry.value(names.SKIPPED.total, task=NAME + "ok_async") == 1
    asyncio.run(main(failing=False))
    assert telemetry.value(names.DURATION.count, task=NAME + "ok", status="success") == 1
    assert telemetry.value(names.DURATION.count, task=NAME + "ok_async", status="success") == 1
    families = {family.name for family in names.TASK_FAMILIES}
    tasks = {
        sample.labels["task"]
        for metric in telemetry.registry.collect()
        if metric.name in families
        for sample in metric.samples
    }
    assert tasks == {NAME + "ok", NAME + "ok_async", NAME + "fail"}
    assert sorted(span.name for span in telemetry.task_spans()) == sorted(
        ["BackgroundTask " + NAME + name for name in ("fail", "ok", "ok_async")]
    )


def test_closures_made_per_request_share_one_series(telemetry: Telemetry) -> None:
    """A closure created anew for each request is one task name, not one per closure object."""

    def make() -> Callable[[], None]:
        def notify() -> None:
            pass

        return notify

    run(*[(make(), ()) for _ in range(5)])
    name = PREFIX + "test_closures_made_per_request_share_one_series.<locals>.make.<locals>.notify"
    assert telemetry.value(names.DURATION.count, task=name, status="success") == 5


def test_task_names_past_the_cap_collapse_into_overflow(telemetry: Telemetry, caplog: pytest.LogCaptureFixture) -> None:
    """Past max_task_names, new names count under the overflow label with one warning; spans keep the real name."""
    traced_tasks.configure(tracer_provider=telemetry.provider, registry=telemetry.registry, max_task_names=2)
    funcs = []
    for index in range(4):
        namespace: dict[str, Any] = {}
        exec(f"def task_{index}():\n    pass", namespace)
        funcs.append(namespace[f"task_{index}"])
    with caplog.at_level(logging.WARNING, logger="traced_tasks"):
        run(*[(func, ()) for func in funcs + funcs])
    assert telemetry.value(names.SCHEDULED.total, task="task_0") == 2
    assert telemetry.value(names.SCHEDULED.total, task="task_1") == 2
    assert telemetry.value(names.SCHEDULED.total, task="task_2") is None
    assert telemetry.value(names.SCHEDULED.total, task=traced_tasks.OVERFLOW) == 4
    assert len([record for record in caplog.records if "task names" in record.getMessage()]) == 1
    assert sorted({span.name for span in telemetry.task_spans()}) == [f"BackgroundTask task_{i}" for i in range(4)]


def test_exception_labels_are_capped(telemetry: Telemetry, caplog: pytest.LogCaptureFixture) -> None:
    """Past 100 exception classes, further classes count under the overflow label with one warning, so classes
    made at run time cannot grow the series."""
    from traced_tasks._labels import MAX_EXCEPTION_TYPES

    kinds = [type(f"Error{index}", (Exception,), {}) for index in range(MAX_EXCEPTION_TYPES + 5)]

    def raise_(kind: type[Exception]) -> None:
        raise kind()

    async def main() -> None:
        for kind in kinds:
            with pytest.raises(kind):
                await BackgroundTask(raise_, kind)()

    with caplog.at_level(logging.WARNING, logger="traced_tasks"):
        asyncio.run(main())
    task = PREFIX + "test_exception_labels_are_capped.<locals>.raise_"
    assert telemetry.value(names.EXCEPTIONS.total, task=task, exception="Error0") == 1
    assert telemetry.value(names.EXCEPTIONS.total, task=task, exception=f"Error{MAX_EXCEPTION_TYPES}") is None
    assert telemetry.value(names.EXCEPTIONS.total, task=task, exception=traced_tasks.OVERFLOW) == 5
    assert len([record for record in caplog.records if "exception classes" in record.getMessage()]) == 1
    labels = {
        sample.labels["exception"]
        for metric in telemetry.registry.collect()
        for sample in metric.samples
        if sample.name == names.EXCEPTIONS.total and sample.labels["task"] == task
    }
    assert len(labels) == MAX_EXCEPTION_TYPES + 1


def test_exception_message_is_never_a_label(telemetry: Telemetry) -> None:
    """The exposition holds the exception class but not its message, which may hold personal data."""
    from prometheus_client import generate_latest

    run((fail, ()))
    text = generate_latest(telemetry.registry).decode()
    assert 'exception="KeyError"' in text
    assert "secret-customer-id" not in text


def test_namespace_and_buckets(telemetry: Telemetry) -> None:
    """A namespace prefixes every family, and custom buckets replace the defaults."""
    registry = CollectorRegistry()
    traced_tasks.configure(registry=registry, namespace="shop", buckets=[0.5, 90])
    run((ok, ()))
    task = NAME + "ok"
    assert registry.get_sample_value("shop_" + names.SCHEDULED.total, {"task": task}) == 1
    labels = {"task": task, "status": "success"}
    assert registry.get_sample_value("shop_" + names.DURATION.bucket, {**labels, "le": "90.0"}) == 1
    assert registry.get_sample_value("shop_" + names.DURATION.bucket, {**labels, "le": "10.0"}) is None
    assert registry.get_sample_value(names.SCHEDULED.total, {"task": task}) is None


def test_default_buckets_reach_an_hour(telemetry: Telemetry) -> None:
    """Both histograms expose exactly the default buckets, which are the Metrics page's: 5 ms to an hour, since
    background work outlasts the client's 10 s default."""
    run((ok, ()))
    exposed: dict[str, list[str]] = collections.defaultdict(list)  # bucket bounds per histogram, in order
    for metric in telemetry.registry.collect():
        for sample in metric.samples:
            if sample.name.endswith("_bucket") and sample.labels.get("status", "success") == "success":
                exposed[sample.name].append(sample.labels["le"])
    bounds = [str(bound) for bound in traced_tasks.DEFAULT_BUCKETS] + ["+Inf"]
    assert exposed[names.WAIT.bucket] == bounds
    assert exposed[names.DURATION.bucket] == bounds
    documented = METRICS_PAGE.split("go\nfrom 5 ms to an hour: `", 1)[1].split("`", 1)[0]
    assert tuple(float(bound) for bound in documented.replace("\n", " ").split(",")) == traced_tasks.DEFAULT_BUCKETS
    assert (traced_tasks.DEFAULT_BUCKETS[0], traced_tasks.DEFAULT_BUCKETS[-1]) == (0.005, 3600)


def test_reconfigure_on_same_registry_unregisters_previous(telemetry: Telemetry) -> None:
    """Configuring twice with one registry replaces the metric families instead of failing on duplicates."""
    traced_tasks.configure(registry=telemetry.registry)
    traced_tasks.configure(registry=telemetry.registry)
    run((ok, ()))
    assert telemetry.value(names.SCHEDULED.total, task=NAME + "ok") == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"namespace": "my-app"}, "namespace"),
        ({"namespace": "a:b"}, "namespace"),
        ({"buckets": [5, 1]}, "buckets"),
        ({"buckets": []}, "buckets"),
        ({"buckets": [-1, 1]}, "buckets"),
        ({"max_task_names": 0}, "max_task_names"),
        ({"max_task_names": True}, "max_task_names"),
        ({"registry": object()}, "registry"),
        ({"buckets": "1,5,10"}, "buckets"),
        ({"buckets": [1, "5"]}, "buckets"),
        ({"tracer_provider": TracerProvider}, "tracer_provider"),
        ({"tracer_provider": "jaeger"}, "tracer_provider"),
        ({"isolate_tasks": "false"}, "isolate_tasks"),
        ({"route_label": "no"}, "route_label"),
        ({"use_span_links": "0"}, "use_span_links"),
        ({"use_span_links": 1}, "use_span_links"),
    ],
)
def test_bad_configuration_fails_clearly(telemetry: Telemetry, options: dict[str, Any], message: str) -> None:
    """Each bad option fails at configure() with a message naming it, before anything changes: the metrics in force
    are exactly as they were, and the configuration in force keeps counting."""
    run((ok, ()))
    before = sorted(map(str, (sample for metric in telemetry.registry.collect() for sample in metric.samples)))
    with pytest.raises((ValueError, TypeError), match=message):
        traced_tasks.configure(**options)
    after = sorted(map(str, (sample for metric in telemetry.registry.collect() for sample in metric.samples)))
    assert after == before
    run((ok, ()))
    assert telemetry.value(names.SCHEDULED.total, task=NAME + "ok") == 2
    traced_tasks.configure(tracer_provider=telemetry.provider, registry=telemetry.registry)  # a good call after it
    run((ok, ()))
    assert telemetry.value(names.SCHEDULED.total, task=NAME + "ok") == 1


class ProviderThatFails(trace.TracerProvider):
    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        raise RuntimeError("no tracer today")


def test_a_failing_configuration_changes_nothing(telemetry: Telemetry) -> None:
    """A configuration that passes validation but fails while it is built (here its tracer provider raises) leaves the
    configuration in force and its metrics in the registry, so later configure() calls work."""
    run((ok, ()))
    with pytest.raises(RuntimeError, match="no tracer today"):
        traced_tasks.configure(tracer_provider=ProviderThatFails(), registry=telemetry.registry)
    run((ok, ()))
    assert telemetry.value(names.SCHEDULED.total, task=NAME + "ok") == 2
    traced_tasks.configure(tracer_provider=telemetry.provider, registry=telemetry.registry)
    run((ok, ()))
    assert telemetry.value(names.SCHEDULED.total, task=NAME + "ok") == 1


def test_unknown_option_is_rejected(telemetry: Telemetry) -> None:
    """A misspelt option raises TypeError at configure(), naming it and the options there are, and changes nothing."""
    with pytest.raises(TypeError, match=r"unknown option 'namespce'.*namespace") as raised:
        traced_tasks.configure(namespce="shop")  # type: ignore[call-arg]
    assert "tracer_provider" in str(raised.value)
    run((ok, ()))
    assert telemetry.value(names.SCHEDULED.total, task=NAME + "ok") == 1


def test_non_callable_fails_at_add_task(telemetry: Telemetry) -> None:
    """add_task with a non-callable raises TypeError naming the value at once, not after the response."""
    with pytest.raises(TypeError, match="'send_email'"):
        BackgroundTasks().add_task("send_email")  # type: ignore[arg-type]


class AsyncMailer:
    async def send(self) -> None:
        pass

    async def __call__(self) -> None:
        pass


async def async_ok() -> None:
    pass


def returns_a_coroutine() -> Any:
    return async_ok()


CALLABLES: dict[str, Callable[[], Any]] = {
    "async-function": async_ok,
    "async-bound-method": AsyncMailer().send,
    "async-callable-object": AsyncMailer(),
    "async-partial": functools.partial(async_ok),
    "sync-function": ok,
    "sync-bound-method": Mailer().send,
    "sync-callable-object": Mailer(),
    "sync-partial": functools.partial(ok),
    "sync-returning-a-coroutine": returns_a_coroutine,
    "builtin": print,
    "method-of-a-callable-object": types.MethodType(AsyncMailer(), object()),
}
if hasattr(inspect, "markcoroutinefunction"):  # Python 3.12+
    CALLABLES["marked-coroutine-function"] = inspect.markcoroutinefunction(lambda: async_ok())


@pytest.mark.parametrize("func", CALLABLES.values(), ids=CALLABLES.keys())
def test_is_async_is_starlettes_answer(func: Callable[[], Any]) -> None:
    """A task's is_async, which decides between awaiting it and the threadpool, is Starlette's is_async_callable's
    answer for every kind of callable, although traced_tasks reads async functions' code flags first."""
    assert traced_tasks.BackgroundTask(func).is_async is is_async_callable(func)


def test_a_sync_task_waiting_for_a_thread_is_waiting_not_running(telemetry: Telemetry) -> None:
    """With the threadpool full, a sync task's run starts when a thread starts it: the time before is wait, and its
    span starts only then. A task cancelled while it waits is `cancelled`, and its function never runs."""
    release = threading.Event()
    ran: list[str] = []
    prefix = PREFIX + "test_a_sync_task_waiting_for_a_thread_is_waiting_not_running.<locals>."

    def hold() -> None:
        release.wait(30)

    def quick() -> None:
        ran.append("quick")

    def never() -> None:
        ran.append("never")

    async def main() -> float:
        anyio.to_thread.current_default_thread_limiter().total_tokens = 1  # this loop's threadpool: one thread
        holding, waiting, cancelled = BackgroundTasks(), BackgroundTasks(), BackgroundTasks()
        holding.add_task(hold)
        async with anyio.create_task_group() as group:
            group.start_soon(holding)
            while telemetry.value(names.IN_PROGRESS.name, task=prefix + "hold") != 1:
                await anyio.sleep(0.001)
            waiting.add_task(quick)
            scheduled = time.time_ns()
            group.start_soon(waiting)
            cancelled.add_task(never)
            with anyio.move_on_after(0.05), contextlib.suppress(BaseException):
                await cancelled()
            await anyio.sleep(0.2)
            release.set()
        return scheduled

    scheduled = asyncio.run(main())
    spans = {span.name.rsplit(".", 1)[1]: span for span in telemetry.task_spans()}
    held_until = spans["hold"].end_time or 0
    assert (spans["quick"].start_time or 0) >= held_until  # not before a thread was free
    wait = telemetry.value(names.WAIT.sum, task=prefix + "quick")
    assert wait is not None
    assert wait >= (held_until - scheduled) / 1e9
    assert ran == ["quick"]
    assert telemetry.value(names.DURATION.count, task=prefix + "never", status="cancelled") == 1
    never_ran = telemetry.value(names.DURATION.sum, task=prefix + "never", status="cancelled")
    never_waited = telemetry.value(names.WAIT.sum, task=prefix + "never")
    assert never_ran is not None
    assert never_waited is not None
    assert never_ran < never_waited  # cancelled at once where it stood: waiting
    assert (spans["never"].attributes or {})["background_task.status"] == "cancelled"


def test_any_callable_gets_a_name_and_is_traced(telemetry: Telemetry) -> None:
    """A mock as a task (AsyncMock answers every attribute, and its __code__ is not a function's) is traced and
    counted under its class's name, like any callable object."""
    from unittest.mock import AsyncMock, MagicMock

    sent, logged = AsyncMock(), MagicMock()
    run((sent, ("receipt",)), (logged, ()))
    sent.assert_awaited_once_with("receipt")
    logged.assert_called_once_with()
    for name in ("unittest.mock.AsyncMock", "unittest.mock.MagicMock"):
        assert telemetry.value(names.DURATION.count, task=name, status="success") == 1
    assert sorted(span.name for span in telemetry.task_spans()) == [
        "BackgroundTask unittest.mock.AsyncMock",
        "BackgroundTask unittest.mock.MagicMock",
    ]


def hold(release: threading.Event) -> None:
    release.wait(10)


def test_one_task_object_run_twice_at_once_keeps_both_runs(telemetry: Telemetry) -> None:
    """A BackgroundTask object attached to two responses whose tasks run at the same time gives two runs, each with
    a span and counts of its own, neither overwriting the other's state; its schedule counts once, as the README
    says of a reused object."""
    release = threading.Event()
    task = BackgroundTask(hold, release)
    name = PREFIX + "hold"

    async def main() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(task)
            group.start_soon(task)
            with anyio.fail_after(10):
                while telemetry.value(names.IN_PROGRESS.name, task=name) != 2:
                    await anyio.sleep(0.001)
            release.set()

    asyncio.run(main())
    assert telemetry.value(names.SCHEDULED.total, task=name) == 1
    assert telemetry.value(names.DURATION.count, task=name, status="success") == 2
    assert telemetry.value(names.IN_PROGRESS.name, task=name) == 0
    spans = telemetry.task_spans()
    assert len(spans) == 2
    assert spans[0].context.span_id != spans[1].context.span_id


class SlowEnd(SpanProcessor):
    """A span processor whose on_end waits, as a synchronous exporter does, until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def on_end(self, span: ReadableSpan) -> None:
        self.entered.set()
        self.release.wait(10)


def test_a_run_counts_as_running_until_it_counts_as_finished(telemetry: Telemetry) -> None:
    """While a run's span ends (an exporter can take its time there), a scrape sees the run in progress: never in
    neither running nor finished, which would break the counts that add up."""
    processor = SlowEnd()
    provider = TracerProvider()
    provider.add_span_processor(processor)
    traced_tasks.configure(tracer_provider=provider, registry=telemetry.registry)
    runner = threading.Thread(target=lambda: asyncio.run(BackgroundTask(ok)()))
    runner.start()
    try:
        assert processor.entered.wait(10)
        assert telemetry.value(names.IN_PROGRESS.name, task=NAME + "ok") == 1
        assert telemetry.value(names.DURATION.count, task=NAME + "ok", status="success") == 0
    finally:
        processor.release.set()
        runner.join(10)
    assert telemetry.value(names.IN_PROGRESS.name, task=NAME + "ok") == 0
    assert telemetry.value(names.DURATION.count, task=NAME + "ok", status="success") == 1


def test_declared_tasks_have_their_series_at_zero_before_traffic(telemetry: Telemetry) -> None:
    """declare() makes a task's series exist at 0 before its first schedule, so that its first failure or skip is an
    increase from 0; it refuses what is not callable."""

    def notify_partner() -> None:
        pass

    name = f"{__name__}.test_declared_tasks_have_their_series_at_zero_before_traffic.<locals>.notify_partner"
    assert telemetry.value(names.SCHEDULED.total, task=name) is None
    traced_tasks.declare(notify_partner)
    assert telemetry.value(names.SCHEDULED.total, task=name) == 0
    assert telemetry.value(names.SKIPPED.total, task=name) == 0
    assert telemetry.value(names.DURATION.count, task=name, status="error") == 0
    assert telemetry.value(names.EXCEPTIONS.total, task=name, exception="LookupError") is None  # no class known yet
    with pytest.raises(TypeError, match="declare"):
        traced_tasks.declare("notify_partner")  # type: ignore[arg-type]
