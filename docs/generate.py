"""Write the reference tables the documentation includes, from the code and the rules that define them:

    python docs/generate.py          # after changing a name, an option, a switch or a rule

The test suite fails when a table here differs from what this writes.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import traced_tasks  # noqa: E402
from traced_tasks import _conventions as names  # noqa: E402
from traced_tasks._options import SWITCHES, Options  # noqa: E402

SNIPPETS = ROOT / "docs" / "snippets"


def metrics() -> str:
    rows = ["| name | type | labels | meaning |", "|---|---|---|---|"]
    for family in names.FAMILIES:
        shown = family.total if family.kind == "counter" else family.name
        own = family.labels if family.labels is not None else (names.LABEL_TASK, family.by)
        labels = ", ".join(f"`{label}`" for label in own if label)
        rows.append(f"| `{shown}` | {family.kind} | {labels} | {family.help} |")
    return "\n".join(rows)


def instruments() -> str:
    rows = ["| instrument | kind | unit | in Prometheus |", "|---|---|---|---|"]
    kinds = {"counter": "counter", "histogram": "histogram"}
    for family in names.FAMILIES:
        if family.kind == "gauge":
            kind = "observable up-down counter" if family.multiprocess_mode == "livesum" else "observable gauge"
        elif family.kind == "counter":
            kind = "observable counter"
        else:
            kind = kinds[family.kind]
        shown = family.total if family.kind == "counter" else family.name
        rows.append(f"| `{family.instrument}` | {kind} | `{family.unit}` | `{shown}` |")
    return "\n".join(rows)


def options() -> str:
    """configure()'s options, with their defaults and what its docstring's Args say of each."""
    docstring = inspect.cleandoc(traced_tasks.configure.__doc__ or "").split("Args:", 1)[1]
    meanings = {
        name: " ".join(text.split()).replace('"__overflow__"', "`__overflow__`")
        for name, text in re.findall(r"^    (\w+): (.*?)(?=^    \w+: |\Z)", docstring, re.MULTILINE | re.DOTALL)
    }
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for field in dataclasses.fields(Options):
        default: object = field.default
        shown = "`None`" if default is None else '`""`' if default == "" else f"`{default!r}`"
        if field.name == "registry":
            shown = "`prometheus_client.REGISTRY`"
        elif field.name == "buckets":
            shown = "`DEFAULT_BUCKETS`"
        rows.append(f"| `{field.name}` | {shown} | {meanings[field.name]} |")
    return "\n".join(rows)


def environment() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for switch in SWITCHES:
        default = f"`{switch.default}`" if switch.default else "unset"
        rows.append(f"| `{switch.name}` | {default} | {switch.meaning} |")
    return "\n".join(rows)


def alerts() -> str:
    rules = yaml.safe_load((ROOT / "dashboards" / "rules.yml").read_text())
    rows = ["| alert | summary | for | severity |", "|---|---|---|---|"]
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                page = f"runbooks/{rule['alert'].lower()}.md"
                summary = rule["annotations"]["summary"].replace("{{ $labels.task }}", "*task*")
                rows.append(
                    f"| [`{rule['alert']}`]({page}) | {summary} | {rule['for']} | {rule['labels']['severity']} |"
                )
    return "\n".join(rows)


TABLES = {
    "metrics.md": metrics,
    "instruments.md": instruments,
    "options.md": options,
    "environment.md": environment,
    "alerts.md": alerts,
}


def tables() -> dict[Path, str]:
    return {SNIPPETS / name: make() + "\n" for name, make in TABLES.items()}


if __name__ == "__main__":
    SNIPPETS.mkdir(exist_ok=True)
    for path, text in tables().items():
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
