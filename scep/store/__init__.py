"""The inventory: SCEP transactions and issued certificates. One interface, SQLite and Azure Tables behind it.

A transaction is claimed before any work is done on it, so two workers (or two instances) never issue twice
for one transactionID; the certificate is recorded before anyone sees it, so nothing issued is lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Protocol

MAX_REASON_CHARS = 1024  # a failure reason is recorded up to this length


def serial_text(serial: int) -> str:
    """Serial as fixed-width lowercase hex (RFC 5280 serials fit 20 octets), so text order is numeric order."""
    if serial < 0:
        raise ValueError("certificate serial numbers are positive")
    return f"{serial:040x}"


def utc(value: datetime) -> datetime:
    """An aware UTC datetime; naive values are taken to be UTC already (as cryptography's legacy accessors)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


class StoreError(Exception):
    """The store could not be reached or refused an operation."""


class SerialInUse(StoreError):
    """A certificate with this serial number is already recorded (pick another serial and re-sign)."""


class TxState(str, Enum):
    PROCESSING = "processing"
    ISSUED = "issued"
    FAILED = "failed"


class CertStatus(str, Enum):
    ISSUED = "issued"  # delivered (or deliverable) to the device
    CONFIRMING = "confirming"  # signed and recorded, waiting for the validator (Intune) to acknowledge it
    UNDELIVERED = "undelivered"  # signed and recorded, withheld from the device (to be revoked)


@dataclass(frozen=True)
class IssuedCertificate:
    serial: int
    transaction_id: str
    subject: str
    issuer_sha256: str  # hex SHA-256 of the issuing CA certificate
    not_before: datetime
    not_after: datetime
    thumbprint_sha1: str  # hex, as Intune reports it
    der: bytes
    status: CertStatus = CertStatus.ISSUED


class ClaimOutcome(str, Enum):
    CLAIMED = "claimed"  # caller owns the transaction now and must finish it (record_issued / record_failed)
    ISSUED = "issued"  # already issued: `certificate` is the answer (a retransmission)
    BUSY = "busy"  # another worker holds an unexpired lease: answer PENDING, the client polls
    KEY_MISMATCH = "key_mismatch"  # the transactionID is taken by a different public key


@dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    transaction_id: str
    token: str | None = None  # lease token when CLAIMED
    certificate: IssuedCertificate | None = None  # when ISSUED


class Store(Protocol):
    def claim(self, transaction_id: str, key_id: str, lease: timedelta) -> Claim:
        """Atomically take a transaction. key_id identifies the requester's public key (hex SHA-256 of SPKI).

        A FAILED transaction, or a PROCESSING one whose lease expired, may be claimed again by the same key.
        """
        ...

    def record_issued(self, claim: Claim, certificate: IssuedCertificate) -> None:
        """Insert the certificate (serial unique: SerialInUse otherwise) and mark the transaction ISSUED.

        The certificate row is written first, so it survives even if the lease was lost meanwhile
        (StoreError is raised then, and the certificate is recorded as UNDELIVERED).
        """
        ...

    def record_failed(self, claim: Claim, fail_info: int, reason: str) -> None: ...

    def mark_undelivered(self, serial: int) -> None: ...

    def mark_delivered(self, serial: int) -> None:
        """Flip a certificate recorded as CONFIRMING to ISSUED (after the validator acknowledged it)."""
        ...

    def certificate_by_serial(self, serial: int) -> IssuedCertificate | None: ...

    def certificate_for_transaction(self, transaction_id: str) -> IssuedCertificate | None: ...

    def transaction_state(self, transaction_id: str) -> TxState | None: ...

    def ping(self) -> None:
        """Raise StoreError when the store is unreachable (for health and doctor)."""
        ...

    def describe(self) -> str: ...
