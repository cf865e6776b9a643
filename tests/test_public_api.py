from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

from prometheus_client import CollectorRegistry

import traced_tasks
from traced_tasks import _conventions as names
from traced_tasks._options import option_names

ROOT = Path(__file__).resolve().parent.parent
# What a reader reads: the README, the site's pages, and the examples they include.
DOCUMENTATION = "\n".join(
    path.read_text()
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "docs").rglob("*.py"))]
)


def test_every_name_the_documentation_uses_exists() -> None:
    """Every traced_tasks.<name> and `from traced_tasks import <names>` in the README, the site's pages and their
    examples is in __all__ and exists, or is one of the engine modules, whose names exist too."""
    used = set(re.findall(r"traced_tasks\.([A-Za-z_]\w*)", DOCUMENTATION))
    for imported in re.findall(r"from traced_tasks import ([\w, ]+)", DOCUMENTATION):
        used.update(name.split(" as ")[0].strip() for name in imported.split(","))
    # Modules, below; and private names, which only docs/generate.py reads, to write the tables from the code.
    used = {name for name in used if not name.startswith("_")} - {"celery", "taskiq", "testing", "package"}
    assert used >= {"BackgroundTasks", "BackgroundTask", "metrics_app", "make_metrics_app", "configure", "declare"}
    assert sorted(used - set(traced_tasks.__all__)) == []
    for name in used:
        assert getattr(traced_tasks, name) is not None
    for module in ("celery", "taskiq", "testing"):
        found = set(re.findall(rf"traced_tasks\.{module}\.(\w+)", DOCUMENTATION))
        assert found, module
        assert sorted(found - set(importlib.import_module(f"traced_tasks.{module}").__all__)) == [], module


def test_all_is_complete() -> None:
    """Every public attribute of the package is listed in __all__ (ruff's RUF022 keeps it sorted), but the engine
    integrations: public modules that need their engine, imported only by those who use them."""
    public = {name for name in vars(traced_tasks) if not name.startswith("_")} - {"celery", "taskiq"}
    assert public == set(traced_tasks.__all__) - {"__version__"}


def test_every_configure_option_is_documented() -> None:
    """Each keyword of configure() is in the example of the Configuration page and in configure()'s Args, from
    which the page's table of options is written."""
    options = list(inspect.signature(traced_tasks.configure).parameters)
    example = (ROOT / "docs" / "examples" / "configure.py").read_text()
    assert options == option_names()
    assert [name for name in options if f"    {name}=" not in example] == []
    # Python 3.13 strips docstrings' indentation, earlier ones do not; cleandoc makes them alike.
    args = inspect.cleandoc(traced_tasks.configure.__doc__ or "").split("Args:", 1)[1]
    assert [name for name in options if f"\n    {name}: " not in args] == []


def test_every_metric_is_documented() -> None:
    """Each metric family traced_tasks registers is in the Metrics page's table, under its exposed name."""
    registry = CollectorRegistry()
    traced_tasks.configure(registry=registry)
    try:
        registered = {metric.name for metric in registry.collect()}
    finally:
        traced_tasks.configure(registry=CollectorRegistry())
    assert registered == {family.name for family in names.FAMILIES}
    assert all(family.name.startswith(names.PREFIX) for family in names.FAMILIES)
    for family in names.FAMILIES:
        assert f"| `{family.total if family.kind == 'counter' else family.name}` |" in DOCUMENTATION


def test_typed_package() -> None:
    """The package ships py.typed, so type checkers read its annotations."""
    assert (Path(traced_tasks.__file__).parent / "py.typed").is_file()


# traced_tasks' modules from the top layer down: a module imports only from its own layer's modules or lower ones.
LAYERS = [
    ["traced_tasks.testing", "traced_tasks.__main__"],
    ["traced_tasks._worker"],
    ["traced_tasks._instrumentor"],
    ["traced_tasks._web", "traced_tasks._fastapi", "traced_tasks._middleware", "traced_tasks._setup"],
    ["traced_tasks._shutdown"],
    ["traced_tasks._tasks"],
    ["traced_tasks._queues", "traced_tasks._schedules"],
    ["traced_tasks._config"],
    ["traced_tasks._run", "traced_tasks._profiles"],
    [
        "traced_tasks._labels",
        "traced_tasks._callables",
        "traced_tasks._request",
        "traced_tasks._wire",
        "traced_tasks._stacks",
    ],
    ["traced_tasks._backends"],
    ["traced_tasks._activity", "traced_tasks._sampled", "traced_tasks._engines"],
    ["traced_tasks._options"],
    ["traced_tasks._conventions", "traced_tasks._version", "traced_tasks.package"],
]


def _imports() -> dict[str, set[str]]:
    """Each module of the package, but its __init__, with the modules of the package it imports, at module level or
    inside a function."""
    package = Path(traced_tasks.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        module = ".".join(("traced_tasks", *path.relative_to(package).with_suffix("").parts))
        if module == "traced_tasks.__init__":
            continue
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("traced_tasks"):
                imported.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names if alias.name.startswith("traced_tasks."))
        graph[module.removesuffix(".__init__")] = imported
    return graph


def _layer(module: str) -> int | None:
    """The layer of a module (a module of a subpackage is in its package's), None for a name that is no module of
    ours (a class imported from one)."""
    for index, layer in enumerate(LAYERS):
        if any(module == top or module.startswith(top + ".") for top in layer):
            return index
    return None


def test_the_package_flows_down_its_layers() -> None:
    """The package's modules import one another downwards only: the integrations and task classes, then one run's
    life, then the configuration, then the names and counts, then the backends, then the options and names. Every
    import counts, at module level or inside a function; the package's __init__ and the engine integrations, which
    are public modules on top, are left out. Every module has a layer."""
    graph = _imports()
    engines = {"traced_tasks.celery", "traced_tasks.taskiq"}
    unplaced = sorted(module for module in graph if module not in engines and _layer(module) is None)
    assert unplaced == []
    upward = []
    for module, imported in sorted(graph.items()):
        if module in engines:
            continue
        own = _layer(module)
        assert own is not None
        for name in sorted(imported):
            target = _layer(name) if _layer(name) is not None else _layer(name.rsplit(".", 1)[0])
            if target is not None and target < own:
                upward.append(f"{module} imports {name}")
    assert upward == []
