"""The Azure inventory: two tables in the function app's storage account, used by every instance at once.

There are no cross-entity transactions here, so the store relies on optimistic concurrency instead: a claim
creates the transaction entity (only one creator wins) or replaces it on the ETag it read, and finishing a
transaction is a merge on the ETag its claim produced. Whoever loses a race re-reads and decides again, so two
instances never both own one transaction and never both issue for it.

Keys: Transactions are partitioned by the SHA-256 of the transactionID (clients choose any characters, some of
which Tables forbids in keys); Certificates by the fixed-width hex serial. Every lookup is a point read.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import threading
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from datetime import datetime, timedelta, timezone
from typing import Any

from azure.core import MatchConditions
from azure.core.credentials import AzureNamedKeyCredential, AzureSasCredential, TokenCredential
from azure.core.exceptions import (
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import TableClient, TableServiceClient, UpdateMode

from scep.azure.errors import translated
from scep.store import (
    MAX_REASON_CHARS,
    CertStatus,
    Claim,
    ClaimOutcome,
    IssuedCertificate,
    SerialInUse,
    StoreError,
    TxState,
    serial_text,
    utc,
)

MAX_PROPERTY_BYTES = 64 * 1024  # Azure Tables limit for one binary property
MAX_RACES = 8  # re-read-and-decide rounds before a claim or finish gives up
TX_ROW = "tx"
CERT_ROW = "cert"

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
        self._build_service = build_service
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._endpoint = build_service().url  # parses the settings now, so mistakes surface at start-up
        self._tx: TableClient
        self._certs: TableClient

    # -- clients -----------------------------------------------------------------------------------------

    def _clients(self) -> tuple[TableClient, TableClient]:
        """Table clients for this process, tables created on first use (a forked child builds its own)."""
        if self._pid == os.getpid():
            return self._tx, self._certs
        with self._lock:
            if self._pid != os.getpid():
                service = self._build_service()
                for name in (self.transactions_table, self.certificates_table):
                    _create_table(service, name)
                self._tx = service.get_table_client(self.transactions_table)
                self._certs = service.get_table_client(self.certificates_table)
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
            finish = {"State": TxState.ISSUED.value, "Serial": serial}
            if self._finish(tx, claim.transaction_id, lease_id, etag, finish):
                return
            certs.update_entity(_cert_status_patch(serial, CertStatus.UNDELIVERED), mode=UpdateMode.MERGE)
        raise StoreError(
            f"lease on transaction {claim.transaction_id!r} was lost; certificate {certificate.serial:x}"
            " is recorded as undelivered"
        )

    def record_failed(self, claim: Claim, fail_info: int, reason: str) -> None:
        lease_id, etag = _lease_of(claim)
        finish = {"State": TxState.FAILED.value, "FailInfo": int(fail_info), "Reason": reason[:MAX_REASON_CHARS]}
        with _azure_errors("recording the failure"):
            tx, _ = self._clients()
            if self._finish(tx, claim.transaction_id, lease_id, etag, finish):
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

    def describe(self) -> str:
        return f"Azure Tables at {self._endpoint} ({self.transactions_table}, {self.certificates_table})"

    # -- helpers -----------------------------------------------------------------------------------------

    def _set_status(self, serial: int, status: CertStatus) -> None:
        with _azure_errors(f"marking certificate {serial:x} {status.value}"):
            _, certs = self._clients()
            try:
                certs.update_entity(_cert_status_patch(serial_text(serial), status), mode=UpdateMode.MERGE)
            except ResourceNotFoundError:
                raise StoreError(f"no certificate with serial {serial:x} is recorded") from None

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
    )


def _plain_datetime(value: datetime) -> datetime:
    """The SDK returns a datetime subclass; hand back a plain aware UTC datetime."""
    value = utc(value)
    return datetime(
        value.year, value.month, value.day, value.hour, value.minute, value.second, value.microsecond, timezone.utc
    )
