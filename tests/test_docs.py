"""The documentation site: its tables are the code's, its examples run, its links hold, and each alert's runbook_url
opens its page."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from tests.dashboards import rules
from tests.support import ROOT, run_python
from traced_tasks._backends.opentelemetry import attribute_set_limit

DOCS = ROOT / "docs"
PAGES = sorted(path for path in DOCS.rglob("*.md") if "snippets" not in path.parts)
SITE_URL = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["site_url"]
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)  # ```python title="app.py" too
INCLUDE = re.compile(r'--8<-- "([^":]+)(?::[\w-]+)?"')


def test_the_reference_tables_are_the_codes() -> None:
    """The tables the pages include (metrics, instruments, options, environment variables, alerts) are what
    docs/generate.py writes from the code and the rules now: run it after changing any of them."""
    sys.path.insert(0, str(DOCS))
    try:
        import generate  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(DOCS))
    stale = [path.name for path, text in generate.tables().items() if path.read_text() != text]
    assert stale == [], "run python docs/generate.py"


def test_every_python_block_is_an_example_the_tests_run() -> None:
    """Every Python block on the site includes a file of docs/examples/ (or examples/), whole or a section: no
    example is written where no test runs it. And every example file is used by a page."""
    included: set[Path] = set()
    for page in PAGES:
        for language, body in FENCE.findall(page.read_text()):
            if language != "python":
                continue
            match = INCLUDE.fullmatch(body.strip())
            assert match, f"{page.relative_to(ROOT)} has a Python block that is not an example file:\n{body}"
            found = [base / match.group(1) for base in (DOCS, ROOT) if (base / match.group(1)).is_file()]
            assert found, f"{page.relative_to(ROOT)} includes {match.group(1)}, which does not exist"
            included.add(found[0])
    examples = {path for path in (DOCS / "examples").glob("*.py") if path.name != "__init__.py"}
    assert sorted(path.name for path in examples - included) == []


def test_the_readmes_examples_are_the_sites() -> None:
    """The README's Python blocks are, to the letter, the `readme` sections of example files the tests run."""
    readme = (ROOT / "README.md").read_text()
    blocks = [body for language, body in FENCE.findall(readme) if language == "python"]
    sections = [
        re.search(r"# --8<-- \[start:readme\]\n(.*?)# --8<-- \[end:readme\]", path.read_text(), re.DOTALL)
        for path in (DOCS / "examples" / "fastapi_app.py", DOCS / "examples" / "starlette_app.py")
    ]
    assert blocks == [section.group(1).rstrip() + "\n" for section in sections if section]


def test_the_readme_is_short_and_its_links_hold() -> None:
    """The README is a short front page (about 150 lines), and every link of it into the repository points at a
    file that exists."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 160
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if not link.startswith(("http://", "https://", "mailto:"))]
    assert local
    assert [link for link in local if not (ROOT / link).exists()] == []


# What each example does when it runs, checked in a process of its own: examples configure traced_tasks, set global
# providers, and import the engines.
RUNS = {
    "fastapi_app": """
from fastapi.testclient import TestClient
from docs.examples.fastapi_app import app
from traced_tasks.testing import capture_tasks
client = TestClient(app)
with capture_tasks() as runs:
    client.post("/orders/7")
print([(run.task, run.status) for run in runs], client.get("/metrics/").status_code, client.get("/tasks/").status_code)
""",
    "response_task": """
from fastapi.testclient import TestClient
from docs.examples.response_task import app
from traced_tasks.testing import capture_tasks
with capture_tasks() as runs:
    TestClient(app).post("/orders/7/resend")
print([(run.task, run.status) for run in runs])
""",
    "trace_context": """
from starlette.routing import Route
from starlette.responses import PlainTextResponse
from starlette.testclient import TestClient
from docs.examples.trace_context import app
from traced_tasks import BackgroundTask
from traced_tasks.testing import capture_tasks
def audit(): pass
async def endpoint(request):
    return PlainTextResponse("ok", background=BackgroundTask(audit))
app.router.routes.append(Route("/", endpoint))
with capture_tasks() as runs:
    TestClient(app).get("/", headers={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})
print([run.trace_id for run in runs])
""",
    "starlette_app": """
from starlette.testclient import TestClient
from docs.examples.starlette_app import app
from traced_tasks.testing import capture_tasks
with capture_tasks() as runs:
    TestClient(app).post("/signup")
print([(run.task, run.status) for run in runs], TestClient(app).get("/metrics/").status_code)
""",
    "console_app": """
from fastapi.testclient import TestClient
from docs.examples.console_app import app
print(TestClient(app).get("/tasks/data.json").json()["totals"]["finished"])
""",
    "backlog_queues": """
import docs.examples.backlog_queues
from traced_tasks import _queues, _sampled
watched = [source for source in _sampled._sources if isinstance(source, _queues.Watcher)]
print([watcher.reader.queues() for watcher in watched if watcher.reader.engine == "celery"])
""",
    "configure": """
import docs.examples.configure
from traced_tasks import _config
print(_config.current().options.namespace, _config.current().options.max_task_names)
""",
    "declare": """
import docs.examples.declare as example
from prometheus_client import REGISTRY
print(REGISTRY.get_sample_value("shop_background_task_scheduled_total", {"task": "docs.examples.declare.send_receipt"}))
""",
    "opentelemetry_metrics": """
import asyncio
import docs.examples.opentelemetry_metrics as example
import traced_tasks
def ok(): pass
asyncio.run(traced_tasks.BackgroundTask(ok)())
data = example.reader.get_metrics_data()
print(sorted({m.name for r in data.resource_metrics for s in r.scope_metrics for m in s.metrics})[:2])
""",
    "cardinality_view": """
import docs.examples.cardinality_view as example
from traced_tasks import _config
print(_config.current().backend.series_limit())
""",
    "setup_tracing": """
import docs.examples.setup_tracing
from opentelemetry import trace
print(type(trace.get_tracer_provider()).__name__)
""",
    "tracing_lifespan": """
from fastapi.testclient import TestClient
from docs.examples.tracing_lifespan import app
with TestClient(app) as client:
    pass
print("flushed")
""",
    "instrumentor": """
import docs.examples.instrumentor
from starlette import background
import traced_tasks._tasks
print(background.BackgroundTasks.__call__ is traced_tasks._tasks.run_batch)
""",
    "test_signup": """
from docs.examples.test_signup import test_a_declined_card_is_recorded
test_a_declined_card_is_recorded()
print("passed")
""",
    "celery_web": """
from celery.contrib.testing.worker import start_worker
from fastapi.testclient import TestClient
from docs.tutorials.celery.shop.tasks import celery_app
from docs.tutorials.celery.shop.web import app
from traced_tasks.testing import capture_tasks
import time
with start_worker(celery_app, pool="solo", perform_ping_check=False), capture_tasks() as runs:
    TestClient(app).post("/orders/7")
    deadline = time.monotonic() + 30
    while not runs and time.monotonic() < deadline:
        time.sleep(0.05)
print([(run.task, run.status) for run in runs])
""",
    "taskiq_web": """
from fastapi.testclient import TestClient
from docs.tutorials.taskiq.shop.web import app
from traced_tasks.testing import capture_tasks
with capture_tasks() as runs, TestClient(app) as client:
    client.post("/orders/7")
print([(run.task, run.status) for run in runs])
""",
}
EXPECTED = {
    "fastapi_app": "[('docs.examples.fastapi_app.send_receipt', 'success')] 200 200",
    "response_task": "[('docs.examples.response_task.send_receipt', 'success')]",
    "starlette_app": "[('docs.examples.starlette_app.send_welcome_email', 'success')] 200",
    "trace_context": "['4bf92f3577b34da6a3ce929d0e0e4736']",
    "console_app": "0",
    "backlog_queues": "[['celery', 'invoices', 'reports']]",
    "configure": "shop 200",
    "declare": "0.0",
    "opentelemetry_metrics": "['background_task.duration', 'background_task.in_progress']",
    "cardinality_view": "3332",
    "setup_tracing": "TracerProvider",
    "tracing_lifespan": "flushed",
    "instrumentor": "False",
    "test_signup": "passed",
    "celery_web": "[('docs.tutorials.celery.shop.tasks.send_receipt', 'success')]",
    "taskiq_web": "[('docs.tutorials.taskiq.shop.tasks.send_receipt', 'success')]",
}


@pytest.mark.parametrize("example", sorted(RUNS))
def test_each_example_runs(example: str) -> None:
    """Each example file runs as its page shows it, and does what the page says: its tasks run and are counted,
    its configuration is in force, its worker runs what the web process hands over."""
    reader = InMemoryMetricReader()
    if example == "cardinality_view" and attribute_set_limit(MeterProvider(metric_readers=[reader]), "") is None:
        pytest.skip("this OpenTelemetry SDK has no limit of attribute sets (1.45 brought it)")
    result = run_python(RUNS[example], REDIS_URL="memory://", OTEL_TRACES_EXPORTER="none")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == EXPECTED[example], result.stdout + result.stderr


def test_every_example_is_run() -> None:
    """No example file is left out of the runs above. (The engine pages' files, under docs/tutorials/, run as
    celery_web and taskiq_web, and as their pages show them in tests/test_tutorials.py.)"""
    examples = {path.stem for path in (DOCS / "examples").glob("*.py") if path.name != "__init__.py"}
    assert sorted(examples - set(RUNS)) == []


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built with mkdocs build --strict: a broken link or anchor fails it."""
    pytest.importorskip("mkdocs", reason="the site is built where the documentation tools are installed: make lint")
    folder = tmp_path_factory.mktemp("site")
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    assert mkdocs is not None
    result = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(folder)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": str(Path(sys.executable).parent)},
    )
    assert result.returncode == 0, result.stderr
    return folder


@pytest.mark.integration  # the site's tools are checked on the default Python, as make lint builds it
def test_each_alerts_runbook_url_opens_its_page(site: Path) -> None:
    """Every alert's runbook_url is a page of the built site, headed by the alert's name, and the page follows the
    runbooks' order: identify, mitigate, diagnose, verify, escalate."""
    alerts = [rule for rule in rules() if "alert" in rule]
    assert len(alerts) == 14
    for rule in alerts:
        url = rule["annotations"]["runbook_url"]
        assert url.startswith(SITE_URL), url
        parts = urlsplit(url)
        page = site / parts.path.removeprefix(urlsplit(SITE_URL).path) / "index.html"
        assert page.is_file(), url
        html = page.read_text()
        assert re.search(rf"<h1[^>]*>{rule['alert']}", html), url
        steps = re.findall(r'<h2 id="([a-z]+)"', html)
        assert steps == ["identify", "mitigate", "diagnose", "verify", "escalate"], url
        if parts.fragment:
            assert f'id="{parts.fragment}"' in html, url
