"""A MeterProvider that keeps more task names apart than the SDK's default limit allows."""

from __future__ import annotations

# --8<-- [start:example]
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.metrics.view import View

import traced_tasks

views = [View(instrument_name="background_task.*", aggregation_cardinality_limit=10_000)]
meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()], views=views)
traced_tasks.configure(meter_provider=meter_provider)  # 3,332 tasks apart: max_task_names=1000 fits
# --8<-- [end:example]
