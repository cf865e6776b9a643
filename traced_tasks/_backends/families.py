"""The metric families of a configuration, as each backend declares them: built from the names, in one place. And the
families sampled from outside the runs, as prometheus_client's metric families."""

from __future__ import annotations

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from traced_tasks import _conventions as names
from traced_tasks import _sampled
from traced_tasks._options import Options


def label_names(options: Options, family: names.Family) -> list[str]:
    """A family's labels: its own, for a sampled family; else the task's (and the route's), then the family's own."""
    if family.labels is not None:
        return list(family.labels)
    return [*options.label_names, family.by] if family.by else list(options.label_names)


def metric_name(options: Options, family: names.Family) -> str:
    """A family's Prometheus name, namespace included, without a counter's `_total`."""
    return options.prefix + family.name


def sampled(options: Options, samples: bool = True) -> list[Metric]:
    """The sampled families (queues, schedules), each with what its sources sample now (unless `samples` is false);
    all of them, empty ones too, so that the registry knows every name."""
    made = {
        family: GaugeMetricFamily(metric_name(options, family), family.help, labels=label_names(options, family))
        for family in names.SAMPLED_FAMILIES
    }
    for sample in _sampled.collect() if samples else ():
        found = made.get(sample.family)
        if found is not None:
            found.add_metric(list(sample.labels), sample.value)
    return list(made.values())


class SampledCollector:
    """The sampled families as a prometheus_client collector."""

    def __init__(self, options: Options) -> None:
        self._options = options

    def collect(self) -> list[Metric]:
        return sampled(self._options)
