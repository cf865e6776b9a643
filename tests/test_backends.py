"""The two metrics backends (in-process numbers, prometheus_client's objects for multiprocess) agree exactly."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.trace import SpanContext, TraceFlags
from prometheus_client import CollectorRegistry
from prometheus_client import generate_latest as generate_text
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from traced_tasks._local import LocalMetrics
from traced_tasks._metrics import DEFAULT_BUCKETS, ClientMetrics, Metrics
from traced_tasks._render import render

EXEMPLAR = SpanContext(
    0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED)
)

EVENTS = st.lists(
    st.tuples(
        st.sampled_from(["send", "charge", "notify"]),
        st.sampled_from([None, "/orders/{order_id}", "/users/{user_id}"]),
        st.sampled_from(["schedule", "start", "succeed", "error", "cancel", "skip"]),
        st.sampled_from([0.0001, 0.003, 0.005, 0.2, 1.0, 7.5, 45.0, 3600.0, 5000.0]),  # some on a bound exactly
        st.booleans(),
        st.sampled_from([KeyError, ValueError, TimeoutError]),
    ),
    max_size=40,
)


def apply(metrics: Metrics, events: list[tuple[Any, ...]]) -> None:
    for name, route, event, seconds, sampled, kind in events:
        task = metrics.for_task(name, route)
        exemplar = EXEMPLAR if sampled else None
        if event == "schedule":
            task.schedule()
        elif event == "start":
            task.start(seconds)
        elif event == "succeed":
            task.succeed(seconds, exemplar)
        elif event == "skip":
            task.skip()
        else:
            task.fail("error" if event == "error" else "cancelled", seconds, exemplar, kind)


def samples(registry: CollectorRegistry) -> set[tuple[Any, ...]]:
    """Every sample, without the _created series (prometheus_client's only) and the clock-read values."""
    found = set()
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name.endswith("_created"):
                continue
            value = sample.value > 0 if sample.name.endswith("last_success_timestamp_seconds") else sample.value
            exemplar = (
                (tuple(sorted(sample.exemplar.labels.items())), sample.exemplar.value) if sample.exemplar else None
            )
            found.add((sample.name, tuple(sorted(sample.labels.items())), value, exemplar))
    return found


@settings(max_examples=150, deadline=None)
@given(EVENTS, st.booleans())
def test_backends_expose_the_same_samples(events: list[tuple[Any, ...]], route_label: bool) -> None:
    """For any sequence of events, with or without the route label, both backends expose the same samples,
    bucket counts, sums and exemplars, in both exposition formats' terms."""
    client_registry, local_registry = CollectorRegistry(), CollectorRegistry()
    client = ClientMetrics(client_registry, "", DEFAULT_BUCKETS, route_label)
    local = LocalMetrics(local_registry, "", DEFAULT_BUCKETS, route_label)
    apply(client, events)
    apply(local, events)
    assert samples(local_registry) == samples(client_registry)


def test_local_backend_openmetrics_has_exemplars() -> None:
    """The in-process backend's exemplars reach the OpenMetrics exposition, on the bucket of the observation."""
    registry = CollectorRegistry()
    local = LocalMetrics(registry, "shop", DEFAULT_BUCKETS)
    task = local.for_task("send")
    task.schedule()
    task.start(0.001)
    task.succeed(0.2, EXEMPLAR)
    text = generate_openmetrics(registry).decode()
    (line,) = [line for line in text.splitlines() if "# {" in line]
    assert line.startswith(
        'shop_background_task_duration_seconds_bucket{le="0.25",status="success",task="send"} 1.0 # {'
    )
    assert 'span_id="00f067aa0ba902b7",trace_id="4bf92f3577b34da6a3ce929d0e0e4736"} 0.2' in line


def parsed(text: str, openmetrics: bool) -> set[tuple[Any, ...]]:
    parse = parse_openmetrics if openmetrics else parse_text
    found = set()
    for family in parse(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            exemplar = (
                (tuple(sorted(sample.exemplar.labels.items())), sample.exemplar.value) if sample.exemplar else None
            )
            found.add(
                (family.name, family.type, sample.name, tuple(sorted(sample.labels.items())), sample.value, exemplar)
            )
    return found


ODD = 'quote" back\\slash\nnewline ünï'


@settings(max_examples=100, deadline=None)
@given(EVENTS, st.booleans(), st.booleans())
def test_fast_rendering_matches_prometheus_client(events: list[tuple[Any, ...]], route_label: bool, odd: bool) -> None:
    """traced_tasks' own rendering of its in-process counts parses, in both formats, to exactly the families,
    samples and exemplars prometheus_client writes for the same collector, odd label values included."""
    registry = CollectorRegistry()
    local = LocalMetrics(registry, "shop", DEFAULT_BUCKETS, route_label)
    if odd:
        events = [(ODD + name, route, *rest) for name, route, *rest in events]
    apply(local, events)
    assert parsed(render(local, openmetrics=False).decode(), False) == parsed(generate_text(registry).decode(), False)
    ours = render(local, openmetrics=True).decode() + "# EOF\n"
    assert parsed(ours, True) == parsed(generate_openmetrics(registry).decode(), True)


@pytest.mark.parametrize("backend", [LocalMetrics, ClientMetrics], ids=["in-process", "prometheus_client"])
def test_span_ids_that_are_not_numbers_drop_the_exemplar_only(backend: type[LocalMetrics | ClientMetrics]) -> None:
    """A span context whose IDs cannot be written in hex, as only a tracer other than the SDK's could make,
    costs its exemplar and nothing else: the run is counted, and every rendering of the registry still works."""
    registry = CollectorRegistry()
    metrics = backend(registry, "", DEFAULT_BUCKETS)
    odd = SpanContext(Decimal(5), 7, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))  # type: ignore[arg-type]
    task = metrics.for_task("send")
    task.schedule()
    task.start(0.001)
    task.succeed(0.2, odd)
    task.start(0.001)
    task.fail("error", 0.2, odd, KeyError)
    for text in (generate_text(registry).decode(), generate_openmetrics(registry).decode()):
        assert 'background_task_duration_seconds_count{status="success",task="send"} 1.0' in text
        assert 'background_task_duration_seconds_count{status="error",task="send"} 1.0' in text
        assert "trace_id" not in text
    if isinstance(metrics, LocalMetrics):
        for openmetrics in (False, True):
            rendered = render(metrics, openmetrics).decode()
            assert 'background_task_duration_seconds_count{status="success",task="send"} 1.0' in rendered
            assert "trace_id" not in rendered
