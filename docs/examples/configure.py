"""Every option of configure(), at startup, before tasks are scheduled."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

import traced_tasks

# --8<-- [start:configure]
traced_tasks.configure(
    tracer_provider=None,  # None: the global tracer provider, whenever it is set
    meter_provider=None,  # a MeterProvider: count through OpenTelemetry, not prometheus_client
    registry=CollectorRegistry(),  # default: prometheus_client.REGISTRY
    namespace="shop",  # shop_background_task_scheduled_total, ...
    buckets=(0.1, 1, 10, 60, 600),  # seconds, for both histograms
    max_task_names=200,  # distinct task label values before __overflow__
    use_span_links=False,  # True: a new trace per task, linked to the request
    isolate_tasks=False,  # True: a failing task does not stop the rest of its batch
    route_label=False,  # True: every family also gets a `route` label
    queue_every=15,  # seconds between two reads of the broker queues this process watches, at most
)
# --8<-- [end:configure]
