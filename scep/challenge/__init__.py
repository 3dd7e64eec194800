"""Who may enrol: one interface (validate, then notify success or failure), implemented by the static
challenge and by Intune's validation service."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

from cryptography import x509
from cryptography.x509.oid import AttributeOID

from scep.core.protocol import FailInfo


class HResult(IntEnum):
    """The HRESULTs this CA reports to Intune in failureNotification (shown in the Intune admin center).

    Standard Windows codes, so administrators can look them up; docs/intune.md explains when each is sent.
    """

    E_FAIL = 0x80004005  # the CA could not issue (key custody or store failure; step-ca signing failure)
    CERTSRV_E_UNSUPPORTED_CERT_TYPE = 0x80094800  # the request asks for what the issuance profile refuses


def challenge_password(csr: x509.CertificateSigningRequest) -> str | None:
    """The CSR's challengePassword attribute as text, or None when it is absent, unreadable or empty."""
    try:
        value = csr.attributes.get_attribute_for_oid(AttributeOID.CHALLENGE_PASSWORD).value
    except (x509.AttributeNotFound, ValueError):
        return None
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return text or None


@dataclass(frozen=True)
class EnrollmentRequest:
    """What a validator may look at. `challenge` is a secret: never log it."""

    transaction_id: str
    csr: x509.CertificateSigningRequest
    csr_der: bytes
    challenge: str | None
    renewal: bool  # a RenewalReq whose signer certificate this CA issued and which verified


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    fail_info: FailInfo = FailInfo.BAD_REQUEST
    reason: str = ""  # safe to log and to send as failInfoText: never contains the challenge
    validator: ChallengeValidator | None = None  # who accepted, and so who must be notified


class NotificationFailed(Exception):
    """The success notification did not go through: the certificate must not be delivered."""


class ChallengeValidator(Protocol):
    name: str
    # True when the validator must hear of the issued certificate before the device may have it (Intune):
    # the certificate is then recorded as undelivered until notify_success returns.
    requires_notification: bool

    def validate(self, request: EnrollmentRequest) -> Verdict:
        """Decide whether this request may be issued. Fail closed on any doubt."""
        ...

    def notify_success(self, request: EnrollmentRequest, certificate: x509.Certificate) -> None:
        """Report the issued certificate; raise NotificationFailed when the report did not go through."""
        ...

    def notify_failure(self, request: EnrollmentRequest, hresult: int, description: str) -> None:
        """Report a failure after a successful validation (best effort, never raises)."""
        ...
