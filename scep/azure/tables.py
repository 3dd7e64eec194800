"""The Azure inventory: two tables in the function app's storage account, used by every instance at once.

There are no cross-entity transactions here, so the store relies on optimistic concurrency instead: a claim
creates the transaction entity (only one creator wins) or replaces it on the ETag it read, and finishing a
transaction is a merge on the ETag its claim produced. Whoever loses a race re-reads and decides again, so two
instances never both own one transaction and never both issue for it.

Keys: Transactions are partitioned by the SHA-256 of the transactionID (clients choose any characters, some of
which Tables forbids in keys); Certificates by the fixed-width hex serial. Every lookup is a point read.

Revocation lives in two more tables, partitioned by the issuing CA generation (`issuer_sha256`):
  {prefix}Revocations  one row per revoked serial (RowKey: the 40-digit hex serial) and a `revision` row, the
                       CA's revocation counter. A revocation inserts its row and raises the counter in one entity
                       group transaction (same partition), so the counter never misses a revocation; then the
                       certificate's own entity is merged to REVOKED. If an instance dies between the two, the
                       CRL already lists the serial and revoking it again completes the certificate entity.
                       Listing a CA's revoked serials is one partition scan (1,000 rows per round trip).
  {prefix}Crls         the latest CRL of each CA: a `latest` row naming the CRL's number and its chunks (rows
                       `chunk-<token>-<index>` of at most 48 KiB each, as a binary property holds 64 KiB and an
                       entity 1 MiB), written before the `latest` row is swapped on its ETag; the losing or
                       replaced chunks are deleted afterwards. A CRL of 100,000 entries (4.9 MB measured) is ~100 rows.
The results of Intune's revocation requests wait in {prefix}Revocations too, in partition `requests` (no CA's
partition has that name), one row per request (RowKey: the SHA-256 of its context), until they have been reported.

Enrollment outcomes and the certificate lookup live in two more tables:
  {prefix}Outcomes     counters per hour bucket (PartitionKey `count`, RowKey `<hour>|<outcome>`, raised on their
                       ETag with jittered retries; counting never fails an enrollment, a counter that loses every
                       race is logged and left) and one row per failure (PartitionKey `failure`, RowKey the inverted
                       time, so the newest come first). Counting 7 days reads at most 504 counter rows.
  {prefix}CertIndex    lookup rows `thumb-<sha1>` and `san-<SHA-256 of the lower-cased name>` (names may hold
                       characters keys forbid), RowKey the serial, written with the certificate. A search by SAN or
                       thumbprint reads that partition and then each certificate: a few point reads, whatever the
                       size of the inventory. Certificates recorded before this table existed have no lookup rows.

Inventory queries (`find_certificates`): a serial is a point read; every other filter (subject prefix, status,
issuer, expiry) is a scan of the Certificates table filtered by the service ($filter on the small properties),
in serial order. Tables reads at most 1,000 entities or 5 seconds per round trip and then returns a continuation
token, so a sparse filter over 100,000 certificates is up to ~100 round trips for a full sweep; a call here
makes at most MAX_SCAN_ROUND_TRIPS of them and hands back the continuation as its page token, so an admin page
stays bounded in time and the next page continues where the service stopped. ("Querying tables and entities",
"Query timeout and pagination", learn.microsoft.com/rest/api/storageservices.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from itertools import islice
from typing import Any

from azure.core import MatchConditions
from azure.core.credentials import AzureNamedKeyCredential, AzureSasCredential, TokenCredential
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import TableClient, TableServiceClient, TableTransactionError, UpdateMode

from scep.azure.errors import translated
from scep.store import (
    MAX_PAGE_SIZE,
    MAX_REASON_CHARS,
    CertificatePage,
    CertificateQuery,
    CertStatus,
    Claim,
    ClaimOutcome,
    EnrollmentFailure,
    EnrollmentOutcome,
    IssuedCertificate,
    RequestResult,
    Revocation,
    RevocationList,
    RevocationReason,
    Revoked,
    SerialInUse,
    StoredCrl,
    StoreError,
    TxState,
    UnknownSerial,
    certificate_names,
    hour_bucket,
    prefix_end,
    serial_text,
    utc,
)

log = logging.getLogger("scep.azure.tables")

MAX_PROPERTY_BYTES = 64 * 1024  # Azure Tables limit for one binary property
MAX_RACES = 8  # re-read-and-decide rounds before a claim or finish gives up
# Every revocation of one CA raises that CA's counter: concurrent revocations (a bulk revocation from several
# instances) contend on it. Each lost round means another revocation went through, so rounds are many and jittered.
MAX_REVOCATION_RACES = 64
REVOCATION_BACKOFF_SECONDS = 0.01
TX_ROW = "tx"
CERT_ROW = "cert"
REVISION_ROW = "revision"  # sorts after every 40-hex-digit serial row of a Revocations partition
LATEST_ROW = "latest"
REQUESTS_PARTITION = "requests"  # in the Revocations table: results of revocation requests not yet reported
CRL_CHUNK_BYTES = 48 * 1024
MAX_SCAN_ROUND_TRIPS = 5
COUNT_PARTITION = "count"
FAILURE_PARTITION = "failure"
INDEX_PAGE_KEY = "IndexAfter"  # a page token of a SAN or thumbprint search: the last serial handed out
_TIME_INVERSION_MS = 10**15  # RowKey of a failure: this minus its time in ms, so the newest sort first

# Transient failures (timeouts, 408/429/5xx, dropped connections) are retried by azure-core's retry policy.
_CLIENT_OPTIONS: dict[str, Any] = {
    "retry_total": 4,
    "retry_backoff_factor": 0.4,
    "retry_backoff_max": 8,
    "connection_timeout": 5,
    "read_timeout": 20,
}
# Azure table names: letters and digits, not starting with a digit, 3-63 characters ("Understanding the
# Table service data model"); the longest suffix is 12 characters, so the prefix has at most 51.
TABLE_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9]{0,50}")

Credential = TokenCredential | AzureNamedKeyCredential | AzureSasCredential


class TableStore:
    """Store backed by Azure Table storage (or Azurite): `{prefix}Transactions` and `{prefix}Certificates`."""

    def __init__(self, endpoint: str, credential: Credential, table_prefix: str = "scep") -> None:
        """endpoint: the table service URL, e.g. https://<account>.table.core.windows.net."""
        self._setup(lambda: TableServiceClient(endpoint, credential=credential, **_CLIENT_OPTIONS), table_prefix)

    @classmethod
    def from_connection_string(cls, conn_str: str, table_prefix: str = "scep") -> TableStore:
        store = cls.__new__(cls)
        store._setup(lambda: TableServiceClient.from_connection_string(conn_str, **_CLIENT_OPTIONS), table_prefix)
        return store

    def _setup(self, build_service: Callable[[], TableServiceClient], table_prefix: str) -> None:
        if not TABLE_PREFIX.fullmatch(table_prefix):
            raise ValueError("table prefix must be 1-51 letters and digits, starting with a letter")
        self.transactions_table = f"{table_prefix}Transactions"
        self.certificates_table = f"{table_prefix}Certificates"
        self.revocations_table = f"{table_prefix}Revocations"
        self.crls_table = f"{table_prefix}Crls"
        self.outcomes_table = f"{table_prefix}Outcomes"
        self.index_table = f"{table_prefix}CertIndex"
        self._build_service = build_service
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._endpoint = build_service().url  # parses the settings now, so mistakes surface at start-up
        self._tx: TableClient
        self._certs: TableClient
        self._revocations: TableClient
        self._crls: TableClient
        self._outcomes: TableClient
        self._index: TableClient

    # -- clients -----------------------------------------------------------------------------------------

    def _clients(self) -> tuple[TableClient, TableClient]:
        """Table clients for this process, tables created on first use (a forked child builds its own)."""
        if self._pid == os.getpid():
            return self._tx, self._certs
        with self._lock:
            if self._pid != os.getpid():
                service = self._build_service()
                names = (self.transactions_table, self.certificates_table, self.revocations_table, self.crls_table,
                         self.outcomes_table, self.index_table)
                for name in names:
                    _create_table(service, name)
                self._tx = service.get_table_client(self.transactions_table)
                self._certs = service.get_table_client(self.certificates_table)
                self._revocations = service.get_table_client(self.revocations_table)
                self._crls = service.get_table_client(self.crls_table)
                self._outcomes = service.get_table_client(self.outcomes_table)
                self._index = service.get_table_client(self.index_table)
                self._pid = os.getpid()
        return self._tx, self._certs

    # -- the Store protocol ------------------------------------------------------------------------------

    def claim(self, transaction_id: str, key_id: str, lease: timedelta) -> Claim:
        lease_id = secrets.token_hex(16)
        with _azure_errors("claim"):
            tx, certs = self._clients()
            now = _now()
            fresh = {
                "PartitionKey": _tx_partition(transaction_id),
                "RowKey": TX_ROW,
                "TransactionId": transaction_id,
                "KeyId": key_id,
                "State": TxState.PROCESSING.value,
                "LeaseId": lease_id,
                "LeaseExpires": now + lease,
                "Created": now,
                "Updated": now,
            }
            for _ in range(MAX_RACES):
                try:
                    created = tx.create_entity(fresh)
                    return _claimed(transaction_id, lease_id, created["etag"])
                except ResourceExistsError:
                    pass
                current = _get(tx, fresh["PartitionKey"], TX_ROW)
                if current is None:
                    continue  # removed meanwhile: create again
                if current.get("LeaseId") == lease_id and current["State"] == TxState.PROCESSING.value:
                    return _claimed(transaction_id, lease_id, current.metadata["etag"])  # our retried write
                decided = self._decide(current, key_id, transaction_id, now, certs)
                if decided is not None:
                    return decided
                retaken = {**fresh, "Created": current.get("Created", now)}
                try:
                    updated = tx.update_entity(
                        retaken,
                        mode=UpdateMode.REPLACE,
                        etag=current.metadata["etag"],
                        match_condition=MatchConditions.IfNotModified,
                    )
                    return _claimed(transaction_id, lease_id, updated["etag"])
                except (ResourceModifiedError, ResourceNotFoundError):
                    continue  # lost a race: read again and decide again
        raise StoreError(f"claim on transaction {transaction_id!r} lost {MAX_RACES} races in a row")

    def record_issued(self, claim: Claim, certificate: IssuedCertificate) -> None:
        lease_id, etag = _lease_of(claim)
        if certificate.transaction_id != claim.transaction_id:
            raise ValueError("the certificate belongs to another transaction than the claim")
        if len(certificate.der) > MAX_PROPERTY_BYTES:
            raise StoreError(f"certificate of {len(certificate.der)} bytes exceeds the Tables property limit")
        serial = serial_text(certificate.serial)
        with _azure_errors(f"recording certificate {certificate.serial:x}"):
            tx, certs = self._clients()
            self._insert_certificate(certs, certificate, serial)
            for key in _index_keys(certificate):
                self._index.upsert_entity({"PartitionKey": key, "RowKey": serial})
            finish = {"State": TxState.ISSUED.value, "Serial": serial}
            if self._finish(tx, claim.transaction_id, lease_id, etag, finish):
                self._count(EnrollmentOutcome.ISSUED)
                return
            certs.update_entity(_cert_status_patch(serial, CertStatus.UNDELIVERED), mode=UpdateMode.MERGE)
        raise StoreError(
            f"lease on transaction {claim.transaction_id!r} was lost; certificate {certificate.serial:x}"
            " is recorded as undelivered"
        )

    def record_failed(self, claim: Claim, fail_info: int, reason: str) -> None:
        self._finish_failed(claim, fail_info, reason, enrollment=True)

    def release(self, claim: Claim, note: str) -> None:
        self._finish_failed(claim, 0, note, enrollment=False)

    def count_pending(self) -> None:
        self._count(EnrollmentOutcome.PENDING)

    def _finish_failed(self, claim: Claim, fail_info: int, reason: str, enrollment: bool) -> None:
        lease_id, etag = _lease_of(claim)
        finish = {"State": TxState.FAILED.value, "FailInfo": int(fail_info), "Reason": reason[:MAX_REASON_CHARS]}
        with _azure_errors("recording the failure"):
            tx, _ = self._clients()
            if self._finish(tx, claim.transaction_id, lease_id, etag, finish):
                if enrollment:
                    self._count(EnrollmentOutcome.FAILED)
                    self._outcomes.create_entity(_failure_entity(claim.transaction_id, fail_info, finish["Reason"]))
                return
        raise StoreError(f"lease on transaction {claim.transaction_id!r} was lost")

    def mark_undelivered(self, serial: int) -> None:
        self._set_status(serial, CertStatus.UNDELIVERED)

    def mark_delivered(self, serial: int) -> None:
        self._set_status(serial, CertStatus.ISSUED)

    def certificate_by_serial(self, serial: int) -> IssuedCertificate | None:
        with _azure_errors("reading certificate"):
            _, certs = self._clients()
            entity = _get(certs, serial_text(serial), CERT_ROW)
        return None if entity is None else _certificate_from(entity)

    def certificate_for_transaction(self, transaction_id: str) -> IssuedCertificate | None:
        with _azure_errors("reading certificate"):
            tx, certs = self._clients()
            current = _get(tx, _tx_partition(transaction_id), TX_ROW)
            if current is None or current["State"] != TxState.ISSUED.value:
                return None
            entity = _get(certs, current["Serial"], CERT_ROW)
        return None if entity is None else _certificate_from(entity)

    def transaction_state(self, transaction_id: str) -> TxState | None:
        with _azure_errors("reading transaction"):
            tx, _ = self._clients()
            current = _get(tx, _tx_partition(transaction_id), TX_ROW)
        return None if current is None else TxState(current["State"])

    def ping(self) -> None:
        with _azure_errors("reaching the table service"):
            tx, _ = self._clients()
            _get(tx, "ping", "ping")  # a point read: absent is fine, unreachable or forbidden is not

    def enrollment_counts(self, since: datetime) -> dict[EnrollmentOutcome, int]:
        counted = dict.fromkeys(EnrollmentOutcome, 0)
        with _azure_errors("reading the enrollment counts"):
            self._clients()
            rows = self._outcomes.query_entities(
                "PartitionKey eq @counts and RowKey ge @first",
                parameters={"counts": COUNT_PARTITION, "first": hour_bucket(since)},
                select=["RowKey", "Count"],
                results_per_page=1000,
            )
            for row in rows:
                counted[EnrollmentOutcome(row["RowKey"].rpartition("|")[2])] += _int(row["Count"])
        return counted

    def recent_failures(self, limit: int) -> tuple[EnrollmentFailure, ...]:
        with _azure_errors("reading the recent failures"):
            self._clients()
            rows = self._outcomes.query_entities(
                "PartitionKey eq @failures", parameters={"failures": FAILURE_PARTITION}, results_per_page=limit
            )
            page = next(rows.by_page(), [])
            return tuple(_failure_from(row) for row in list(page)[:limit])

    def _count(self, outcome: EnrollmentOutcome) -> None:
        """Raise this hour's counter of outcome on its ETag; a failure is logged, never the enrollment's."""
        row_key = f"{hour_bucket(_now())}|{outcome.value}"
        try:
            for attempt in range(MAX_REVOCATION_RACES):
                counter = _get(self._outcomes, COUNT_PARTITION, row_key)
                raised = {"PartitionKey": COUNT_PARTITION, "RowKey": row_key, "Count": 1}
                try:
                    if counter is None:
                        self._outcomes.create_entity(raised)
                    else:
                        raised["Count"] = _int(counter["Count"]) + 1
                        self._outcomes.update_entity(raised, mode=UpdateMode.REPLACE, etag=counter.metadata["etag"],
                                                     match_condition=MatchConditions.IfNotModified)
                    return
                except (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError):
                    time.sleep(random.uniform(0, REVOCATION_BACKOFF_SECONDS * min(attempt + 1, 10)))
            log.warning("the %s counter of %s lost every race; this outcome is not counted", outcome.value, row_key)
        except AzureError as error:
            log.warning("counting an enrollment outcome failed: %s", error)

    def describe(self) -> str:
        return f"Azure Tables at {self._endpoint} ({self.transactions_table}, {self.certificates_table})"

    # -- helpers -----------------------------------------------------------------------------------------

    def _set_status(self, serial: int, status: CertStatus) -> None:
        """Merge the status on the ETag read, so a revocation made meanwhile is never overwritten."""
        key = serial_text(serial)
        with _azure_errors(f"marking certificate {serial:x} {status.value}"):
            _, certs = self._clients()
            for _ in range(MAX_RACES):
                current = _get(certs, key, CERT_ROW)
                if current is None:
                    raise UnknownSerial(f"no certificate with serial {serial:x} is recorded")
                if current["Status"] == CertStatus.REVOKED.value:
                    return
                try:
                    certs.update_entity(
                        _cert_status_patch(key, status),
                        mode=UpdateMode.MERGE,
                        etag=current.metadata["etag"],
                        match_condition=MatchConditions.IfNotModified,
                    )
                    return
                except (ResourceModifiedError, ResourceNotFoundError):
                    continue
        raise StoreError(f"marking certificate {serial:x} {status.value} lost {MAX_RACES} races in a row")

    # -- revocation ----------------------------------------------------------------------------------------

    def revoke(self, serial: int, reason: RevocationReason, when: datetime) -> Revoked:
        key = serial_text(serial)
        wanted = Revocation(serial, utc(when), RevocationReason(reason))
        with _azure_errors(f"revoking certificate {serial:x}"):
            _, certs = self._clients()
            entity = _get(certs, key, CERT_ROW)
            if entity is None:
                raise UnknownSerial(f"no certificate with serial {serial:x} is recorded")
            if entity["Status"] == CertStatus.REVOKED.value:
                return Revoked(_revocation_from(key, entity), already=True)
            recorded, created = self._record_revocation(entity["IssuerSha256"], wanted)
            patch = {
                **_cert_status_patch(key, CertStatus.REVOKED),
                "RevokedAt": recorded.revoked_at,
                "RevocationReason": recorded.reason.value,
            }
            certs.update_entity(patch, mode=UpdateMode.MERGE)
        return Revoked(recorded, already=not created)

    def _record_revocation(self, issuer: str, wanted: Revocation) -> tuple[Revocation, bool]:
        """The revocation row and the raised revision in one entity group transaction; (recorded, created)."""
        row_key = serial_text(wanted.serial)
        row = {
            "PartitionKey": issuer,
            "RowKey": row_key,
            "RevokedAt": wanted.revoked_at,
            "RevocationReason": wanted.reason.value,
        }
        for attempt in range(MAX_REVOCATION_RACES):
            existing = _get(self._revocations, issuer, row_key)
            if existing is not None:
                return _revocation_from(row_key, existing), False  # a revocation cut off half-way
            counter = _get(self._revocations, issuer, REVISION_ROW)
            try:
                self._revocations.submit_transaction([("create", row), _raise_revision(issuer, counter)])
                return wanted, True
            except TableTransactionError:
                # another revocation of this CA (or of this serial) went first: read again after a jittered pause
                time.sleep(random.uniform(0, REVOCATION_BACKOFF_SECONDS * min(attempt + 1, 10)))
        raise StoreError(f"revoking certificate {wanted.serial:x} lost {MAX_REVOCATION_RACES} races in a row")

    def revocations(self, issuer_sha256: str) -> RevocationList:
        with _azure_errors("listing revoked certificates"):
            self._clients()
            revision = self._revision(issuer_sha256)  # read first: the rows listed are at least this revision's
            rows = self._revocations.query_entities(
                "PartitionKey eq @issuer and RowKey ne @revision",
                parameters={"issuer": issuer_sha256, "revision": REVISION_ROW},
                select=["RowKey", "RevokedAt", "RevocationReason"],
                results_per_page=1000,
            )
            entries = tuple(_revocation_from(row["RowKey"], row) for row in rows)
        return RevocationList(revision, entries)

    def revocation_revision(self, issuer_sha256: str) -> int:
        with _azure_errors("reading the revocation revision"):
            self._clients()
            return self._revision(issuer_sha256)

    def _revision(self, issuer_sha256: str) -> int:
        counter = _get(self._revocations, issuer_sha256, REVISION_ROW)
        return 0 if counter is None else _int(counter["Revision"])

    def latest_crl(self, issuer_sha256: str) -> StoredCrl | None:
        with _azure_errors("reading the CRL"):
            self._clients()
            for _ in range(MAX_RACES):
                pointer = _get(self._crls, issuer_sha256, LATEST_ROW)
                if pointer is None:
                    return None
                chunks = [row["Der"] for row in self._chunks(issuer_sha256, pointer["Token"])]
                if len(chunks) == _int(pointer["Chunks"]):
                    return _crl_from(issuer_sha256, pointer, b"".join(bytes(chunk) for chunk in chunks))
                # replaced (and its chunks deleted) between the two reads: read the new one
        raise StoreError(f"reading the CRL lost {MAX_RACES} races in a row")

    def save_crl(self, crl: StoredCrl) -> bool:
        token = secrets.token_hex(8)
        with _azure_errors(f"saving CRL {crl.number}"):
            self._clients()
            written = False
            for _ in range(MAX_RACES):
                pointer = _get(self._crls, crl.issuer_sha256, LATEST_ROW)
                if pointer is not None and _int(pointer["Number"]) >= crl.number:
                    if written:
                        self._delete_chunks(crl.issuer_sha256, token)
                    return False
                if not written:
                    chunk_count = self._write_chunks(crl, token)
                    written = True
                if self._swap_pointer(crl, pointer, _pointer_entity(crl, token, chunk_count)):
                    if pointer is not None:
                        self._delete_chunks(crl.issuer_sha256, pointer["Token"])
                    return True
        raise StoreError(f"saving CRL {crl.number} lost {MAX_RACES} races in a row")

    def _write_chunks(self, crl: StoredCrl, token: str) -> int:
        pieces = [crl.der[start : start + CRL_CHUNK_BYTES] for start in range(0, len(crl.der), CRL_CHUNK_BYTES)]
        for index, piece in enumerate(pieces):
            self._crls.upsert_entity(
                {"PartitionKey": crl.issuer_sha256, "RowKey": _chunk_row(token, index), "Der": piece}
            )
        return len(pieces)

    def _swap_pointer(self, crl: StoredCrl, pointer: Any, replacement: dict[str, Any]) -> bool:
        try:
            if pointer is None:
                self._crls.create_entity(replacement)
            else:
                self._crls.update_entity(
                    replacement,
                    mode=UpdateMode.REPLACE,
                    etag=pointer.metadata["etag"],
                    match_condition=MatchConditions.IfNotModified,
                )
            return True
        except (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError):
            return False

    def _chunks(self, issuer_sha256: str, token: str) -> Any:
        return self._crls.query_entities(
            "PartitionKey eq @issuer and RowKey ge @first and RowKey lt @end",
            parameters={"issuer": issuer_sha256, "first": _chunk_row(token, 0), "end": prefix_end(f"chunk-{token}-")},
            select=["RowKey", "Der"],
        )

    def _delete_chunks(self, issuer_sha256: str, token: str) -> None:
        """Remove the chunks of a CRL nobody points at; a failure leaves garbage rows, never a wrong CRL."""
        try:
            for row in self._chunks(issuer_sha256, token):
                self._crls.delete_entity(issuer_sha256, row["RowKey"])
        except AzureError:
            pass

    # -- inventory -----------------------------------------------------------------------------------------

    # -- results of revocation requests, until reported -------------------------------------------------------

    def record_request_result(self, result: RequestResult) -> RequestResult:
        entity = {
            "PartitionKey": REQUESTS_PARTITION,
            "RowKey": _context_key(result.context),
            "Context": result.context,
            "Succeeded": result.succeeded,
            "ErrorCode": result.error_code,
            "ErrorMessage": result.error_message,
        }
        with _azure_errors("recording a request result"):
            self._clients()
            try:
                self._revocations.create_entity(entity)
                return result
            except ResourceExistsError:
                return _request_result_from(self._revocations.get_entity(REQUESTS_PARTITION, entity["RowKey"]))

    def unreported_request_results(self, limit: int) -> tuple[RequestResult, ...]:
        with _azure_errors("reading request results"):
            self._clients()
            rows = self._revocations.query_entities(
                "PartitionKey eq @partition", parameters={"partition": REQUESTS_PARTITION}, results_per_page=limit
            )
            return tuple(_request_result_from(row) for row in islice(rows, limit))

    def forget_request_results(self, contexts: Sequence[str]) -> None:
        with _azure_errors("forgetting request results"):
            self._clients()
            for context in contexts:
                self._revocations.delete_entity(REQUESTS_PARTITION, _context_key(context))

    def find_certificates(self, query: CertificateQuery) -> CertificatePage:
        if not 1 <= query.limit <= MAX_PAGE_SIZE:
            raise ValueError(f"page size must be 1 to {MAX_PAGE_SIZE}")
        if query.san or query.thumbprint_sha1:
            return self._find_indexed(query)
        query_filter, parameters = _inventory_filter(query)
        continuation = _continuation_from(query.page)
        with _azure_errors("listing certificates"):
            _, certs = self._clients()
            pages = certs.query_entities(query_filter, parameters=parameters, results_per_page=query.limit)
            for _ in range(MAX_SCAN_ROUND_TRIPS):
                pager = pages.by_page(continuation_token=continuation)
                items = tuple(_certificate_from(entity) for entity in next(pager, []))
                continuation = pager.continuation_token
                if items or continuation is None:
                    break
        return CertificatePage(items, None if continuation is None else json.dumps(continuation))

    def _find_indexed(self, query: CertificateQuery) -> CertificatePage:
        """A SAN or thumbprint search: the serials of a lookup partition, each certificate read with the other
        filters applied by the service (one point query each)."""
        keys = _lookup_keys(query)
        after = _index_position(query.page)
        rest = replace(query, san=None, thumbprint_sha1=None, page=None)
        items: list[IssuedCertificate] = []
        with _azure_errors("searching certificates"):
            _, certs = self._clients()
            rows = self._index.query_entities(
                "PartitionKey eq @key and RowKey gt @after", parameters={"key": keys[0], "after": after},
                select=["RowKey"],
            )
            for row in rows:
                serial = row["RowKey"]
                if any(_get(self._index, key, serial) is None for key in keys[1:]):
                    continue
                query_filter, parameters = _inventory_filter(replace(rest, serial=int(serial, 16)))
                matches = certs.query_entities(query_filter, parameters=parameters)
                found = [_certificate_from(entity) for entity in matches]
                if found and len(items) == query.limit:
                    return CertificatePage(tuple(items), json.dumps({INDEX_PAGE_KEY: serial_text(items[-1].serial)}))
                items.extend(found)
        return CertificatePage(tuple(items), None)

    @staticmethod
    def _decide(
        current: Mapping[str, Any], key_id: str, transaction_id: str, now: datetime, certs: TableClient
    ) -> Claim | None:
        """The outcome for a claim on an existing transaction, or None when it may be taken over."""
        if current["KeyId"] != key_id:
            return Claim(ClaimOutcome.KEY_MISMATCH, transaction_id)
        if current["State"] == TxState.ISSUED.value:
            entity = _get(certs, current["Serial"], CERT_ROW)
            if entity is None:
                raise StoreError(f"transaction {transaction_id!r} names certificate {current['Serial']} not recorded")
            return Claim(ClaimOutcome.ISSUED, transaction_id, certificate=_certificate_from(entity))
        if current["State"] == TxState.PROCESSING.value and current["LeaseExpires"] > now:
            return Claim(ClaimOutcome.BUSY, transaction_id)
        return None

    @staticmethod
    def _insert_certificate(certs: TableClient, certificate: IssuedCertificate, serial: str) -> None:
        entity = _certificate_entity(certificate, serial)
        try:
            certs.create_entity(entity)
        except ResourceExistsError:
            existing = _get(certs, serial, CERT_ROW)
            ours = (
                existing is not None
                and existing["TransactionId"] == certificate.transaction_id
                and existing["Der"] == certificate.der
            )
            if not ours:  # (ours: the pipeline retried a create whose first answer was lost)
                raise SerialInUse(f"serial {certificate.serial:x} is already recorded") from None

    @staticmethod
    def _finish(tx: TableClient, transaction_id: str, lease_id: str, etag: str, fields: dict[str, Any]) -> bool:
        """Merge the final state on the claim's ETag; False when another worker has taken the transaction."""
        partition = _tx_partition(transaction_id)
        patch = {"PartitionKey": partition, "RowKey": TX_ROW, "Updated": _now(), **fields}
        for _ in range(MAX_RACES):
            try:
                tx.update_entity(patch, mode=UpdateMode.MERGE, etag=etag, match_condition=MatchConditions.IfNotModified)
                return True
            except (ResourceModifiedError, ResourceNotFoundError):
                current = _get(tx, partition, TX_ROW)
            if current is None or current.get("LeaseId") != lease_id:
                return False
            if current["State"] != TxState.PROCESSING.value:
                return all(current.get(name) == value for name, value in fields.items())  # a retried write
            etag = current.metadata["etag"]
        raise StoreError(f"finishing transaction {transaction_id!r} lost {MAX_RACES} races in a row")


def _create_table(service: TableServiceClient, name: str) -> None:
    try:
        service.create_table(name)
    except ResourceExistsError:
        pass
    except HttpResponseError as error:
        # A role granted on the tables alone may not create tables; the deployment created them already.
        if error.status_code != 403:
            raise


def _azure_errors(action: str) -> AbstractContextManager[None]:
    return translated(lambda detail: StoreError(f"{action} failed ({detail})"))


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _tx_partition(transaction_id: str) -> str:
    return hashlib.sha256(transaction_id.encode("utf-8")).hexdigest()


def _claimed(transaction_id: str, lease_id: str, etag: str) -> Claim:
    # The token carries the ETag the claim produced, so finishing needs no read first.
    return Claim(ClaimOutcome.CLAIMED, transaction_id, token=f"{lease_id} {etag}")


def _lease_of(claim: Claim) -> tuple[str, str]:
    if claim.outcome is not ClaimOutcome.CLAIMED or not claim.token or " " not in claim.token:
        raise ValueError("only a CLAIMED transaction can be finished")
    lease_id, etag = claim.token.split(" ", 1)
    return lease_id, etag


def _get(table: TableClient, partition: str, row: str) -> Any:
    try:
        return table.get_entity(partition, row)
    except ResourceNotFoundError:
        return None


def _cert_status_patch(serial: str, status: CertStatus) -> dict[str, str]:
    return {"PartitionKey": serial, "RowKey": CERT_ROW, "Status": status.value}


def _certificate_entity(certificate: IssuedCertificate, serial: str) -> dict[str, Any]:
    return {
        "PartitionKey": serial,
        "RowKey": CERT_ROW,
        "TransactionId": certificate.transaction_id,
        "Subject": certificate.subject,
        "IssuerSha256": certificate.issuer_sha256,
        "NotBefore": utc(certificate.not_before),
        "NotAfter": utc(certificate.not_after),
        "ThumbprintSha1": certificate.thumbprint_sha1,
        "Der": certificate.der,
        "Status": certificate.status.value,
        "Created": _now(),
    }


def _certificate_from(entity: Mapping[str, Any]) -> IssuedCertificate:
    revoked_at = entity.get("RevokedAt")
    reason = entity.get("RevocationReason")
    return IssuedCertificate(
        serial=int(entity["PartitionKey"], 16),
        transaction_id=entity["TransactionId"],
        subject=entity["Subject"],
        issuer_sha256=entity["IssuerSha256"],
        not_before=_plain_datetime(entity["NotBefore"]),
        not_after=_plain_datetime(entity["NotAfter"]),
        thumbprint_sha1=entity["ThumbprintSha1"],
        der=bytes(entity["Der"]),
        status=CertStatus(entity["Status"]),
        revoked_at=None if revoked_at is None else _plain_datetime(revoked_at),
        revocation_reason=None if reason is None else RevocationReason(reason),
    )


def _revocation_from(serial: str, entity: Mapping[str, Any]) -> Revocation:
    return Revocation(
        int(serial, 16), _plain_datetime(entity["RevokedAt"]), RevocationReason(entity["RevocationReason"])
    )


def _raise_revision(issuer: str, counter: Any) -> tuple:
    """The batch operation that takes the CA's revision from what was read to one more (on the read ETag)."""
    if counter is None:
        return ("create", {"PartitionKey": issuer, "RowKey": REVISION_ROW, "Revision": 1})
    raised = {"PartitionKey": issuer, "RowKey": REVISION_ROW, "Revision": _int(counter["Revision"]) + 1}
    options = {
        "mode": UpdateMode.REPLACE,
        "etag": counter.metadata["etag"],
        "match_condition": MatchConditions.IfNotModified,
    }
    return ("update", raised, options)


def _context_key(context: str) -> str:
    # Requesters choose the context's characters, some of which Tables forbids in keys.
    return hashlib.sha256(context.encode("utf-8")).hexdigest()


def _request_result_from(entity: Mapping[str, Any]) -> RequestResult:
    return RequestResult(entity["Context"], bool(entity["Succeeded"]), entity["ErrorCode"], entity["ErrorMessage"])


def _int(value: Any) -> int:
    """An integer property (the SDK hands Int64 values back wrapped in an EntityProperty)."""
    return int(getattr(value, "value", value))


def _chunk_row(token: str, index: int) -> str:
    return f"chunk-{token}-{index:05d}"


def _pointer_entity(crl: StoredCrl, token: str, chunks: int) -> dict[str, Any]:
    return {
        "PartitionKey": crl.issuer_sha256,
        "RowKey": LATEST_ROW,
        "Number": crl.number,
        "Revision": crl.revision,
        "ThisUpdate": utc(crl.this_update),
        "NextUpdate": utc(crl.next_update),
        "Token": token,
        "Chunks": chunks,
    }


def _crl_from(issuer: str, pointer: Mapping[str, Any], der: bytes) -> StoredCrl:
    return StoredCrl(
        issuer_sha256=issuer,
        number=_int(pointer["Number"]),
        revision=_int(pointer["Revision"]),
        this_update=_plain_datetime(pointer["ThisUpdate"]),
        next_update=_plain_datetime(pointer["NextUpdate"]),
        der=der,
    )


def _inventory_filter(query: CertificateQuery) -> tuple[str, dict[str, Any]]:
    """An OData $filter over the Certificates table (one partition when a serial is given)."""
    conditions: list[str] = []
    parameters: dict[str, Any] = {}

    def where(condition: str, **values: Any) -> None:
        conditions.append(condition)
        parameters.update(values)

    if query.serial is not None:
        where("PartitionKey eq @serial", serial=serial_text(query.serial))
    if query.subject_prefix:
        where("Subject ge @low and Subject lt @high", low=query.subject_prefix, high=prefix_end(query.subject_prefix))
    if query.status is not None:
        where("Status eq @status", status=CertStatus(query.status).value)
    if query.issuer_sha256 is not None:
        where("IssuerSha256 eq @issuer", issuer=query.issuer_sha256)
    if query.expires_after is not None:
        where("NotAfter ge @after", after=utc(query.expires_after))
    if query.expires_before is not None:
        where("NotAfter lt @before", before=utc(query.expires_before))
    where("RowKey eq @row", row=CERT_ROW)
    return " and ".join(conditions), parameters


def _thumbprint_key(thumbprint: str) -> str:
    return f"thumb-{thumbprint.strip().lower()}"


def _san_key(name: str) -> str:
    return f"san-{hashlib.sha256(name.strip().lower().encode('utf-8')).hexdigest()}"


def _index_keys(certificate: IssuedCertificate) -> list[str]:
    return [_thumbprint_key(certificate.thumbprint_sha1), *map(_san_key, certificate_names(certificate.der))]


def _lookup_keys(query: CertificateQuery) -> list[str]:
    """The lookup partitions a certificate must be in to match: the thumbprint's first (the narrowest)."""
    keys = [_thumbprint_key(query.thumbprint_sha1)] if query.thumbprint_sha1 else []
    return keys + ([_san_key(query.san)] if query.san else [])


def _index_position(page: str | None) -> str:
    if not page:
        return ""
    position = _continuation_from(page)
    if position is None or set(position) != {INDEX_PAGE_KEY}:
        raise ValueError("not a page token of this search")
    return position[INDEX_PAGE_KEY]


def _failure_entity(transaction_id: str, fail_info: int, reason: str) -> dict[str, Any]:
    now = _now()
    inverted = _TIME_INVERSION_MS - int(now.timestamp() * 1000)
    return {
        "PartitionKey": FAILURE_PARTITION,
        "RowKey": f"{inverted:015d}-{secrets.token_hex(4)}",
        "At": now,
        "TransactionId": transaction_id,
        "FailInfo": int(fail_info),
        "Reason": reason,
    }


def _failure_from(entity: Mapping[str, Any]) -> EnrollmentFailure:
    return EnrollmentFailure(
        _plain_datetime(entity["At"]), entity["TransactionId"], _int(entity["FailInfo"]), entity["Reason"]
    )


def _continuation_from(page: str | None) -> dict[str, str] | None:
    if not page:
        return None
    try:
        token = json.loads(page)
    except ValueError:
        token = None
    if not isinstance(token, dict) or not all(isinstance(value, str) for value in token.values()):
        raise ValueError("not a page token of this inventory")
    return token


def _plain_datetime(value: datetime) -> datetime:
    """The SDK returns a datetime subclass; hand back a plain aware UTC datetime."""
    value = utc(value)
    return datetime(
        value.year, value.month, value.day, value.hour, value.minute, value.second, value.microsecond, timezone.utc
    )
