"""The inventory: SCEP transactions and issued certificates. One interface, SQLite and Azure Tables behind it.

A transaction is claimed before any work is done on it, so two workers (or two instances) never issue twice
for one transactionID; the certificate is recorded before anyone sees it, so nothing issued is lost.

Revocation. Every certificate records the CA generation that issued it (`issuer_sha256`, the lower-case hex
SHA-256 of the issuing CA certificate's DER; records written before revocation existed carry it too). Revoking
is final (no certificateHold): `revoke(serial, reason, when)` sets the status REVOKED with its time and reason,
keeps the first time and reason when called again (`Revoked.already` says so) and raises UnknownSerial for a
serial never recorded. Each CA generation has a revocation *revision*, a counter raised by every revocation of
one of its certificates: a CRL records the revision it covers, so "a revocation happened since the last CRL" is
one comparison (`revocation_revision(ca) > latest_crl(ca).revision`).

CRLs. `latest_crl(ca)` is the newest published CRL of a CA generation; `save_crl(crl)` stores a CRL only if
its cRLNumber is higher than the stored one (compare-and-set: a transaction in SQLite, an ETag in Tables) and
says whether it did, so concurrent publishers never move the number backwards and the loser publishes again if
its CRL would have missed a revocation.

Inventory. `find_certificates(CertificateQuery(...))` filters by serial, subject prefix, status, issuing CA and
expiry, one page at a time (`CertificatePage.next_page` is an opaque token for the next call). The order is the
backend's own (SQLite: expiry, then serial; Tables: serial) but stable, and pages neither repeat nor skip. A
subjectAltName value (`san`, whole and any case) or a SHA-1 thumbprint is found through a lookup the store writes
with each certificate, so it costs a few reads however large the inventory.

Enrollment outcomes. The store counts what it was asked to record per hour (issued, failed, and pending: a claim
found the transaction busy) and keeps one row per failure with its failInfo and reason, for the admin page
(`enrollment_counts(since)`, `recent_failures(limit)`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Protocol

from cryptography import x509

MAX_REASON_CHARS = 1024  # a failure reason is recorded up to this length


def serial_text(serial: int) -> str:
    """Serial as fixed-width lowercase hex (RFC 5280 serials fit 20 octets), so text order is numeric order."""
    if serial < 0:
        raise ValueError("certificate serial numbers are positive")
    return f"{serial:040x}"


def serial_hex(serial: int) -> str:
    """As `openssl x509 -serial` prints it: upper-case hex, an even number of digits."""
    digits = f"{serial:X}"
    return digits.zfill(len(digits) + len(digits) % 2)


def utc(value: datetime) -> datetime:
    """An aware UTC datetime; naive values are taken to be UTC already (as cryptography's legacy accessors)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def prefix_end(prefix: str) -> str:
    """The smallest string above every string that starts with prefix (for a range scan on an index)."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


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
    REVOKED = "revoked"  # final: no other status is ever set again


class RevocationReason(str, Enum):
    """RFC 5280 CRLReason values this CA uses; the values are cryptography's `x509.ReasonFlags` values.

    certificateHold and removeFromCRL are left out on purpose: a revocation here is never undone.
    """

    UNSPECIFIED = "unspecified"
    KEY_COMPROMISE = "keyCompromise"
    CA_COMPROMISE = "cACompromise"
    AFFILIATION_CHANGED = "affiliationChanged"
    SUPERSEDED = "superseded"
    CESSATION_OF_OPERATION = "cessationOfOperation"  # also: withheld certificates, never delivered
    PRIVILEGE_WITHDRAWN = "privilegeWithdrawn"


class UnknownSerial(StoreError):
    """No certificate with this serial number is recorded."""


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
    revoked_at: datetime | None = None  # set with status REVOKED
    revocation_reason: RevocationReason | None = None


@dataclass(frozen=True)
class Revocation:
    serial: int
    revoked_at: datetime
    reason: RevocationReason


@dataclass(frozen=True)
class Revoked:
    """What revoke() did: `revocation` is the recorded one (the first, when `already` revoked before)."""

    revocation: Revocation
    already: bool


@dataclass(frozen=True)
class RevocationList:
    """The revoked certificates of one CA generation, read together with the revision they cover."""

    revision: int
    entries: tuple[Revocation, ...]


@dataclass(frozen=True)
class StoredCrl:
    """A signed CRL of one CA generation as published: number is its cRLNumber, revision the revocation
    revision of that CA it covers."""

    issuer_sha256: str
    number: int
    revision: int
    this_update: datetime
    next_update: datetime
    der: bytes


@dataclass(frozen=True)
class CertificateQuery:
    """Inventory filters (all optional, combined with AND); subject_prefix matches the start of the RFC 4514
    subject string; expires_after/expires_before bound not_after (inclusive/exclusive)."""

    serial: int | None = None
    subject_prefix: str | None = None
    status: CertStatus | None = None
    issuer_sha256: str | None = None
    expires_after: datetime | None = None
    expires_before: datetime | None = None
    san: str | None = None  # one subjectAltName value (DNS name, e-mail, URI, IP, UPN), matched whole, any case
    thumbprint_sha1: str | None = None  # hex SHA-1 of the certificate, any case
    limit: int = 100
    page: str | None = None  # CertificatePage.next_page of the previous call


@dataclass(frozen=True)
class CertificatePage:
    items: tuple[IssuedCertificate, ...]
    next_page: str | None  # None: nothing more


MAX_PAGE_SIZE = 1000


class EnrollmentOutcome(str, Enum):
    """What an enrollment was answered, as the store counts it per hour."""

    ISSUED = "issued"  # record_issued
    FAILED = "failed"  # record_failed
    PENDING = "pending"  # a claim found the transaction busy: the device was told to poll


@dataclass(frozen=True)
class EnrollmentFailure:
    """One refused or failed enrollment, kept for the admin page (the reason never holds the challenge)."""

    at: datetime
    transaction_id: str
    fail_info: int
    reason: str


def hour_bucket(moment: datetime) -> str:
    """The hour an outcome is counted in, as sortable text: '2030-01-31T23'."""
    return f"{utc(moment):%Y-%m-%dT%H}"


def certificate_names(der: bytes) -> tuple[str, ...]:
    """The subjectAltName values of a certificate, lower-cased, for the SAN lookup; none when it has no SAN (or
    the DER does not parse, which a recorded certificate always does)."""
    try:
        extension = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (ValueError, x509.ExtensionNotFound):
        return ()
    names = {_name_text(name) for name in extension.value}
    return tuple(sorted(name.lower() for name in names if name))


def _name_text(name: x509.GeneralName) -> str:
    if isinstance(name, x509.OtherName):  # the UPN Intune puts in a profile is a UTF8String
        short_utf8 = name.value[:1] == b"\x0c" and len(name.value) > 1 and name.value[1] < 0x80
        return name.value[2:].decode("utf-8", "replace") if short_utf8 else ""
    if isinstance(name, x509.DirectoryName):
        return name.value.rfc4514_string()
    return str(name.value)


@dataclass(frozen=True)
class RequestResult:
    """The answer to one revocation request from outside (Intune's), kept until it has been reported back, so a
    report that failed is sent again without revoking again. `context` is the requester's request identifier."""

    context: str
    succeeded: bool
    error_code: str  # "0" when succeeded
    error_message: str


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

    def record_failed(self, claim: Claim, fail_info: int, reason: str) -> None:
        """End a claimed enrollment as failed (it may be claimed again) and count it as a failed enrollment."""
        ...

    def release(self, claim: Claim, note: str) -> None:
        """End a claim that was no enrollment (a maintenance job's lock) so it may be claimed again; counts nothing."""
        ...

    def count_pending(self) -> None:
        """Count an enrollment answered PENDING because another worker holds its transaction."""
        ...

    def mark_undelivered(self, serial: int) -> None:
        """Withhold a certificate (a REVOKED one stays REVOKED)."""
        ...

    def mark_delivered(self, serial: int) -> None:
        """Flip a certificate recorded as CONFIRMING to ISSUED (after the validator acknowledged it); a REVOKED
        one stays REVOKED."""
        ...

    def revoke(self, serial: int, reason: RevocationReason, when: datetime) -> Revoked:
        """Revoke a certificate (idempotent: the first time and reason stay); UnknownSerial if never recorded."""
        ...

    def revocations(self, issuer_sha256: str) -> RevocationList:
        """Every revoked certificate issued by that CA generation, with the revision the list covers at least."""
        ...

    def revocation_revision(self, issuer_sha256: str) -> int:
        """How many revocations that CA generation has seen (0 when none): one cheap read."""
        ...

    def latest_crl(self, issuer_sha256: str) -> StoredCrl | None: ...

    def save_crl(self, crl: StoredCrl) -> bool:
        """Store crl as the latest of its CA if its number is higher than the stored one's; False otherwise."""
        ...

    def find_certificates(self, query: CertificateQuery) -> CertificatePage: ...

    def certificate_by_serial(self, serial: int) -> IssuedCertificate | None: ...

    def certificate_for_transaction(self, transaction_id: str) -> IssuedCertificate | None: ...

    def transaction_state(self, transaction_id: str) -> TxState | None: ...

    def ping(self) -> None:
        """Raise StoreError when the store is unreachable (for health and doctor)."""
        ...

    def enrollment_counts(self, since: datetime) -> dict[EnrollmentOutcome, int]:
        """Outcomes counted in the hour buckets from since's hour on (every outcome present, 0 when none)."""
        ...

    def recent_failures(self, limit: int) -> tuple[EnrollmentFailure, ...]:
        """The last failed enrollments, newest first."""
        ...

    def record_request_result(self, result: RequestResult) -> RequestResult:
        """Keep result until forgotten, unless one is kept for its context already: the one kept."""
        ...

    def unreported_request_results(self, limit: int) -> tuple[RequestResult, ...]:
        """Results kept and not yet forgotten (at most limit)."""
        ...

    def forget_request_results(self, contexts: Sequence[str]) -> None:
        """Drop the results of these contexts (they have been reported); unknown contexts are ignored."""
        ...

    def describe(self) -> str: ...
