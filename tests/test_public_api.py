from __future__ import annotations

import re
from pathlib import Path

import traced_tasks

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_every_name_the_readme_uses_is_exported() -> None:
    """Every traced_tasks.<name> and `from traced_tasks import <names>` in the README is in __all__ and exists."""
    used = set(re.findall(r"traced_tasks\.([A-Za-z_]\w*)", README))
    for names in re.findall(r"from traced_tasks import ([\w, ]+)", README):
        used.update(name.strip() for name in names.split(","))
    assert used >= {"BackgroundTasks", "BackgroundTask", "metrics_app", "make_metrics_app", "configure"}
    assert sorted(used - set(traced_tasks.__all__)) == []
    for name in used:
        assert getattr(traced_tasks, name) is not None


def test_all_is_complete() -> None:
    """Every public attribute of the package is listed in __all__ (ruff's RUF022 keeps it sorted)."""
    public = {name for name in vars(traced_tasks) if not name.startswith("_")}
    assert public == set(traced_tasks.__all__) - {"__version__"}


def test_every_configure_option_is_documented() -> None:
    """Each keyword of configure() appears in the README's Options section."""
    options = traced_tasks.configure.__kwdefaults__ or {}
    section = README.split("## Options", 1)[1].split("\n## ", 1)[0]
    assert options
    assert [name for name in options if f"{name}=" not in section] == []


def test_every_metric_is_documented() -> None:
    """Each metric family traced_tasks registers is in the README's metrics table."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    traced_tasks.configure(registry=registry)
    try:
        families = [metric.name for metric in registry.collect()]
    finally:
        traced_tasks.configure(registry=CollectorRegistry())
    assert len(families) == 7
    for family in families:
        exposed = (
            family + "_total"
            if family in {"background_task_scheduled", "background_task_exceptions", "background_task_skipped"}
            else family
        )
        assert f"| `{exposed}` |" in README


def test_typed_package() -> None:
    """The package ships py.typed, so type checkers read its annotations."""
    assert (Path(traced_tasks.__file__).parent / "py.typed").is_file()
