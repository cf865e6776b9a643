"""The task console: its data, its access rules, and its page in a real browser."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

import traced_tasks
from tests.conftest import Telemetry
from tests.support import Server, chromium, start_workers, wait_until
from traced_tasks import BackgroundTask, BackgroundTasks
from traced_tasks._activity import MAX_LISTED

TRACE_URL = "https://jaeger.example/trace/{trace_id}"
SECRET = "card 4111-1111-1111-1111 of jane@example.com"


class PaymentDeclined(Exception):
    pass


def charge(order: int) -> None:
    raise PaymentDeclined(f"{SECRET} declined for order {order}")


def send_receipt(order: int) -> None:
    pass


def added_later() -> None:
    pass


def shop(release: threading.Event, **console: Any) -> Starlette:
    def reconcile() -> None:
        release.wait(60)

    async def order(request: Request) -> Response:
        tasks = BackgroundTasks()
        tasks.add_task(charge, 7)
        tasks.add_task(send_receipt, 7)  # skipped behind the failure
        return PlainTextResponse("ok", background=tasks)

    async def receipt(request: Request) -> Response:
        tasks = BackgroundTasks()
        tasks.add_task(send_receipt, 8)
        return PlainTextResponse("ok", background=tasks)

    async def ledger(request: Request) -> Response:
        tasks = BackgroundTasks()
        tasks.add_task(reconcile)
        return PlainTextResponse("ok", background=tasks)

    async def later(request: Request) -> Response:
        tasks = BackgroundTasks()
        tasks.add_task(added_later)
        return PlainTextResponse("ok", background=tasks)

    return Starlette(
        routes=[
            Route("/orders/{order}", order, methods=["POST"]),
            Route("/receipts", receipt, methods=["POST"]),
            Route("/ledger", ledger, methods=["POST"]),
            Route("/later", later, methods=["POST"]),
            Mount("/tasks", traced_tasks.make_console_app(**console)),
        ]
    )


@pytest.fixture
def release() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()


def test_data_counts_running_and_failures(telemetry: Telemetry, release: threading.Event) -> None:
    """data.json has each task's counts and percentiles, the runs in progress with their age, and the failures with
    their exception class, trace ID and trace link; never an argument or an exception's message."""
    client = TestClient(shop(release, trace_url=TRACE_URL), raise_server_exceptions=False)
    client.post("/orders/7")
    client.post("/receipts")
    with client:  # the lifespan's event loop runs the ledger's task in the background while we read
        ledger = threading.Thread(target=client.post, args=("/ledger",))
        ledger.start()
        wait_until(lambda: client.get("/tasks/data.json").json()["running"])
        data = client.get("/tasks/data.json").json()
        release.set()
        ledger.join(timeout=30)
    tasks = {task["task"]: task for task in data["tasks"]}
    receipts = tasks[f"{__name__}.send_receipt"]
    assert (receipts["finished"], receipts["succeeded"], receipts["skipped"], receipts["failed"]) == (1, 1, 1, 0)
    assert receipts["scheduled"] == 2
    assert receipts["run_seconds"]["p50"] is not None
    charges = tasks[f"{__name__}.charge"]
    assert (charges["failed"], charges["error_ratio"]) == (1, 1.0)
    (failure,) = data["failures"]
    (span,) = [span for span in telemetry.task_spans() if span.name.endswith(".charge")]
    trace_id = format(span.context.trace_id, "032x")
    assert (failure["exception"], failure["count"]) == ("PaymentDeclined", 1)
    assert failure["traces"] == [{"trace_id": trace_id, "trace_url": TRACE_URL.replace("{trace_id}", trace_id)}]
    (running,) = data["running"]
    assert running["task"].endswith("shop.<locals>.reconcile")
    assert running["seconds"] >= 0
    assert not running["hung"]
    assert data["totals"]["running"] == 1
    assert "4111-1111" not in str(data)
    assert "declined" not in str(data)


def test_the_running_list_is_bounded_and_says_how_many_it_leaves_out(telemetry: Telemetry) -> None:
    """With more runs in progress than the console lists, data.json lists the oldest MAX_LISTED, counts every run in
    its task's row and the totals, and says how many it leaves out."""
    app = traced_tasks.make_console_app()

    async def main() -> dict[str, Any]:
        released = asyncio.Event()

        async def hold() -> None:
            await released.wait()

        runs = [asyncio.create_task(BackgroundTask(hold)()) for _ in range(MAX_LISTED + 50)]
        await asyncio.sleep(0.05)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://console") as client:
            data: dict[str, Any] = (await client.get("/data.json")).json()
        released.set()
        await asyncio.gather(*runs)
        return data

    data = asyncio.run(main())
    assert len(data["running"]) == MAX_LISTED
    starts = [run["started_at"] for run in data["running"]]
    assert starts == sorted(starts)
    assert data["running_not_listed"] == 50
    assert data["totals"]["running"] == MAX_LISTED + 50
    (task,) = data["tasks"]
    assert task["running"] == MAX_LISTED + 50


def test_the_overflow_row_is_flagged_hung_and_sorted_first(telemetry: Telemetry) -> None:
    """Past max_task_names, a hung run of a task counted as __overflow__ flags that row hung, and it sorts above a
    task that fails every time."""
    traced_tasks.configure(tracer_provider=telemetry.provider, registry=telemetry.registry, max_task_names=2)
    app = traced_tasks.make_console_app(hung_after=0.01)

    async def main() -> dict[str, Any]:
        released = asyncio.Event()

        async def first() -> None:
            pass

        async def second() -> None:
            raise PaymentDeclined()

        async def third() -> None:  # past the cap: __overflow__
            await released.wait()

        await BackgroundTask(first)()
        with contextlib.suppress(PaymentDeclined):
            await BackgroundTask(second)()
        hung = asyncio.create_task(BackgroundTask(third)())
        await asyncio.sleep(0.05)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://console") as client:
            data: dict[str, Any] = (await client.get("/data.json")).json()
        released.set()
        await hung
        return data

    data = asyncio.run(main())
    assert [(task["task"], task["hung"]) for task in data["tasks"]][:2] == [
        (traced_tasks.OVERFLOW, True),
        (f"{__name__}.test_the_overflow_row_is_flagged_hung_and_sorted_first.<locals>.main.<locals>.second", False),
    ]
    assert data["totals"]["hung"] == 1


def test_console_refuses_without_the_token_and_websockets(telemetry: Telemetry, release: threading.Event) -> None:
    """The console takes the same token as /metrics, read when serving, and refuses websockets."""
    client = TestClient(shop(release, bearer_token="s3cret"))
    assert client.get("/tasks/").status_code == 401
    assert client.get("/tasks/data.json").status_code == 401
    assert client.get("/tasks/data.json", headers={"authorization": "Bearer s3cret"}).status_code == 200
    page = client.get("/tasks/", headers={"authorization": "Bearer s3cret"})
    assert page.status_code == 200
    assert page.headers["content-security-policy"].startswith("default-src 'none'")
    assert client.get("/tasks/nothing", headers={"authorization": "Bearer s3cret"}).status_code == 404


@pytest.mark.parametrize(
    "options",
    [
        {"trace_url": "jaeger/{trace_id}"},
        {"trace_url": "http://jaeger/trace"},
        {"hung_after": 0},
        {"hung_after": True},
        {"hung_after": float("inf")},
    ],
)
def test_bad_console_options_fail_at_once(options: dict[str, Any]) -> None:
    """A trace_url that is not an http(s) template with {trace_id}, or a hung_after that is not a positive number,
    fails when the app is made, naming the option."""
    with pytest.raises(ValueError, match=next(iter(options))):
        traced_tasks.make_console_app(**options)


@pytest.mark.integration
def test_the_page_in_a_browser(
    telemetry: Telemetry, serve: type[Server], release: threading.Event, tmp_path: Path
) -> None:
    """In headless Chromium, through real uvicorn: the tasks, a failure by class name with a link to its trace, a run
    in progress marked hung, a task scheduled after the page loaded appearing without a reload, no exception message
    anywhere on the page, and no error in the browser's console (the page's own Content-Security-Policy included)."""
    server = serve(shop(release, trace_url=TRACE_URL, hung_after=1))
    httpx.post(server.url + "/orders/7")
    httpx.post(server.url + "/receipts")
    httpx.post(server.url + "/ledger", timeout=30)
    driver = chromium(tmp_path / "chromium")
    try:
        driver.get(server.url + "/tasks/")
        driver.execute_script("window.loadedOnce = true")  # gone if the page reloads

        def text() -> str:
            return str(driver.execute_script("return document.body.innerText"))

        wait_until(lambda: "PaymentDeclined" in text() and f"{__name__}.send_receipt" in text(), timeout=30)
        wait_until(lambda: "hung" in text(), timeout=30)  # the ledger has run for more than a second
        (span,) = [span for span in telemetry.task_spans() if span.name.endswith(".charge")]
        trace_id = format(span.context.trace_id, "032x")
        links = driver.execute_script("return [...document.querySelectorAll('#failures a')].map(a => a.href)")
        assert links == [TRACE_URL.replace("{trace_id}", trace_id)]
        rows = driver.execute_script("return [...document.querySelectorAll('#running tbody tr')].map(r => r.className)")
        assert rows == ["hung"]
        assert f"{__name__}.added_later" not in text()
        httpx.post(server.url + "/later")
        wait_until(lambda: f"{__name__}.added_later" in text(), timeout=30)
        assert driver.execute_script("return window.loadedOnce") is True
        page = str(driver.page_source) + text()
        assert "4111-1111" not in page
        assert "declined" not in page
        driver.save_screenshot(str(tmp_path / "console.png"))
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == []
    finally:
        driver.quit()


@pytest.mark.integration
def test_every_worker_shows_the_runs_and_failures_of_all(tmp_path: Path) -> None:
    """Under uvicorn --workers 2 in multiprocess mode, with a hung run in one worker and failures in both,
    data.json from either worker shows them all: the hung run with its worker's pid and its task flagged hung, every
    failure, and the counts of both workers."""
    with start_workers(tmp_path) as url:
        with httpx.Client() as client:
            hung = client.post(url + "/long").json()["pid"]
        charged: list[int] = []
        for order in range(1000):  # a connection each, until both workers had a failure
            with httpx.Client() as client:
                charged.append(client.post(f"{url}/charges/{order}").json()["pid"])
            if len(set(charged)) == 2:
                break
        assert len(set(charged)) == 2, "requests never reached the second worker"
        assert len(charged) < 50  # all of them fit in the list of failures
        answered: dict[int, dict[str, Any]] = {}

        def both_answered_with_everything() -> bool:
            with httpx.Client() as client:
                data = client.get(url + "/tasks/data.json").json()
            by_task = {task["task"]: task for task in data["tasks"]}
            failed = sum(group["count"] for group in data["failures"])
            if failed == len(charged) and by_task["tests.apps.workers.long_job"]["hung"]:
                answered[data["pid"]] = data
            return len(answered) == 2

        try:
            wait_until(both_answered_with_everything, timeout=60)
        finally:
            os.kill(hung, signal.SIGKILL)  # the graceful shutdown would wait for its run
        for data in answered.values():
            assert data["processes"] == 2
            assert [(run["task"], run["pid"], run["hung"]) for run in data["running"]] == [
                ("tests.apps.workers.long_job", hung, True)
            ]
            assert {(run["task"], run["exception"]) for run in data["failures"]} == {
                ("tests.apps.workers.charge", "Declined")
            }
            by_task = {task["task"]: task for task in data["tasks"]}
            assert by_task["tests.apps.workers.long_job"]["running"] == 1
            assert by_task["tests.apps.workers.charge"]["failed"] == len(charged)
            assert data["totals"]["hung"] == 1


@pytest.mark.integration
def test_a_scrape_never_waits_behind_the_console(
    telemetry: Telemetry, serve: type[Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through real uvicorn, while five requests for data.json wait on a console render that does not end (tabs
    left open through an incident), /metrics answers at once from threads of its own; and the five requests cost
    two renders, not five."""
    from traced_tasks._web import console, report

    entered = threading.Event()
    finish = threading.Event()
    renders: list[float] = []
    render = report.report

    def slow(*args: Any) -> dict[str, Any]:
        renders.append(time.monotonic())
        entered.set()
        finish.wait(60)
        return render(*args)

    monkeypatch.setattr(console, "report", slow)
    app = Starlette(
        routes=[
            Mount("/metrics", traced_tasks.make_metrics_app(telemetry.registry)),
            Mount("/tasks", traced_tasks.make_console_app()),
        ]
    )
    server = serve(app)
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        tabs = [pool.submit(httpx.get, server.url + "/tasks/data.json", timeout=90) for _ in range(5)]
        try:
            assert entered.wait(30)
            for _ in range(3):
                assert httpx.get(server.url + "/metrics/", timeout=10).status_code == 200
            assert not any(tab.done() for tab in tabs)
        finally:
            finish.set()
        assert [tab.result().status_code for tab in tabs] == [200] * 5
    assert len(renders) == 2


def test_failures_are_grouped_by_task_and_exception(telemetry: Telemetry) -> None:
    """A burst of one failure is one row: five runs failing with the same exception are one group, counted five
    times, with its first and last time and the trace IDs of the last three; another exception is another group."""
    app = traced_tasks.make_console_app()

    async def main() -> dict[str, Any]:
        for order in range(5):
            with contextlib.suppress(PaymentDeclined):
                await BackgroundTask(charge, order)()
        with contextlib.suppress(KeyError):
            await BackgroundTask(lookup)()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://console") as client:
            data: dict[str, Any] = (await client.get("/data.json")).json()
        return data

    data = asyncio.run(main())
    groups = {(group["task"], group["exception"]): group for group in data["failures"]}
    assert set(groups) == {(f"{__name__}.charge", "PaymentDeclined"), (f"{__name__}.lookup", "KeyError")}
    declined = groups[(f"{__name__}.charge", "PaymentDeclined")]
    spans = sorted(
        (span for span in telemetry.task_spans() if span.name.endswith(".charge")), key=lambda s: s.end_time or 0
    )
    assert declined["count"] == 5
    assert [trace["trace_id"] for trace in declined["traces"]] == [
        format(s.context.trace_id, "032x") for s in spans[-3:]
    ]
    assert declined["first_at"] <= declined["last_at"]
    assert data["failures"][0]["task"] == f"{__name__}.lookup"  # the latest first


def lookup() -> None:
    raise KeyError("card 4111")


def test_a_hung_run_shows_where_it_waits(telemetry: Telemetry) -> None:
    """For a run in progress longer than hung_after, data.json?stacks=1 says where it waits, as code locations only,
    innermost last: an async run's await chain down to the line it awaits on, a sync run's thread's frames; never a
    local or an argument. Without stacks=1, nothing is computed."""
    app = traced_tasks.make_console_app(hung_after=0.01)
    released = threading.Event()

    async def wait_for_the_ledger(secret: str) -> None:
        await asyncio.get_running_loop().run_in_executor(None, released.wait, 30)

    async def reconcile_ledger(secret: str) -> None:
        await wait_for_the_ledger(secret)

    def reconcile_stock(secret: str) -> None:
        released.wait(30)

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        runs = [
            asyncio.create_task(BackgroundTask(reconcile_ledger, SECRET)()),
            asyncio.create_task(BackgroundTask(reconcile_stock, SECRET)()),
        ]
        await asyncio.sleep(0.1)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://console") as client:
            plain: dict[str, Any] = (await client.get("/data.json")).json()
            stacks: dict[str, Any] = (await client.get("/data.json?stacks=1")).json()
        released.set()
        await asyncio.gather(*runs)
        return plain, stacks

    plain, stacks = asyncio.run(main())
    assert [run["where"] for run in plain["running"]] == [None, None]
    where = {run["task"].rsplit(".", 1)[-1]: run["where"] for run in stacks["running"]}
    ledger, stock = where["reconcile_ledger"], where["reconcile_stock"]
    assert re.fullmatch(r"tests/test_console\.py:\d+ in .*reconcile_ledger", ledger[-2]), ledger
    assert re.fullmatch(r"tests/test_console\.py:\d+ in .*wait_for_the_ledger", ledger[-1]), ledger
    assert any(re.fullmatch(r"tests/test_console\.py:\d+ in .*reconcile_stock", frame) for frame in stock), stock
    assert re.fullmatch(r".*threading\.py:\d+ in .*wait", stock[-1]), stock
    assert "4111-1111" not in str(stacks)  # not "4111" alone: a timestamp may hold those digits
    assert "jane@example.com" not in str(stacks)


def test_the_metrics_ports_console_says_where_a_hung_run_waits(
    telemetry: Telemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The console an engine's worker serves on its metrics port, a WSGI app beside prometheus_client's, reads the
    query as the ASGI console does: data.json?stacks=1 says where a hung run waits; data.json alone does not."""
    from traced_tasks._web import server

    monkeypatch.setenv("TRACED_TASKS_HUNG_AFTER", "0.01")
    released = threading.Event()

    def reconcile_stock(secret: str) -> None:
        released.wait(30)

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        run = asyncio.create_task(BackgroundTask(reconcile_stock, SECRET)())
        await asyncio.sleep(0.1)
        with httpx.Client(transport=httpx.WSGITransport(app=server.wsgi_app()), base_url="http://worker") as client:
            plain: dict[str, Any] = client.get("/tasks/data.json").json()
            stacks: dict[str, Any] = client.get("/tasks/data.json?stacks=1").json()
        released.set()
        await run
        return plain, stacks

    plain, stacks = asyncio.run(main())
    assert [(run["hung"], run["where"]) for run in plain["running"]] == [(True, None)]
    (where,) = [run["where"] for run in stacks["running"]]
    assert any(re.fullmatch(r"tests/test_console\.py:\d+ in .*reconcile_stock", frame) for frame in where), where


def test_a_handed_off_tasks_row_links_to_its_engines_console(
    telemetry: Telemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task this process hands over to an engine links, in its row, to the console of that engine's workers, given
    to make_console_app() or by TRACED_TASKS_CONSOLE_URLS; a value that is not one fails at once."""
    from celery import Celery

    import traced_tasks.celery

    celery_app = Celery("linked", broker="memory://", set_as_current=False)
    traced_tasks.celery.instrument(celery_app)

    @celery_app.task(name="linked.receipt")
    def receipt(order: int) -> None:
        pass

    BackgroundTask(receipt, 1)  # scheduled, handed over when run
    given = traced_tasks.make_console_app(engine_consoles={"celery": "http://worker:9100/tasks/"})
    monkeypatch.setenv("TRACED_TASKS_CONSOLE_URLS", "celery=https://celery.internal/tasks/")
    from_environment = traced_tasks.make_console_app()
    for app, url in ((given, "http://worker:9100/tasks/"), (from_environment, "https://celery.internal/tasks/")):
        data = TestClient(app).get("/data.json").json()
        (row,) = [task for task in data["tasks"] if task["task"].endswith(".receipt")]
        assert (row["runs_on"], row["console_url"]) == ("celery", url)
    with pytest.raises(ValueError, match="engine_consoles"):
        traced_tasks.make_console_app(engine_consoles={"celery": "worker:9100"})


@pytest.mark.integration
def test_every_live_process_counts_before_it_runs_a_task(tmp_path: Path) -> None:
    """Under uvicorn --workers 2 in multiprocess mode, before any task ran, the console counts both worker processes,
    not only those that wrote a metric."""
    with start_workers(tmp_path) as url:
        # Both processes up: each imported the app, and traced_tasks with it (a process that has yet to is none).
        log = tmp_path / "uvicorn.log"
        wait_until(lambda: log.read_text().count("Application startup complete") == 2)
        for _ in range(20):  # either process may answer: both say 2
            with httpx.Client() as client:
                assert client.get(url + "/tasks/data.json").json()["processes"] == 2


@pytest.mark.integration
def test_one_answer_tells_one_story(tmp_path: Path) -> None:
    """Under uvicorn --workers 2, from the moment a long run starts: every data.json answer's running count, list,
    oldest age and hung count come from the same snapshot, so they never contradict one another (a count of 1 beside
    an empty list, or an oldest age with nothing running)."""
    with start_workers(tmp_path) as url:
        with httpx.Client() as client:
            pid = client.post(url + "/long").json()["pid"]
        answers = []
        for _ in range(40):  # a connection each: either process answers
            with httpx.Client() as client:
                answers.append(client.get(url + "/tasks/data.json").json())
        os.kill(pid, signal.SIGKILL)
    for data in answers:
        running, totals = data["running"], data["totals"]
        assert totals["running"] == len(running) + data["running_not_listed"], data
        assert (totals["oldest_running_seconds"] is None) == (not running), data
        assert totals["hung"] == len({run["task"] for run in running if run["hung"]}), data
        by_task = {task["task"]: task["running"] for task in data["tasks"]}
        assert sum(by_task.values()) == totals["running"], data
