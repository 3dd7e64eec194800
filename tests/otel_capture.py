"""An in-process OpenTelemetry SDK for tests: spans into an InMemorySpanExporter, metrics into an
InMemoryMetricReader. A process has one global provider of each, so every test module installs this same pair."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

SPANS = InMemorySpanExporter()
METRICS = InMemoryMetricReader()
_installed = False
_lock = threading.Lock()


def install() -> None:
    """Make the pair above the process's providers (once)."""
    global _installed
    with _lock:
        if _installed:
            return
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(SPANS))
        trace.set_tracer_provider(provider)
        metrics.set_meter_provider(MeterProvider(metric_readers=[METRICS]))
        assert trace.get_tracer_provider() is provider, "another tracer provider was installed first"
        _installed = True


def finished_spans() -> list[ReadableSpan]:
    return list(SPANS.get_finished_spans())


def _points(name: str) -> Iterator[tuple[dict, object]]:
    data = METRICS.get_metrics_data()
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    yield from ((dict(point.attributes or {}), point) for point in metric.data.data_points)


def total(name: str, **attributes: str) -> float:
    """A counter's cumulative sum, or a histogram's count, over the points carrying these attributes."""
    found = 0.0
    for point_attributes, point in _points(name):
        if attributes.items() <= point_attributes.items():
            found += point.count if hasattr(point, "count") else point.value
    return found


def gauge(name: str) -> list[float]:
    return [point.value for _, point in _points(name)]
