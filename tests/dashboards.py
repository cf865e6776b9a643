"""Read the shipped dashboards and rules: their queries, with Grafana's variables made concrete."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from traced_tasks import _conventions as names

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "dashboards"
DASHBOARD_FILES = sorted(DASHBOARDS.glob("*.json"))
RULES = DASHBOARDS / "rules.yml"

COUNTER_SUFFIXES = ("_total", "_count", "_bucket", "_sum")
METRIC = re.compile(rf"\b({names.PREFIX}\w+|up)\b")


@dataclass
class Query:
    dashboard: str
    panel: str
    expr: str
    instant: bool


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # rows


def queries() -> Iterator[Query]:
    for path in DASHBOARD_FILES:
        for panel in panels(load(path)):
            for target in panel.get("targets", []):
                yield Query(path.name, panel["title"], target["expr"], bool(target.get("instant")))


def rules() -> Iterator[dict[str, Any]]:
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        yield from group["rules"]


def concrete(expr: str, variables: dict[str, str]) -> str:
    """The query Grafana would send, for the given variable values and Grafana's own interval variables."""
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace("$" + name, variables[name])
    return expr


def metric_names(expr: str) -> set[str]:
    """Metric names in an expression, leaving out recording rule names (they contain ':')."""
    names = set()
    for match in METRIC.finditer(expr):
        end = match.end()
        if end < len(expr) and expr[end] == ":":
            continue
        if match.start() > 0 and expr[match.start() - 1] == ":":
            continue
        names.add(match.group(1))
    return names
