from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

from prometheus_client import CollectorRegistry

import traced_tasks
from traced_tasks import _conventions as names
from traced_tasks._options import option_names

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_every_name_the_readme_uses_is_exported() -> None:
    """Every traced_tasks.<name> and `from traced_tasks import <names>` in the README is in __all__ and exists."""
    used = set(re.findall(r"traced_tasks\.([A-Za-z_]\w*)", README))
    for imported in re.findall(r"from traced_tasks import ([\w, ]+)", README):
        used.update(name.strip() for name in imported.split(","))
    assert used >= {"BackgroundTasks", "BackgroundTask", "metrics_app", "make_metrics_app", "configure"}
    assert sorted(used - set(traced_tasks.__all__)) == []
    for name in used:
        assert getattr(traced_tasks, name) is not None


def test_all_is_complete() -> None:
    """Every public attribute of the package is listed in __all__ (ruff's RUF022 keeps it sorted)."""
    public = {name for name in vars(traced_tasks) if not name.startswith("_")}
    assert public == set(traced_tasks.__all__) - {"__version__"}


def test_every_configure_option_is_documented() -> None:
    """Each keyword of configure() appears in the README's Options section and in configure()'s Args."""
    options = list(inspect.signature(traced_tasks.configure).parameters)
    section = README.split("## Options", 1)[1].split("\n## ", 1)[0]
    assert options == option_names()
    assert [name for name in options if f"{name}=" not in section] == []
    args = (traced_tasks.configure.__doc__ or "").split("Args:", 1)[1]
    assert [name for name in options if f"\n        {name}: " not in args] == []


def test_every_metric_is_documented() -> None:
    """Each metric family traced_tasks registers is in the README's metrics table, under its exposed name."""
    registry = CollectorRegistry()
    traced_tasks.configure(registry=registry)
    try:
        registered = {metric.name for metric in registry.collect()}
    finally:
        traced_tasks.configure(registry=CollectorRegistry())
    assert registered == {family.name for family in names.FAMILIES}
    assert all(family.name.startswith(names.PREFIX) for family in names.FAMILIES)
    for family in names.FAMILIES:
        assert f"| `{family.total if family.kind == 'counter' else family.name}` |" in README


def test_typed_package() -> None:
    """The package ships py.typed, so type checkers read its annotations."""
    assert (Path(traced_tasks.__file__).parent / "py.typed").is_file()


def test_the_package_has_no_import_cycle() -> None:
    """traced_tasks' modules import one another in one direction only: the task classes, then the run lifecycle, then
    the backends. Every import counts, at module level or inside a function; the package's __init__ is left out."""
    package = Path(traced_tasks.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        if path.name == "__init__.py":
            continue
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "traced_tasks":
                imported.update(f"traced_tasks.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("traced_tasks."):
                imported.add(node.module or "")
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names if alias.name.startswith("traced_tasks."))
        graph[f"traced_tasks.{path.stem}"] = imported
    assert len(graph) > 10
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        for imported in sorted(graph.get(module, ())):
            if imported in path:
                cycles.append([*path[path.index(imported) :], imported])
            else:
                visit(imported, [*path, imported])

    for module in sorted(graph):
        visit(module, [module])
    assert cycles == []
