"""Intune's revocation requests, end to end: download them, revoke each certificate, report back.

When a device is retired or wiped, or leaves the SCEP profile's assignment, Intune queues a request to revoke its
certificate; the CA collects the queue from PkiConnectorFEService (downloadRevocationRequests) and answers every
request (uploadRevocationResults). `run_cycle` does that once; the Functions timer, `scep serve`'s background job
and `scep intune revocations` all call it.

One cycle at a time: the cycle takes the store's transaction claim on CYCLE_TRANSACTION (atomic in SQLite and
Azure Tables, as the RA renewal does), so two instances never work through the same requests at once; a cycle
that finds the claim taken does nothing. A crashed cycle blocks the next for at most CYCLE_LEASE.

Nothing revoked twice, nothing lost: each request's result is recorded in the store (keyed by its requestContext,
the first recorded result wins) before it is reported, and forgotten only once Intune accepted the upload
({"value": true}). A failed upload (HTTP error, refused token, {"value": false}) leaves the results recorded; the
next cycle reports them again, and a request Intune sends again meanwhile gets its recorded answer, not a second
revocation (which would read "already revoked").

Answers (errorCode, Intune-Resource-Access CARequestErrorCodes):
  "0"   revoked now, reason cessationOfOperation (Intune's request names no reason; RFC 5280 5.3.1: "no longer
        needed for the purpose for which it was issued", no suspicion on the key, as for a retired device)
  4002  serialNumber is not a hexadecimal serial number
  4004  no certificate with that serial was issued by this CA (or its issuer is not the issuerName asked for)
  4005  the certificate was revoked already (by an operator, or as withheld), a conflict
  4101  the store failed: retryable, Intune asks again later
After the revocations, `publish` is called once: the composition root hands in the revocation core's
publish_now, which publishes the CRLs the revocations made due (backends do not reach into the core); OCSP needs
no step, as its answers follow the stored record. If custody or the store fails to
publish, the revocations stand and the next scheduled publication lists them.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import Enum

from cryptography import x509

from scep.azure.intune.client import (
    MAX_REVOCATION_REQUESTS,
    IntuneClient,
    IntuneError,
    RevocationRequest,
    RevocationResult,
)
from scep.store import ClaimOutcome, RequestResult, RevocationReason, Store, StoreError

log = logging.getLogger("scep.azure.intune.revocation")

# Longer than any transactionID a device can send (at most 256 characters): no device can take this transaction.
CYCLE_TRANSACTION = "maintenance:intune-revocations:".ljust(300, "-")
CYCLE_CLAIM_KEY = "scep-intune-revocations"
CYCLE_LEASE = timedelta(minutes=10)
INTUNE_REASON = RevocationReason.CESSATION_OF_OPERATION
MAX_UNREPORTED = 1000  # recorded results reported again per cycle
_HEX = re.compile(r"[0-9a-f]{1,64}")


class ErrorCode(str, Enum):
    """The CARequestErrorCodes values this CA answers with."""

    NONE = "0"
    PARAMETER_DATA_INVALID = "4002"
    CERTIFICATE_NOT_FOUND = "4004"
    CONFLICT = "4005"
    SERVICE_UNAVAILABLE = "4101"


@dataclass(frozen=True)
class CycleReport:
    """What one cycle did. ran is False when another instance held the cycle."""

    ran: bool
    downloaded: int = 0
    revoked: tuple[int, ...] = ()  # serials revoked by this cycle
    results: tuple[RequestResult, ...] = ()  # every result sent (new and recorded earlier)
    reported: bool = False  # Intune accepted the results
    crl_published: bool | None = None  # None: nothing revoked, nothing to publish
    problems: tuple[str, ...] = ()


def run_cycle(
    client: IntuneClient,
    store: Store,
    publish: Callable[[], bool],
    max_requests: int = MAX_REVOCATION_REQUESTS,
    now: datetime | None = None,
) -> CycleReport:
    """Download Intune's revocation requests, revoke, report back, and call publish (the CRL publication; False
    when it failed) after revoking anything: once, on one instance."""
    claim = store.claim(CYCLE_TRANSACTION, CYCLE_CLAIM_KEY, CYCLE_LEASE)
    if claim.outcome is not ClaimOutcome.CLAIMED:
        log.info("Intune revocations: another instance is running the cycle (%s)", claim.outcome.value)
        return CycleReport(ran=False)
    report = CycleReport(ran=True, problems=("the cycle stopped",))
    try:
        report = _cycle(client, store, publish, max_requests, now or datetime.now(timezone.utc))
        return report
    finally:
        store.release(claim, "; ".join(report.problems) or "done")


def _cycle(
    client: IntuneClient, store: Store, publish: Callable[[], bool], max_requests: int, now: datetime
) -> CycleReport:
    activity = f"revocations-{uuid.uuid4()}"
    problems: list[str] = []
    answers = {result.context: result for result in store.unreported_request_results(MAX_UNREPORTED)}
    try:
        requests = client.download_revocation_requests(max_requests, None, activity)
    except IntuneError as error:
        requests = []
        problems.append(f"download failed: {error}")
    revoked: list[int] = []
    for request in requests:
        if request.request_context in answers:
            continue  # answered before and not yet reported: the same answer again
        result, serial = _answer(store, request, now)
        answers[request.request_context] = _kept(store, result)
        if serial is not None and answers[request.request_context] == result:
            revoked.append(serial)
    reported = _report(client, store, list(answers.values()), activity, problems)
    published = publish() if revoked else None
    if published is False:
        problems.append("revocations recorded, CRL not published now (the scheduled publication lists them)")
    report = CycleReport(True, len(requests), tuple(revoked), tuple(answers.values()), reported, published,
                         tuple(problems))
    _log(report)
    return report


def _answer(store: Store, request: RevocationRequest, now: datetime) -> tuple[RequestResult, int | None]:
    """The result of one request and the serial it revoked (None when it revoked nothing)."""
    context = request.request_context
    serial = parse_serial(request.serial_number)
    if serial is None:
        return _failed(context, ErrorCode.PARAMETER_DATA_INVALID, "serialNumber is not hexadecimal"), None
    try:
        record = store.certificate_by_serial(serial)
        if record is None or not _issued_by(record.der, request.issuer_name):
            return _failed(context, ErrorCode.CERTIFICATE_NOT_FOUND, "no such certificate from this CA"), None
        revoked = store.revoke(serial, INTUNE_REASON, now)
    except StoreError as error:
        log.error("Intune revocation of serial %x: the store failed: %s", serial, error)
        return _failed(context, ErrorCode.SERVICE_UNAVAILABLE, "the certificate store is unavailable"), None
    if revoked.already:
        first = revoked.revocation
        return _failed(context, ErrorCode.CONFLICT, f"already revoked at {first.revoked_at.isoformat()}"), None
    log.warning("certificate %x revoked (%s) at Intune's request", serial, INTUNE_REASON.value)
    return RequestResult(context, True, ErrorCode.NONE.value, ""), serial


def _failed(context: str, code: ErrorCode, message: str) -> RequestResult:
    return RequestResult(context, False, code.value, message)


def _kept(store: Store, result: RequestResult) -> RequestResult:
    """Record result until it is reported; the one recorded first when another cycle got there before."""
    try:
        return store.record_request_result(result)
    except StoreError as error:
        log.error("Intune revocations: could not record the result of %s: %s", result.context, error)
        return result  # reported now all the same; if that fails too, Intune still has the request


def _report(
    client: IntuneClient, store: Store, results: Sequence[RequestResult], activity: str, problems: list[str]
) -> bool:
    if not results:
        return False
    try:
        client.upload_revocation_results(
            [RevocationResult(r.context, r.succeeded, r.error_code, r.error_message) for r in results], activity
        )
    except IntuneError as error:
        problems.append(f"upload failed, {len(results)} results kept for the next cycle: {error}")
        return False
    try:
        store.forget_request_results([result.context for result in results])
    except StoreError as error:  # reported: sending them once more is harmless
        problems.append(f"reported results not forgotten: {error}")
    return True


def parse_serial(text: str) -> int | None:
    """Intune's serialNumber (hex, as successNotification reported it; colons and spaces tolerated) -> int."""
    digits = re.sub(r"[\s:]", "", text).lower()
    if not _HEX.fullmatch(digits) or int(digits, 16) == 0:
        return None
    return int(digits, 16)


def _issued_by(der: bytes, issuer_name: str | None) -> bool:
    """True when issuer_name is empty or names the certificate's issuer (as successNotification reported it,
    RFC 4514; case and spaces around commas aside)."""
    if not issuer_name:
        return True
    issuer = x509.load_der_x509_certificate(der).issuer.rfc4514_string()
    return _plain_name(issuer) == _plain_name(issuer_name)


def _plain_name(name: str) -> str:
    return re.sub(r"\s*,\s*", ",", name.strip()).lower()


def _log(report: CycleReport) -> None:
    failed = sum(1 for result in report.results if not result.succeeded)
    line = "Intune revocations: %d requests, %d revoked, %d results (%d failed), reported %s"
    log.info(line, report.downloaded, len(report.revoked), len(report.results), failed, report.reported)
    for problem in report.problems:
        log.error("Intune revocations: %s", problem)
