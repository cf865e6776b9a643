"""The metric families of a configuration, as each backend declares them: built from the names, in one place."""

from __future__ import annotations

from traced_tasks import _conventions as names
from traced_tasks._options import Options


def label_names(options: Options, family: names.Family) -> list[str]:
    """A family's labels: the task's (and the route's), then the family's own."""
    return [*options.label_names, family.by] if family.by else list(options.label_names)


def metric_name(options: Options, family: names.Family) -> str:
    """A family's Prometheus name, namespace included, without a counter's `_total`."""
    return options.prefix + family.name
