"""traced_tasks on the oldest versions it supports: the lower bounds pyproject.toml declares, FastAPI's included."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import traced_tasks
from tests.support import ROOT, clean_environment
from traced_tasks import _conventions as names

tomllib = pytest.importorskip("tomllib")

pytestmark = pytest.mark.integration  # builds a virtual environment once

OLDEST = ROOT / ".venv" / "oldest"


def lowest_versions() -> list[str]:
    """Each dependency at its declared lower bound: `starlette>=0.37` becomes `starlette==0.37`."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *project["optional-dependencies"]["fastapi"]]
    assert all(">=" in requirement for requirement in declared), declared
    return [requirement.replace(">=", "==") for requirement in declared] + ["httpx"]  # httpx: FastAPI's TestClient


@pytest.fixture(scope="session")
def oldest_python() -> Path:
    requirements = lowest_versions()
    stamp = OLDEST / "requirements.txt"
    if not stamp.is_file() or stamp.read_text() != "\n".join(requirements):
        shutil.rmtree(OLDEST, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(OLDEST)], check=True)
        pip = [str(OLDEST / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*pip, *requirements], check=True)
        stamp.write_text("\n".join(requirements))
    return OLDEST / "bin" / "python"


def test_the_oldest_versions_trace_and_count(oldest_python: Path) -> None:
    """With every dependency at its lowest supported version (FastAPI 0.110.1, Starlette 0.37.2, OpenTelemetry 1.30),
    traced_tasks imports, traces each task with the whole route template of an included router, counts runs and
    skips by route, and counts through an OpenTelemetry MeterProvider with its own histogram buckets."""
    result = subprocess.run(
        [str(oldest_python), "tests/apps/compatibility.py"],
        cwd=ROOT,
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["versions"] == {"fastapi": "0.110.1", "starlette": "0.37.2"}
    assert seen["spans"] == [
        ["BackgroundTask __main__.send_receipt", "/users/{id}"],
        ["BackgroundTask __main__.send_receipt", "/admins/{id}"],
        ["BackgroundTask __main__.charge", "/admins/{id}/charge"],
    ]
    lines = seen["exposition"].splitlines()
    assert f'{names.SCHEDULED.total}{{route="/users/{{id}}",task="__main__.send_receipt"}} 1.0' in lines
    assert f'{names.SCHEDULED.total}{{route="/admins/{{id}}",task="__main__.send_receipt"}} 1.0' in lines
    assert f'{names.SKIPPED.total}{{route="/admins/{{id}}/charge",task="__main__.send_receipt"}} 1.0' in lines
    assert (
        f'{names.EXCEPTIONS.total}{{exception="Declined",route="/admins/{{id}}/charge",task="__main__.charge"}} 1.0'
    ) in lines
    assert seen["otel_bounds"] == [list(traced_tasks.DEFAULT_BUCKETS)]  # the advisory buckets, honoured
    assert seen["otel_runs"] == 3
