"""The product's traces and metrics, through the OpenTelemetry API only.

The API is a no-op until the composition root installs an SDK (scep.azure.telemetry: Azure Monitor in Azure,
console or OTLP locally), so the core and the backends record unconditionally and stay free of exporters. Until a
tracer provider is installed no span is started at all (the API's proxy would only hand out non-recording spans,
at a few microseconds each), and span attributes are built only for a span that records.

Traces: one span per PKIOperation (ENROLLMENT_SPAN), keyed by the SCEP transactionID, with a child span per step
(STEP_*). Client-controlled text (the transactionID) is bounded and escaped as log records are (scep.logs.clean).
Nothing here takes a challenge, a CSR or a key: the attributes are protocol fields, outcomes and durations.

Metrics here: scep.enrollments, scep.ca.days_to_expiry and scep.ra.days_to_expiry; the Key Vault and Intune
backends' own (scep.keyvault.*, scep.intune.*) are in scep.azure.telemetry. Their names are what infra/workbook.json
and the alerts in infra/modules/observability.bicep query.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from datetime import datetime, timezone

from cryptography import x509
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Span, Status, StatusCode

from scep.core.protocol import FailInfo, MessageType, PkiStatus
from scep.logs import clean

INSTRUMENTATION_NAME = "scep"

ENROLLMENT_SPAN = "scep.PKIOperation"
STEP_UNWRAP = "scep.unwrap"
STEP_VALIDATE = "scep.validate"
STEP_SIGN_CERTIFICATE = "scep.sign_certificate"
STEP_NOTIFY = "scep.notify"
STEP_SIGN_REPLY = "scep.sign_reply"

ATTR_TRANSACTION_ID = "scep.transaction_id"
ATTR_MESSAGE_TYPE = "scep.message_type"
ATTR_OUTCOME = "scep.outcome"
ATTR_FAIL_INFO = "scep.fail_info"
ATTR_KEY_CUSTODY = "scep.key_custody"
ATTR_VALIDATOR = "scep.validator"

OUTCOME_ISSUED = "issued"
OUTCOME_FAILED = "failed"
OUTCOME_PENDING = "pending"
_OUTCOMES = {PkiStatus.SUCCESS: OUTCOME_ISSUED, PkiStatus.FAILURE: OUTCOME_FAILED, PkiStatus.PENDING: OUTCOME_PENDING}
ENROLLMENT_MESSAGES = frozenset({MessageType.PKCS_REQ, MessageType.RENEWAL_REQ, MessageType.CERT_POLL})

_tracer = trace.get_tracer(INSTRUMENTATION_NAME)
_meter = metrics.get_meter(INSTRUMENTATION_NAME)

ENROLLMENTS = _meter.create_counter(
    "scep.enrollments", unit="{enrollment}", description="Answers to PKCSReq, RenewalReq and CertPoll, by outcome"
)


# --- traces ---


class Enrollment:
    """The span of one PKIOperation, and what its outcome is counted by."""

    def __init__(self, span: Span) -> None:
        self.span = span
        self.message_type: int | None = None

    def identify(self, transaction_id: str, message_type: int) -> None:
        """Key the span by the transactionID (client text: bounded and escaped) and the message type."""
        self.message_type = message_type
        if not self.span.is_recording():
            return
        self.span.set_attribute(ATTR_TRANSACTION_ID, clean(transaction_id))
        self.span.set_attribute(ATTR_MESSAGE_TYPE, message_type_name(message_type))

    def finish(self, status: PkiStatus, fail_info: FailInfo | None) -> None:
        """The reply's outcome on the span and, for an enrollment message, in scep.enrollments."""
        outcome = _OUTCOMES[status]
        attributes = {"outcome": outcome}
        if fail_info is not None:
            attributes["fail_info"] = fail_info_name(fail_info)
        if self.span.is_recording():
            self.span.set_attribute(ATTR_OUTCOME, outcome)
            if fail_info is not None:
                self.span.set_attribute(ATTR_FAIL_INFO, attributes["fail_info"])
        if self.message_type in ENROLLMENT_MESSAGES:
            ENROLLMENTS.add(1, attributes)


_current: ContextVar[Enrollment | None] = ContextVar("scep_enrollment", default=None)


@contextmanager
def enrollment_span(key_custody: str) -> Iterator[Enrollment]:
    """The span of one PKIOperation; identify() adds transactionID and message type once the message is read."""
    with _span(ENROLLMENT_SPAN, {ATTR_KEY_CUSTODY: key_custody}) as span:
        enrollment = Enrollment(span)
        token = _current.set(enrollment)
        try:
            yield enrollment
        finally:
            _current.reset(token)


def identify(transaction_id: str, message_type: int) -> None:
    """Key the current PKIOperation's span (if any) by the request's transactionID and message type."""
    enrollment = _current.get()
    if enrollment is not None:
        enrollment.identify(transaction_id, message_type)


def step(name: str, **attributes: str) -> AbstractContextManager[Span]:
    """A child span of the current PKIOperation."""
    return _span(name, attributes)


_NO_SPAN = nullcontext(trace.INVALID_SPAN)


def _span(name: str, attributes: dict[str, str]) -> AbstractContextManager[Span]:
    """A span, or the shared non-recording one while no tracer provider is installed."""
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return _NO_SPAN
    return _recorded_span(name, attributes)


@contextmanager
def _recorded_span(name: str, attributes: dict[str, str]) -> Iterator[Span]:
    """A span that an exception marks failed by the exception's type only: its message could quote client input."""
    with _tracer.start_as_current_span(
        name, attributes=attributes, record_exception=False, set_status_on_exception=False
    ) as span:
        try:
            yield span
        except BaseException as error:
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
            raise


def message_type_name(message_type: int) -> str:
    try:
        return MessageType(message_type).name
    except ValueError:
        return str(message_type)


def fail_info_name(fail_info: FailInfo) -> str:
    """The failInfo as RFC 8894 names it (badAlg, badMessageCheck, badRequest, badTime, badCertId)."""
    first, *rest = fail_info.name.lower().split("_")
    return first + "".join(word.capitalize() for word in rest)


# --- certificate expiry, from the keys the service last used ---


class _Expiry:
    """The CA and RA certificates' ends as last seen by the service: the gauges read them, no key operation."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ends: dict[str, datetime] = {}

    def note(self, ca: x509.Certificate, ra: x509.Certificate) -> None:
        with self._lock:
            self._ends = {"ca": ca.not_valid_after_utc, "ra": ra.not_valid_after_utc}

    def days_left(self, which: str) -> float | None:
        with self._lock:
            end = self._ends.get(which)
        if end is None:
            return None
        return (end - datetime.now(timezone.utc)).total_seconds() / 86400.0


_expiry = _Expiry()
note_certificates = _expiry.note


def _gauge(which: str):
    def observe(options: CallbackOptions) -> Iterable[Observation]:
        days = _expiry.days_left(which)
        return [] if days is None else [Observation(days)]

    return observe


CA_DAYS_TO_EXPIRY = _meter.create_observable_gauge(
    "scep.ca.days_to_expiry", callbacks=[_gauge("ca")], unit="d", description="Days until the issuing CA expires"
)
RA_DAYS_TO_EXPIRY = _meter.create_observable_gauge(
    "scep.ra.days_to_expiry", callbacks=[_gauge("ra")], unit="d", description="Days until the RA certificate expires"
)
