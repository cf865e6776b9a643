"""FastAPI's own tests of background tasks, dependencies and native telemetry, run with traced_tasks imported.

They come from the source distribution of the FastAPI version installed here, downloaded from PyPI once. Each test
that fails with traced_tasks is a difference listed below with its reason, and in the README; any other failure,
or a listed one that passes, fails this test.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from tests.support import ROOT, clean_environment

pytestmark = pytest.mark.integration  # downloads FastAPI's sources once, runs their tests in a subprocess

SELECTION = [
    "tests/test_telemetry/test_background.py",
    "tests/test_telemetry/test_http.py::test_stream_completes_before_background_and_cleanup",
    "tests/test_dependency_contextmanager.py",
    "tests/test_response_dependency.py",
    "tests/test_dependency_concurrency.py::test_capacity_follows_scope_through_streaming_and_background_work",
    "tests/test_async_dependency_cleanup.py",
    "tests/test_frontend.py::test_frontend_dependency_response_headers_and_background_tasks",
    "tests/test_tutorial/test_background_tasks",
]
# Not installed here: trio, and logfire's integration.
LEFT_OUT = "not trio and not logfire"

NAMED = "our spans are named `BackgroundTask <module.qualname>` and carry the code location and route too"
DIFFERENCES = {
    "test_background_task_spans[False-asyncio]": NAMED,
    "test_background_task_spans[True-asyncio]": NAMED,
    "test_background_task_failure[False-False]": NAMED,
    "test_background_task_failure[False-True]": NAMED,
    "test_background_task_failure[True-False]": NAMED,
    "test_background_task_failure[True-True]": NAMED,
    # OpenTelemetry's FastAPI instrumentation with a tracer provider of its own, and no global one: task spans go
    # where traced_tasks is configured to send them (the global provider, unless configure() names one), and are
    # ours, in place of its bare `BackgroundTask <function name>` ones.
    "test_background_task_integrations[contrib]": "spans go to traced_tasks' configured provider, under our names",
}

CONFTEST = """
import os

import traced_tasks  # as a service's own import would: FastAPI then injects traced_tasks' BackgroundTasks

os.environ["TRACED_TASKS_IN_SUBPROCESS"] = "1"  # the tests that run in a child process import it there too
"""
SITECUSTOMIZE = """
import os

if os.environ.get("TRACED_TASKS_IN_SUBPROCESS") == "1":
    import traced_tasks
"""
PYTEST_INI = """[pytest]
addopts = --strict-config --strict-markers --ignore=docs_src -p no:cacheprovider
strict_xfail = true
filterwarnings =
    error
markers =
    xdist_group: pytest-xdist's grouping, which FastAPI's tests use
"""


@pytest.fixture(scope="session")
def fastapi_sources() -> Path:
    """FastAPI's source distribution for the installed version, unpacked under .venv/upstream."""
    version = importlib.metadata.version("fastapi")
    folder = ROOT / ".venv" / "upstream" / f"fastapi-{version}"
    if not (folder / "tests").is_dir():
        download = folder.parent / "download"
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps"]
        subprocess.run([*pip, "--no-binary", ":all:", "--dest", str(download), f"fastapi=={version}"], check=True)
        (archive,) = download.glob(f"fastapi-{version}.tar.gz")
        with tarfile.open(archive) as sources:
            sources.extractall(folder.parent, filter="data")
    (folder / "conftest.py").write_text(CONFTEST)
    (folder / "pytest.ini").write_text(PYTEST_INI)
    (folder / "sitecustomize").mkdir(exist_ok=True)
    (folder / "sitecustomize" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return folder


def test_fastapis_own_tests_pass_with_traced_tasks(fastapi_sources: Path, tmp_path: Path) -> None:
    """FastAPI's background-task, dependency and native-telemetry tests pass with traced_tasks imported, except the
    listed differences, each a choice with its reason."""
    report = tmp_path / "report.xml"
    env = clean_environment(PYTHONPATH=f"{fastapi_sources / 'sitecustomize'}:{ROOT}")
    env["PYDANTIC_DISABLE_PLUGINS"] = "__all__"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", *SELECTION, "-q", "-k", LEFT_OUT, f"--junitxml={report}"],
        cwd=fastapi_sources,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    cases = ElementTree.parse(report).getroot().iter("testcase")
    outcomes = {
        case.get("name", ""): "failed" if case.find("failure") is not None or case.find("error") is not None else "ok"
        for case in cases
    }
    assert len(outcomes) > 80, result.stdout[-2000:]
    failed = {name for name, outcome in outcomes.items() if outcome == "failed"}
    assert failed == set(DIFFERENCES), result.stdout[-4000:]
