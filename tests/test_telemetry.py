"""Traces and metrics of the SCEP core, read from an in-process OpenTelemetry SDK; and the telemetry settings."""

from __future__ import annotations

import pytest

from scep.azure import telemetry as exporters
from scep.config import ConfigError, load_settings
from scep.core import telemetry
from scep.core.protocol import PkiStatus
from scep.logs import MAX_VALUE_CHARS
from tests import otel_capture
from tests.conftest import CHALLENGE
from tests.scep_helpers import enroll

STEPS = {
    telemetry.STEP_UNWRAP,
    telemetry.STEP_VALIDATE,
    telemetry.STEP_SIGN_CERTIFICATE,
    telemetry.STEP_NOTIFY,
    telemetry.STEP_SIGN_REPLY,
}
WRONG_CHALLENGE = "a wrong but memorable challenge"


@pytest.fixture(autouse=True)
def sdk() -> None:
    otel_capture.install()
    otel_capture.SPANS.clear()


def _one_trace(transaction_id: str):
    spans = otel_capture.finished_spans()
    roots = [span for span in spans if span.name == telemetry.ENROLLMENT_SPAN]
    assert len(roots) == 1
    root = roots[0]
    assert root.attributes[telemetry.ATTR_TRANSACTION_ID] == transaction_id
    assert {span.context.trace_id for span in spans} == {root.context.trace_id}
    return root, [span for span in spans if span is not root]


def _assert_nowhere(spans, secret: str) -> None:
    for span in spans:
        assert secret not in span.to_json()


def test_one_enrollment_is_one_trace_with_a_span_per_step_and_never_the_challenge(service, keys):
    issued_before = otel_capture.total("scep.enrollments", outcome="issued")
    result, enrollment = enroll(service, keys.new())

    assert result.status is PkiStatus.SUCCESS
    root, children = _one_trace(enrollment.transaction_id)
    assert {span.name for span in children} == STEPS
    assert all(span.parent.span_id == root.context.span_id for span in children)
    assert root.attributes[telemetry.ATTR_OUTCOME] == "issued"
    assert root.attributes[telemetry.ATTR_MESSAGE_TYPE] == "PKCS_REQ"
    assert root.attributes[telemetry.ATTR_KEY_CUSTODY] == "local"
    assert telemetry.ATTR_FAIL_INFO not in root.attributes
    _assert_nowhere([root, *children], CHALLENGE)
    assert otel_capture.total("scep.enrollments", outcome="issued") == issued_before + 1


def test_a_refused_enrollment_records_its_fail_info(service, keys):
    failed_before = otel_capture.total("scep.enrollments", outcome="failed", fail_info="badRequest")
    result, enrollment = enroll(service, keys.new(), challenge=WRONG_CHALLENGE)

    assert result.status is PkiStatus.FAILURE
    root, children = _one_trace(enrollment.transaction_id)
    assert root.attributes[telemetry.ATTR_OUTCOME] == "failed"
    assert root.attributes[telemetry.ATTR_FAIL_INFO] == "badRequest"
    assert telemetry.STEP_SIGN_CERTIFICATE not in {span.name for span in children}
    _assert_nowhere([root, *children], WRONG_CHALLENGE)
    assert otel_capture.total("scep.enrollments", outcome="failed", fail_info="badRequest") == failed_before + 1


def test_a_long_transaction_id_is_bounded(service, keys):
    transaction_id = "A" * (MAX_VALUE_CHARS + 56)  # the codec takes transactionIDs of up to 256 characters
    enroll(service, keys.new(), transaction_id=transaction_id)
    root = next(span for span in otel_capture.finished_spans() if span.name == telemetry.ENROLLMENT_SPAN)
    recorded = root.attributes[telemetry.ATTR_TRANSACTION_ID]
    assert recorded == "A" * MAX_VALUE_CHARS + "...(56 more characters)"


def test_days_to_expiry_come_from_the_keys_the_service_used(service, keys):
    enroll(service, keys.new())
    ca_days = otel_capture.gauge("scep.ca.days_to_expiry")
    ra_days = otel_capture.gauge("scep.ra.days_to_expiry")
    assert len(ca_days) == 1 and len(ra_days) == 1
    assert 0 < ra_days[0] <= ca_days[0]


# --- settings ---

CONNECTION = "InstrumentationKey=00000000-0000-0000-0000-000000000000;IngestionEndpoint=https://127.0.0.1:1/"
BASE = {"SCEP_CHALLENGE": "x"}
CLIENT_ID = "11111111-2222-3333-4444-555555555555"
CONNECTION_SETTING = "APPLICATIONINSIGHTS_CONNECTION_STRING"
AUTHENTICATION_SETTING = "APPLICATIONINSIGHTS_AUTHENTICATION_STRING"


def test_telemetry_is_off_locally_and_on_in_azure_by_default():
    assert load_settings(BASE).telemetry.exporter == exporters.OFF
    azure = load_settings(
        {
            **BASE,
            "APPLICATIONINSIGHTS_CONNECTION_STRING": CONNECTION,
            "APPLICATIONINSIGHTS_AUTHENTICATION_STRING": f"ClientId={CLIENT_ID};Authorization=AAD",
        }
    ).telemetry
    assert azure.exporter == exporters.AZURE_MONITOR and azure.entra
    assert azure.entra_client_id == CLIENT_ID
    assert load_settings({**BASE, "SCEP_TELEMETRY": "otlp"}).telemetry.exporter == exporters.OTLP


@pytest.mark.parametrize(
    "values, named",
    [
        ({"SCEP_TELEMETRY": "loud"}, "SCEP_TELEMETRY"),
        ({"SCEP_OTLP_ENDPOINT": "127.0.0.1:4318"}, "SCEP_OTLP_ENDPOINT"),
        ({CONNECTION_SETTING: "IngestionEndpoint=https://127.0.0.1:1/"}, CONNECTION_SETTING),
        ({AUTHENTICATION_SETTING: "Authorization=Basic"}, AUTHENTICATION_SETTING),
        ({AUTHENTICATION_SETTING: "ClientId"}, AUTHENTICATION_SETTING),
    ],
)
def test_a_wrong_telemetry_setting_is_named(values, named):
    with pytest.raises(ConfigError) as raised:
        load_settings({**BASE, **values})
    assert raised.value.setting == named


def test_azure_monitor_gets_the_connection_string_and_the_identitys_credential(monkeypatch):
    """The distro is called with the Entra credential built for the authentication string's client id."""
    import azure.monitor.opentelemetry as distro

    calls: list[dict] = []
    monkeypatch.setattr(distro, "configure_azure_monitor", lambda **options: calls.append(options))
    settings = exporters.TelemetrySettings(exporters.AZURE_MONITOR, "", CONNECTION, "client-1", True)
    built: list[str | None] = []
    exporters._install(settings, lambda client_id: built.append(client_id) or "credential")

    assert built == ["client-1"]
    assert calls[0]["connection_string"] == CONNECTION and calls[0]["credential"] == "credential"
    assert calls[0]["disable_logging"] is True
