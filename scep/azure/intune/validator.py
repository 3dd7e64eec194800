"""Intune decides who may enrol: validateRequest before issuing, successNotification before delivering.

Fail closed: anything but an explicit "Success" from Intune is a rejection. The challenge is a secret and
never reaches a log line or a failInfoText; log lines carry the SCEP transactionID instead.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timezone

from cryptography import x509

from scep import PRODUCT
from scep.azure.intune.client import (
    MAX_ERROR_DESCRIPTION,
    IntuneAuthenticationError,
    IntuneClient,
    IntuneError,
    IntuneResult,
    IntuneServiceNotFound,
)
from scep.challenge import EnrollmentRequest, HResult, NotificationFailed, Verdict
from scep.core.der import fingerprint
from scep.core.protocol import FailInfo

__all__ = [
    "FAIL_INFO_BY_CODE",
    "HResult",
    "IntuneCall",
    "IntuneCalls",
    "IntuneValidator",
    "UNAVAILABLE",
    "serial_number_hex",
]

logger = logging.getLogger("scep.azure.intune.validator")

UNAVAILABLE = "Intune validation unavailable"

# Intune's answer -> the SCEP failInfo the device gets (RFC 8894 section 3.2.1.4.5).
FAIL_INFO_BY_CODE: dict[str, FailInfo] = {
    # The CSR or its challenge cannot be read.
    "CertificateRequestDecodingFailed": FailInfo.BAD_REQUEST,
    "ChallengePasswordMissing": FailInfo.BAD_REQUEST,
    "ChallengeDeserializationError": FailInfo.BAD_REQUEST,
    "ChallengeDecryptionError": FailInfo.BAD_REQUEST,
    "ChallengeDecodingError": FailInfo.BAD_REQUEST,
    # Time: the challenge is too old, or its timestamps are not plausible.
    "ChallengeInvalidTimestamp": FailInfo.BAD_TIME,
    "ChallengeExpired": FailInfo.BAD_TIME,
    # The CSR asks for something other than what the Intune profile allows.
    "SubjectNameMissing": FailInfo.BAD_REQUEST,
    "SubjectNameMismatch": FailInfo.BAD_REQUEST,
    "SubjectAltNameMissing": FailInfo.BAD_REQUEST,
    "SubjectAltNameMismatch": FailInfo.BAD_REQUEST,
    "KeyUsageMismatch": FailInfo.BAD_REQUEST,
    "KeyLengthMismatch": FailInfo.BAD_REQUEST,
    "EnhancedKeyUsageMissing": FailInfo.BAD_REQUEST,
    "EnhancedKeyUsageMismatch": FailInfo.BAD_REQUEST,
    "AadKeyIdentifierListMissing": FailInfo.BAD_REQUEST,
    "RegisteredKeyMismatch": FailInfo.BAD_REQUEST,
    "ScepProfileNoLongerTargetedToTheClient": FailInfo.BAD_REQUEST,
    "BadCertificateRequestIdInChallenge": FailInfo.BAD_REQUEST,
    "BadDeviceIdInChallenge": FailInfo.BAD_REQUEST,
    "BadUserIdInChallenge": FailInfo.BAD_REQUEST,
    # Integrity: a signature (the CSR's, the challenge's, or the signing certificate) does not check out.
    "SignatureValidationFailed": FailInfo.BAD_MESSAGE_CHECK,
    "SigningCertThumbprintMismatch": FailInfo.BAD_MESSAGE_CHECK,
}


@dataclass(frozen=True)
class IntuneCall:
    """The outcome of one call to Intune, as the status page shows it (never the challenge).

    answered: Intune answered (with any code); error: the IntuneError's class when it did not (token, discovery,
    connection or HTTP trouble), with its first line in detail.
    """

    operation: str  # "validateRequest" or "successNotification"
    at: datetime
    answered: bool
    code: str = ""
    error: str = ""
    detail: str = ""

    @property
    def token_failed(self) -> bool:
        return self.error == IntuneAuthenticationError.__name__

    @property
    def discovery_failed(self) -> bool:
        return self.error == IntuneServiceNotFound.__name__


class IntuneCalls:
    """The last outcome of each Intune operation in this process: what the status page reads, so that a page
    view never calls Intune."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[str, IntuneCall] = {}

    def answered(self, operation: str, result: IntuneResult) -> None:
        self._record(IntuneCall(operation, datetime.now(timezone.utc), True, code=result.code))

    def failed(self, operation: str, error: IntuneError, detail: str) -> None:
        first_line = detail.splitlines()[0] if detail else ""
        self._record(IntuneCall(operation, datetime.now(timezone.utc), False, error=type(error).__name__,
                                detail=first_line[:MAX_ERROR_DESCRIPTION]))

    def last(self, operation: str) -> IntuneCall | None:
        with self._lock:
            return self._last.get(operation)

    def _record(self, call: IntuneCall) -> None:
        with self._lock:
            self._last[call.operation] = call


class IntuneValidator:
    """ChallengeValidator backed by Intune's SCEP validation service.

    allow_renewal_without_challenge: accept a RenewalReq that carries no challenge (signed by a certificate
    this CA issued, already verified by the SCEP layer) without asking Intune. Intune devices renew with a
    fresh challenge, so this is off by default; Intune is not notified about such renewals because it never
    validated them.
    ca_configuration / certificate_authority: the strings reported in successNotification (Intune shows them
    and hands caConfiguration back in revocation requests). Defaults: "<product>\\<issuing CA common name>"
    and the issuing CA's common name.
    """

    name = "intune"
    requires_notification = True

    def __init__(
        self,
        client: IntuneClient,
        *,
        allow_renewal_without_challenge: bool = False,
        ca_configuration: str | None = None,
        certificate_authority: str | None = None,
    ) -> None:
        self.client = client
        self.allow_renewal_without_challenge = allow_renewal_without_challenge
        self.ca_configuration = ca_configuration
        self.certificate_authority = certificate_authority
        self.calls = IntuneCalls()

    def validate(self, request: EnrollmentRequest) -> Verdict:
        if not request.challenge:
            return self._without_challenge(request)
        try:
            result = self.client.validate_request(request.transaction_id, request.csr_der)
        except IntuneError as error:
            self._call_failed("validateRequest", "Intune validation", request, error)
            return Verdict(False, FailInfo.BAD_REQUEST, UNAVAILABLE)
        self.calls.answered("validateRequest", result)
        return self._verdict(request, result)

    def _without_challenge(self, request: EnrollmentRequest) -> Verdict:
        if request.renewal and self.allow_renewal_without_challenge:
            logger.info("Renewal accepted without a challenge: transaction=%s", request.transaction_id)
            return Verdict(True, reason="renewal signed by a certificate this CA issued", validator=self)
        reason = "renewal without a challenge is not allowed" if request.renewal else "challenge password missing"
        logger.info("Intune validation skipped: transaction=%s reason=%s", request.transaction_id, reason)
        return Verdict(False, FailInfo.BAD_REQUEST, reason)

    def _verdict(self, request: EnrollmentRequest, result: IntuneResult) -> Verdict:
        logger.info(
            "Intune validation: transaction=%s code=%s activity=%s description=%s",
            request.transaction_id,
            result.code,
            result.activity_id,
            _redact(result.error_description, request),
        )
        if result.succeeded:
            return Verdict(True, reason="Intune validated the request", validator=self)
        fail_info = FAIL_INFO_BY_CODE.get(result.code)
        if fail_info is None:
            logger.warning("Intune answered an unknown code: transaction=%s", request.transaction_id)
            return Verdict(False, FailInfo.BAD_REQUEST, f"{UNAVAILABLE}: unexpected answer")
        return Verdict(False, fail_info, f"Intune rejected the request: {result.code}")

    def notify_success(self, request: EnrollmentRequest, certificate: x509.Certificate) -> None:
        if self._validated_locally(request):
            return
        issuer_name = _common_name(certificate.issuer) or certificate.issuer.rfc4514_string()
        try:
            result = self.client.success_notification(
                request.transaction_id,
                request.csr_der,
                thumbprint=fingerprint(certificate, "sha1"),
                serial_number=serial_number_hex(certificate),
                expires=certificate.not_valid_after_utc,
                issuing_ca=certificate.issuer.rfc4514_string(),
                ca_configuration=self.ca_configuration or f"{PRODUCT}\\{issuer_name}",
                certificate_authority=self.certificate_authority or issuer_name,
            )
        except IntuneError as error:
            self._call_failed("successNotification", "Intune success notification", request, error)
            raise NotificationFailed(f"Intune success notification failed: {type(error).__name__}") from error
        self.calls.answered("successNotification", result)
        logger.info(
            "Intune success notification: transaction=%s code=%s activity=%s",
            request.transaction_id,
            result.code,
            result.activity_id,
        )
        if not result.succeeded:
            raise NotificationFailed(f"Intune refused the success notification: {result.code}")

    def notify_failure(self, request: EnrollmentRequest, hresult: int, description: str) -> None:
        if self._validated_locally(request):
            return
        text = _redact(description, request)[:MAX_ERROR_DESCRIPTION] or "Certificate issuance failed"
        try:
            result = self.client.failure_notification(request.transaction_id, request.csr_der, hresult, text)
        except Exception as error:  # best effort: the device already gets its failure answer
            logger.warning(
                "Intune failure notification failed: transaction=%s error=%s",
                request.transaction_id,
                type(error).__name__,
            )
            return
        logger.info(
            "Intune failure notification: transaction=%s hresult=0x%08X code=%s activity=%s",
            request.transaction_id,
            hresult & 0xFFFFFFFF,
            result.code,
            result.activity_id,
        )

    def _call_failed(self, operation: str, what: str, request: EnrollmentRequest, error: IntuneError) -> None:
        """Record a failed Intune call for the status page and log it, the request's challenge redacted."""
        detail = _redact(str(error), request)
        self.calls.failed(operation, error, detail)
        logger.warning(
            "%s failed: transaction=%s error=%s: %s", what, request.transaction_id, type(error).__name__, detail
        )

    def _validated_locally(self, request: EnrollmentRequest) -> bool:
        # Renewals accepted without a challenge never went through Intune: there is nothing to report.
        return request.renewal and not request.challenge and self.allow_renewal_without_challenge


def serial_number_hex(certificate: x509.Certificate) -> str:
    """The serial as upper-case hex of its DER INTEGER bytes (what .NET's SerialNumber shows, so a
    leading 00 when the top bit is set); Intune hands this string back in revocation requests."""
    serial = certificate.serial_number
    length = serial.bit_length() // 8 + 1
    return serial.to_bytes(length, "big", signed=True).hex().upper()


def _common_name(name: x509.Name) -> str | None:
    values = name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if not values:
        return None
    value = values[0].value
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _redact(text: str, request: EnrollmentRequest) -> str:
    """Remove the challenge from text coming from elsewhere before it is logged or sent on."""
    text = text or ""
    if request.challenge and request.challenge in text:
        text = text.replace(request.challenge, "[challenge]")
    return text
