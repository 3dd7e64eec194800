"""The embedded inventory: one SQLite file shared by every worker process on the machine.

WAL journal with synchronous=FULL: a committed certificate is on disk before the device sees it. Every
process (and every thread in it) gets its own connection; a forked worker notices the new pid and opens its own.
Write transactions start with BEGIN IMMEDIATE, so a claim is one atomic read-decide-write across processes.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

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

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 15_000

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS transactions (
        transaction_id TEXT PRIMARY KEY,
        key_id TEXT NOT NULL,
        state TEXT NOT NULL,
        lease_token TEXT,
        lease_expires REAL,
        serial TEXT,
        fail_info INTEGER,
        reason TEXT,
        created TEXT NOT NULL,
        updated TEXT NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS certificates (
        serial TEXT PRIMARY KEY,
        transaction_id TEXT NOT NULL,
        subject TEXT NOT NULL,
        issuer_sha256 TEXT NOT NULL,
        not_before TEXT NOT NULL,
        not_after TEXT NOT NULL,
        thumbprint_sha1 TEXT NOT NULL,
        der BLOB NOT NULL,
        status TEXT NOT NULL,
        created TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS certificates_by_transaction ON certificates (transaction_id)",
)

_CERT_COLUMNS = "serial, transaction_id, subject, issuer_sha256, not_before, not_after, thumbprint_sha1, der, status"

_SELECT_TX = "SELECT key_id, state, lease_expires, serial FROM transactions WHERE transaction_id = ?"
_INSERT_TX = (
    "INSERT INTO transactions (transaction_id, key_id, state, lease_token, lease_expires, created, updated)"
    " VALUES (?, ?, 'processing', ?, ?, ?, ?)"
)
_RECLAIM_TX = (
    "UPDATE transactions SET state = 'processing', lease_token = ?, lease_expires = ?,"
    " fail_info = NULL, reason = NULL, updated = ? WHERE transaction_id = ?"
)
_RELEASE_ABANDONED = (
    "UPDATE transactions SET state = 'failed', reason = 'abandoned when the server stopped', lease_token = NULL,"
    " lease_expires = NULL, updated = ? WHERE state = 'processing'"
)
_FINISH_ISSUED = (
    "UPDATE transactions SET state = 'issued', serial = ?, lease_token = NULL, lease_expires = NULL,"
    " updated = ? WHERE transaction_id = ? AND lease_token = ? AND state = 'processing'"
)
_FINISH_FAILED = (
    "UPDATE transactions SET state = 'failed', fail_info = ?, reason = ?, lease_token = NULL,"
    " lease_expires = NULL, updated = ? WHERE transaction_id = ? AND lease_token = ? AND state = 'processing'"
)
_INSERT_CERT = f"INSERT INTO certificates ({_CERT_COLUMNS}, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_SELECT_CERT_BY_SERIAL = f"SELECT {_CERT_COLUMNS} FROM certificates WHERE serial = ?"
_SELECT_CERT_BY_TX = (
    f"SELECT {', '.join('c.' + c.strip() for c in _CERT_COLUMNS.split(','))}"
    " FROM transactions t JOIN certificates c ON c.serial = t.serial WHERE t.transaction_id = ?"
)
_SET_STATUS = "UPDATE certificates SET status = ? WHERE serial = ?"


def _now_text() -> str:
    return datetime.now(timezone.utc).isoformat()


class SqliteStore:
    """Store backed by a SQLite file; safe for many threads and pre-forked worker processes on one machine."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._local = threading.local()
        # Writers queue on a thread lock and a file lock instead of in SQLite's busy handler, which sleeps in
        # steps of milliseconds and leaves the CPUs idle while worker processes wait for each other.
        self._write_lock = threading.Lock()
        self._write_lock_pid = os.getpid()
        self._lock_file: int | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._create_schema()
        except (OSError, sqlite3.Error) as error:
            raise StoreError(f"cannot open the SQLite store at {self.path}: {error}") from error

    # -- connections -------------------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        local = self._local
        connection = getattr(local, "connection", None)
        if connection is not None and local.pid == os.getpid():
            return connection
        # A connection inherited across fork() must never be used (or closed) by the child.
        connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = FULL")
        local.connection = connection
        local.pid = os.getpid()
        local.durable = True
        return connection

    def close(self) -> None:
        """Close this thread's connection (others close when their threads end)."""
        connection = getattr(self._local, "connection", None)
        if connection is not None and self._local.pid == os.getpid():
            connection.close()
        self._local.connection = None

    @contextmanager
    def _write(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction. durable=False skips the fsync (WAL, synchronous=NORMAL): the commit survives a
        crash of the process, not of the machine; used where losing it is harmless (a claim, a failure)."""
        connection = self._connection()
        if self._local.durable != durable:
            connection.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
            self._local.durable = durable
        with self._writer_turn():
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
                connection.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise

    @contextmanager
    def _writer_turn(self) -> Iterator[None]:
        if self._write_lock_pid != os.getpid():  # locks inherited across fork() belong to the parent
            self._write_lock = threading.Lock()
            self._write_lock_pid = os.getpid()
            self._lock_file = None
        with self._write_lock:
            if self._lock_file is None:
                self._lock_file = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)

    def _create_schema(self) -> None:
        with self._write() as connection:
            for statement in _SCHEMA:
                connection.execute(statement)
            row = connection.execute("SELECT MAX(version) FROM schema_version").fetchone()
            if row[0] is None:
                connection.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] > SCHEMA_VERSION:
                raise StoreError(
                    f"the SQLite store at {self.path} has schema version {row[0]}, newer than this software"
                    f" ({SCHEMA_VERSION}); upgrade the software"
                )

    def release_abandoned_leases(self) -> int:
        """Fail every transaction still PROCESSING, so retransmissions are claimed at once after a crash.

        Only safe when no worker uses the file, i.e. when `scep serve` starts, before it forks."""
        try:
            with self._write(durable=False) as connection:
                cursor = connection.execute(_RELEASE_ABANDONED, (_now_text(),))
                return cursor.rowcount
        except sqlite3.Error as error:
            raise StoreError(f"releasing abandoned transactions failed: {error}") from error

    # -- the Store protocol ------------------------------------------------------------------------------

    def claim(self, transaction_id: str, key_id: str, lease: timedelta) -> Claim:
        now = time.time()
        token = secrets.token_hex(16)
        try:
            with self._write(durable=False) as connection:
                row = connection.execute(_SELECT_TX, (transaction_id,)).fetchone()
                if row is None:
                    stamp = _now_text()
                    connection.execute(
                        _INSERT_TX, (transaction_id, key_id, token, now + lease.total_seconds(), stamp, stamp)
                    )
                    return Claim(ClaimOutcome.CLAIMED, transaction_id, token=token)
                stored_key, state, lease_expires, serial = row
                if stored_key != key_id:
                    return Claim(ClaimOutcome.KEY_MISMATCH, transaction_id)
                if state == TxState.ISSUED.value:
                    certificate = self._select_certificate(connection, _SELECT_CERT_BY_SERIAL, serial)
                    return Claim(ClaimOutcome.ISSUED, transaction_id, certificate=certificate)
                if state == TxState.PROCESSING.value and lease_expires > now:
                    return Claim(ClaimOutcome.BUSY, transaction_id)
                connection.execute(_RECLAIM_TX, (token, now + lease.total_seconds(), _now_text(), transaction_id))
                return Claim(ClaimOutcome.CLAIMED, transaction_id, token=token)
        except sqlite3.Error as error:
            raise StoreError(f"claim failed: {error}") from error

    def record_issued(self, claim: Claim, certificate: IssuedCertificate) -> None:
        token = _claimed_token(claim)
        if certificate.transaction_id != claim.transaction_id:
            raise ValueError("the certificate belongs to another transaction than the claim")
        serial = serial_text(certificate.serial)
        try:
            with self._write() as connection:
                now = _now_text()
                finished = connection.execute(_FINISH_ISSUED, (serial, now, claim.transaction_id, token)).rowcount
                status = certificate.status if finished else CertStatus.UNDELIVERED
                connection.execute(_INSERT_CERT, _certificate_row(certificate, serial, status, now))
        except sqlite3.IntegrityError as error:
            if "certificates.serial" not in str(error):
                raise StoreError(f"recording certificate {certificate.serial:x} failed: {error}") from error
            raise SerialInUse(f"serial {certificate.serial:x} is already recorded") from error
        except sqlite3.Error as error:
            raise StoreError(f"recording certificate {certificate.serial:x} failed: {error}") from error
        if not finished:
            raise StoreError(
                f"lease on transaction {claim.transaction_id!r} was lost; certificate {certificate.serial:x}"
                " is recorded as undelivered"
            )

    def record_failed(self, claim: Claim, fail_info: int, reason: str) -> None:
        token = _claimed_token(claim)
        try:
            with self._write(durable=False) as connection:
                finished = connection.execute(
                    _FINISH_FAILED,
                    (int(fail_info), reason[:MAX_REASON_CHARS], _now_text(), claim.transaction_id, token),
                ).rowcount
        except sqlite3.Error as error:
            raise StoreError(f"recording the failure failed: {error}") from error
        if not finished:
            raise StoreError(f"lease on transaction {claim.transaction_id!r} was lost")

    def mark_undelivered(self, serial: int) -> None:
        self._set_status(serial, CertStatus.UNDELIVERED)

    def mark_delivered(self, serial: int) -> None:
        self._set_status(serial, CertStatus.ISSUED)

    def certificate_by_serial(self, serial: int) -> IssuedCertificate | None:
        return self._read_certificate(_SELECT_CERT_BY_SERIAL, serial_text(serial))

    def certificate_for_transaction(self, transaction_id: str) -> IssuedCertificate | None:
        return self._read_certificate(_SELECT_CERT_BY_TX, transaction_id)

    def transaction_state(self, transaction_id: str) -> TxState | None:
        try:
            row = self._connection().execute(_SELECT_TX, (transaction_id,)).fetchone()
        except sqlite3.Error as error:
            raise StoreError(f"reading transaction failed: {error}") from error
        return None if row is None else TxState(row[1])

    def ping(self) -> None:
        try:
            self._connection().execute("SELECT version FROM schema_version").fetchone()
        except sqlite3.Error as error:
            raise StoreError(f"the SQLite store at {self.path} is not usable: {error}") from error

    def describe(self) -> str:
        return f"SQLite at {self.path}"

    # -- helpers -----------------------------------------------------------------------------------------

    def _set_status(self, serial: int, status: CertStatus) -> None:
        try:
            with self._write() as connection:
                changed = connection.execute(_SET_STATUS, (status.value, serial_text(serial))).rowcount
        except sqlite3.Error as error:
            raise StoreError(f"marking certificate {serial:x} {status.value} failed: {error}") from error
        if not changed:
            raise StoreError(f"no certificate with serial {serial:x} is recorded")

    def _read_certificate(self, query: str, key: str) -> IssuedCertificate | None:
        try:
            return self._select_certificate(self._connection(), query, key)
        except sqlite3.Error as error:
            raise StoreError(f"reading certificate failed: {error}") from error

    @staticmethod
    def _select_certificate(connection: sqlite3.Connection, query: str, key: str) -> IssuedCertificate | None:
        row = connection.execute(query, (key,)).fetchone()
        if row is None:
            return None
        serial, transaction_id, subject, issuer_sha256, not_before, not_after, thumbprint, der, status = row
        return IssuedCertificate(
            serial=int(serial, 16),
            transaction_id=transaction_id,
            subject=subject,
            issuer_sha256=issuer_sha256,
            not_before=datetime.fromisoformat(not_before),
            not_after=datetime.fromisoformat(not_after),
            thumbprint_sha1=thumbprint,
            der=bytes(der),
            status=CertStatus(status),
        )


def _claimed_token(claim: Claim) -> str:
    if claim.outcome is not ClaimOutcome.CLAIMED or not claim.token:
        raise ValueError("only a CLAIMED transaction can be finished")
    return claim.token


def _certificate_row(certificate: IssuedCertificate, serial: str, status: CertStatus, now: str) -> tuple:
    return (
        serial,
        certificate.transaction_id,
        certificate.subject,
        certificate.issuer_sha256,
        utc(certificate.not_before).isoformat(),
        utc(certificate.not_after).isoformat(),
        certificate.thumbprint_sha1,
        certificate.der,
        status.value,
        now,
    )
