"""The Key Vault and Intune backends' metrics, and where all of the product's telemetry goes.

Metrics (OpenTelemetry API, no-ops until configured): scep.keyvault.duration, scep.keyvault.throttled,
scep.keyvault.retries (custody, scep.azure.keyvault), scep.intune.duration and scep.intune.failures (the Intune
client). The core's spans and metrics are in scep.core.telemetry.

Exporters, installed once per process by the composition root (scep.config.configure_telemetry):

- Azure: the Azure Monitor OpenTelemetry distro (`azure-monitor-opentelemetry`) exports to Application Insights.
  With `APPLICATIONINSIGHTS_AUTHENTICATION_STRING=ClientId=<id>;Authorization=AAD` it authenticates with an Entra
  token of that managed identity, built by scep.azure.identity and passed as `configure_azure_monitor(credential=)`
  (the distro's documented keyword: "Token credential ... used for Azure Active Directory (AAD) authentication");
  without it the connection string's instrumentation key is used, which a component with local authentication
  disabled (as infra/ deploys it) refuses.
- Locally: nothing by default; `console` prints spans and metrics on stdout, `otlp` sends them over OTLP/HTTP
  (protobuf) to a collector.

The SDK and the exporters are imported here, on first configuration, never by the code that records.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics

OFF = "off"
CONSOLE = "console"
OTLP = "otlp"
AZURE_MONITOR = "azure-monitor"
SERVICE_NAME = "scep"
METRIC_EXPORT_MILLIS = 60_000
# urllib3 and urllib sit under requests and azure-core: their spans would repeat the requests and Azure SDK spans.
_REPEATED_INSTRUMENTATIONS = {"urllib": {"enabled": False}, "urllib3": {"enabled": False}}


_meter = metrics.get_meter("scep.azure")
KEYVAULT_DURATION = _meter.create_histogram(
    "scep.keyvault.duration", unit="ms", description="One Key Vault key operation call (sign, unwrapKey)"
)
KEYVAULT_THROTTLED = _meter.create_counter(
    "scep.keyvault.throttled", unit="{call}", description="Key operations Key Vault answered with 429"
)
KEYVAULT_RETRIES = _meter.create_counter(
    "scep.keyvault.retries", unit="{call}", description="Key operations tried again after a 429, 5xx or lost connection"
)
INTUNE_DURATION = _meter.create_histogram(
    "scep.intune.duration", unit="ms", description="One call to Intune's SCEP validation service"
)
INTUNE_FAILURES = _meter.create_counter(
    "scep.intune.failures", unit="{call}", description="Calls to Intune that got no answer or an HTTP error, by code"
)


@contextmanager
def keyvault_call(operation: str) -> Iterator[None]:
    """Time one Key Vault key operation call (operation: sign or unwrapKey), failed calls included."""
    started = time.monotonic()
    try:
        yield
    finally:
        KEYVAULT_DURATION.record(_elapsed_ms(started), {"operation": operation})


def intune_call(call: str, started: float, failure: str | None = None) -> None:
    """One call to Intune (validateRequest, successNotification, failureNotification) that began at `started`
    (time.monotonic()); failure: the HTTP status, or timeout / connection when no answer came."""
    INTUNE_DURATION.record(_elapsed_ms(started), {"call": call})
    if failure is not None:
        INTUNE_FAILURES.add(1, {"code": failure, "call": call})


def _elapsed_ms(started: float) -> float:
    return (time.monotonic() - started) * 1000.0


@dataclass(frozen=True)
class TelemetrySettings:
    exporter: str  # OFF, CONSOLE, OTLP or AZURE_MONITOR
    otlp_endpoint: str  # base URL of an OTLP/HTTP collector: /v1/traces and /v1/metrics are appended
    connection_string: str = field(repr=False)
    entra_client_id: str | None  # the managed identity named by the authentication string
    entra: bool  # Authorization=AAD


def parse_authentication_string(text: str) -> tuple[bool, str | None]:
    """`ClientId=<id>;Authorization=AAD` -> (True, id); empty -> (False, None). ValueError for anything else:
    AAD is the only authorization Application Insights defines for it."""
    if not text.strip():
        return False, None
    pairs: dict[str, str] = {}
    for part in filter(None, (item.strip() for item in text.split(";"))):
        name, separator, value = part.partition("=")
        if not separator or not value.strip():
            raise ValueError(f"holds {name!r} without a value; expected ClientId=<client id>;Authorization=AAD")
        pairs[name.strip().lower()] = value.strip()
    unknown = sorted(set(pairs) - {"clientid", "authorization"})
    if unknown:
        raise ValueError(f"holds unknown keys {unknown}; expected ClientId=<client id>;Authorization=AAD")
    if pairs.get("authorization") != "AAD":
        raise ValueError("must say Authorization=AAD")
    return True, pairs.get("clientid")


_configured: str | None = None
_lock = threading.Lock()


def configure(settings: TelemetrySettings, credential: Callable[[str | None], Any]) -> str:
    """Install the exporter settings ask for, once per process (later calls change nothing); returns the exporter
    in effect. credential(client_id) builds the Entra credential for Azure Monitor."""
    global _configured
    with _lock:
        if _configured is None:
            _install(settings, credential)
            _configured = settings.exporter
        return _configured


def _install(settings: TelemetrySettings, credential: Callable[[str | None], Any]) -> None:
    if settings.exporter == AZURE_MONITOR:
        _install_azure_monitor(settings, credential)
    elif settings.exporter in (CONSOLE, OTLP):
        _install_local(settings)


def _install_azure_monitor(settings: TelemetrySettings, credential: Callable[[str | None], Any]) -> None:
    from azure.monitor.opentelemetry import configure_azure_monitor

    options: dict[str, Any] = {
        "connection_string": settings.connection_string,
        # The Functions host already ships the worker's log records to Application Insights.
        "disable_logging": True,
        "instrumentation_options": _REPEATED_INSTRUMENTATIONS,
    }
    if settings.entra:
        options["credential"] = credential(settings.entra_client_id)
    configure_azure_monitor(**options)


def _install_local(settings: TelemetrySettings) -> None:
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    if settings.exporter == OTLP:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        base = settings.otlp_endpoint.rstrip("/")
        processor: Any = BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{base}/v1/traces"))
        metric_exporter: Any = OTLPMetricExporter(endpoint=f"{base}/v1/metrics")
    else:
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        processor = SimpleSpanProcessor(ConsoleSpanExporter())
        metric_exporter = ConsoleMetricExporter()
    resource = Resource.create({"service.name": SERVICE_NAME})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(processor)
    trace.set_tracer_provider(tracer_provider)
    reader = PeriodicExportingMetricReader(metric_exporter, export_interval_millis=METRIC_EXPORT_MILLIS)
    metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=[reader]))
