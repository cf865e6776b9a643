"""Counting through an OpenTelemetry MeterProvider, to leave over OTLP."""

from __future__ import annotations

# --8<-- [start:example]
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import traced_tasks

reader = InMemoryMetricReader()  # a service: PeriodicExportingMetricReader(OTLPMetricExporter())
meter_provider = MeterProvider(metric_readers=[reader])
traced_tasks.configure(meter_provider=meter_provider)  # or any MeterProvider the service has
# --8<-- [end:example]
