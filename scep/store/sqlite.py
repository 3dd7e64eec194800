"""The embedded inventory: one SQLite file shared by every worker process on the machine.

WAL journal with synchronous=FULL: a committed certificate is on disk before the device sees it. Every
process (and every thread in it) gets its own connection; a forked worker notices the new pid and opens its own.
Write transactions start with BEGIN IMMEDIATE, so a claim is one atomic read-decide-write across processes.

Revocation: a revocation changes the certificate's row and raises its CA's revision in one transaction; a CRL
is saved in one transaction that first checks the stored cRLNumber is lower. Schema version 2 added the
revocation columns, the revision and CRL tables and the inventory indexes; a version 1 file is upgraded in place
when opened (its certificates read as they were, none revoked). Schema version 3 added the SAN lookup
(`certificate_names`, written with each certificate; an older file gets the rows of the certificates it holds when
opened), an index on the upper-cased thumbprint, and the enrollment outcomes (`enrollment_counts` per hour,
`enrollment_failures` one row per failure), written in the transaction that records the outcome.

Inventory indexes: (status, not_after, serial), (not_after, serial), (subject) and (issuer_sha256, status), so
a page of `find_certificates` is an index range scan whatever the filter; pages are keyset-paged on
(not_after, serial), so a deep page costs what the first one does.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

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

SCHEMA_VERSION = 3
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
    """CREATE TABLE IF NOT EXISTS request_results (
        context TEXT PRIMARY KEY,
        succeeded INTEGER NOT NULL,
        error_code TEXT NOT NULL,
        error_message TEXT NOT NULL,
        recorded TEXT NOT NULL
    ) WITHOUT ROWID""",
)
_REVOCATION_COLUMNS = (("revoked_at", "TEXT"), ("revocation_reason", "TEXT"))
_SCHEMA_2 = (
    """CREATE TABLE IF NOT EXISTS revocation_revisions (
        issuer_sha256 TEXT PRIMARY KEY,
        revision INTEGER NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS crls (
        issuer_sha256 TEXT PRIMARY KEY,
        number INTEGER NOT NULL,
        revision INTEGER NOT NULL,
        this_update TEXT NOT NULL,
        next_update TEXT NOT NULL,
        der BLOB NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS certificates_by_status ON certificates (status, not_after, serial)",
    "CREATE INDEX IF NOT EXISTS certificates_by_expiry ON certificates (not_after, serial)",
    "CREATE INDEX IF NOT EXISTS certificates_by_subject ON certificates (subject)",
    "CREATE INDEX IF NOT EXISTS certificates_by_issuer ON certificates (issuer_sha256, status)",
)

_SCHEMA_3 = (
    """CREATE TABLE IF NOT EXISTS certificate_names (
        name TEXT NOT NULL,
        serial TEXT NOT NULL,
        PRIMARY KEY (name, serial)
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS certificates_by_thumbprint ON certificates (upper(thumbprint_sha1))",
    """CREATE TABLE IF NOT EXISTS enrollment_counts (
        hour TEXT NOT NULL,
        outcome TEXT NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (hour, outcome)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS enrollment_failures (
        at TEXT NOT NULL,
        transaction_id TEXT NOT NULL,
        fail_info INTEGER NOT NULL,
        reason TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS enrollment_failures_by_time ON enrollment_failures (at)",
)
_INSERT_NAME = "INSERT OR IGNORE INTO certificate_names (name, serial) VALUES (?, ?)"
_COUNT_OUTCOME = (
    "INSERT INTO enrollment_counts (hour, outcome, count) VALUES (?, ?, 1)"
    " ON CONFLICT (hour, outcome) DO UPDATE SET count = count + 1"
)
_SUM_OUTCOMES = "SELECT outcome, SUM(count) FROM enrollment_counts WHERE hour >= ? GROUP BY outcome"
_INSERT_FAILURE = "INSERT INTO enrollment_failures (at, transaction_id, fail_info, reason) VALUES (?, ?, ?, ?)"
_SELECT_FAILURES = "SELECT at, transaction_id, fail_info, reason FROM enrollment_failures ORDER BY at DESC LIMIT ?"

_CERT_COLUMNS = (
    "serial, transaction_id, subject, issuer_sha256, not_before, not_after, thumbprint_sha1, der, status,"
    " revoked_at, revocation_reason"
)

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
_INSERT_CERT = f"INSERT INTO certificates ({_CERT_COLUMNS}, created) VALUES ({', '.join('?' * 12)})"
_SELECT_CERT_BY_SERIAL = f"SELECT {_CERT_COLUMNS} FROM certificates WHERE serial = ?"
_SELECT_CERT_BY_TX = (
    f"SELECT {', '.join('c.' + c.strip() for c in _CERT_COLUMNS.split(','))}"
    " FROM transactions t JOIN certificates c ON c.serial = t.serial WHERE t.transaction_id = ?"
)
_SET_STATUS = "UPDATE certificates SET status = ? WHERE serial = ? AND status != 'revoked'"
_CERT_EXISTS = "SELECT 1 FROM certificates WHERE serial = ?"
_REVOKE = "UPDATE certificates SET status = 'revoked', revoked_at = ?, revocation_reason = ? WHERE serial = ?"
_RAISE_REVISION = (
    "INSERT INTO revocation_revisions (issuer_sha256, revision) VALUES (?, 1)"
    " ON CONFLICT (issuer_sha256) DO UPDATE SET revision = revision + 1"
)
_SELECT_REVISION = "SELECT revision FROM revocation_revisions WHERE issuer_sha256 = ?"
_SELECT_REVOKED = (
    "SELECT serial, revoked_at, revocation_reason FROM certificates"
    " WHERE issuer_sha256 = ? AND status = 'revoked' ORDER BY serial"
)
_RESULT_COLUMNS = "context, succeeded, error_code, error_message"
_SELECT_RESULTS = f"SELECT {_RESULT_COLUMNS} FROM request_results"
_CRL_COLUMNS = "issuer_sha256, number, revision, this_update, next_update, der"
_SELECT_CRL = f"SELECT {_CRL_COLUMNS} FROM crls WHERE issuer_sha256 = ?"
_SAVE_CRL = f"INSERT OR REPLACE INTO crls ({_CRL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"


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

    def _connection(self, durable: bool = True) -> sqlite3.Connection:
        """This thread's connection with synchronous=FULL (durable) or NORMAL: two connections, so that an
        enrollment's claim and record do not switch the pragma back and forth."""
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            # A connection inherited across fork() must never be used (or closed) by the child.
            local.connections = {}
            local.pid = os.getpid()
        connection = local.connections.get(durable)
        if connection is None:
            connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
            local.connections[durable] = connection
        return connection

    def close(self) -> None:
        """Close this thread's connections (others close when their threads end)."""
        if getattr(self._local, "pid", None) == os.getpid():
            for connection in self._local.connections.values():
                connection.close()
        self._local.connections = {}

    @contextmanager
    def _write(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction. durable=False skips the fsync (WAL, synchronous=NORMAL): the commit survives a
        crash of the process, not of the machine; used where losing it is harmless (a claim, a failure)."""
        connection = self._connection(durable)
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
            if row[0] is not None and row[0] > SCHEMA_VERSION:
                raise StoreError(
                    f"the SQLite store at {self.path} has schema version {row[0]}, newer than this software"
                    f" ({SCHEMA_VERSION}); upgrade the software"
                )
            _upgrade_to_2(connection)
            _upgrade_to_3(connection, row[0])
            connection.execute("DELETE FROM schema_version")
            connection.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))

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
                connection.executemany(_INSERT_NAME, [(name, serial) for name in certificate_names(certificate.der)])
                if finished:
                    _count(connection, EnrollmentOutcome.ISSUED)
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
        self._finish_failed(claim, fail_info, reason, enrollment=True)

    def release(self, claim: Claim, note: str) -> None:
        self._finish_failed(claim, 0, note, enrollment=False)

    def count_pending(self) -> None:
        try:
            with self._write(durable=False) as connection:
                _count(connection, EnrollmentOutcome.PENDING)
        except sqlite3.Error as error:
            raise StoreError(f"counting a pending enrollment failed: {error}") from error

    def _finish_failed(self, claim: Claim, fail_info: int, reason: str, enrollment: bool) -> None:
        token = _claimed_token(claim)
        try:
            with self._write(durable=False) as connection:
                now = _now_text()
                finished = connection.execute(
                    _FINISH_FAILED, (int(fail_info), reason[:MAX_REASON_CHARS], now, claim.transaction_id, token)
                ).rowcount
                if finished and enrollment:
                    _count(connection, EnrollmentOutcome.FAILED)
                    connection.execute(
                        _INSERT_FAILURE, (now, claim.transaction_id, int(fail_info), reason[:MAX_REASON_CHARS])
                    )
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

    def enrollment_counts(self, since: datetime) -> dict[EnrollmentOutcome, int]:
        try:
            rows = self._connection().execute(_SUM_OUTCOMES, (hour_bucket(since),)).fetchall()
        except sqlite3.Error as error:
            raise StoreError(f"reading the enrollment counts failed: {error}") from error
        counted = dict(rows)
        return {outcome: int(counted.get(outcome.value, 0)) for outcome in EnrollmentOutcome}

    def recent_failures(self, limit: int) -> tuple[EnrollmentFailure, ...]:
        try:
            rows = self._connection().execute(_SELECT_FAILURES, (limit,)).fetchall()
        except sqlite3.Error as error:
            raise StoreError(f"reading the recent failures failed: {error}") from error
        return tuple(EnrollmentFailure(datetime.fromisoformat(at), tx, info, reason) for at, tx, info, reason in rows)

    # -- revocation ----------------------------------------------------------------------------------------

    def revoke(self, serial: int, reason: RevocationReason, when: datetime) -> Revoked:
        key = serial_text(serial)
        try:
            with self._write() as connection:
                row = connection.execute(
                    "SELECT issuer_sha256, status, revoked_at, revocation_reason FROM certificates WHERE serial = ?",
                    (key,),
                ).fetchone()
                if row is None:
                    raise UnknownSerial(f"no certificate with serial {serial:x} is recorded")
                issuer, status, revoked_at, recorded_reason = row
                if status == CertStatus.REVOKED.value:
                    first = Revocation(serial, datetime.fromisoformat(revoked_at), RevocationReason(recorded_reason))
                    return Revoked(first, already=True)
                connection.execute(_REVOKE, (utc(when).isoformat(), RevocationReason(reason).value, key))
                connection.execute(_RAISE_REVISION, (issuer,))
        except sqlite3.Error as error:
            raise StoreError(f"revoking certificate {serial:x} failed: {error}") from error
        return Revoked(Revocation(serial, utc(when), RevocationReason(reason)), already=False)

    def revocations(self, issuer_sha256: str) -> RevocationList:
        try:
            with self._snapshot() as connection:
                revision = _revision(connection, issuer_sha256)
                rows = connection.execute(_SELECT_REVOKED, (issuer_sha256,)).fetchall()
        except sqlite3.Error as error:
            raise StoreError(f"listing revoked certificates failed: {error}") from error
        entries = tuple(
            Revocation(int(serial, 16), datetime.fromisoformat(when), RevocationReason(reason))
            for serial, when, reason in rows
        )
        return RevocationList(revision, entries)

    def revocation_revision(self, issuer_sha256: str) -> int:
        try:
            return _revision(self._connection(), issuer_sha256)
        except sqlite3.Error as error:
            raise StoreError(f"reading the revocation revision failed: {error}") from error

    def latest_crl(self, issuer_sha256: str) -> StoredCrl | None:
        try:
            row = self._connection().execute(_SELECT_CRL, (issuer_sha256,)).fetchone()
        except sqlite3.Error as error:
            raise StoreError(f"reading the CRL failed: {error}") from error
        return None if row is None else _crl_from(row)

    def save_crl(self, crl: StoredCrl) -> bool:
        try:
            with self._write() as connection:
                row = connection.execute("SELECT number FROM crls WHERE issuer_sha256 = ?", (crl.issuer_sha256,))
                current = row.fetchone()
                if current is not None and current[0] >= crl.number:
                    return False
                connection.execute(_SAVE_CRL, _crl_row(crl))
                return True
        except sqlite3.Error as error:
            raise StoreError(f"saving CRL {crl.number} failed: {error}") from error

    # -- results of revocation requests, until reported -------------------------------------------------------

    def record_request_result(self, result: RequestResult) -> RequestResult:
        row = (result.context, int(result.succeeded), result.error_code, result.error_message, _now_text())
        try:
            with self._write() as connection:
                connection.execute(f"INSERT OR IGNORE INTO request_results ({_RESULT_COLUMNS}, recorded) VALUES "
                                   "(?, ?, ?, ?, ?)", row)
                kept = connection.execute(f"{_SELECT_RESULTS} WHERE context = ?", (result.context,)).fetchone()
        except sqlite3.Error as error:
            raise StoreError(f"recording a request result failed: {error}") from error
        return _result_from(kept)

    def unreported_request_results(self, limit: int) -> tuple[RequestResult, ...]:
        try:
            rows = self._connection().execute(f"{_SELECT_RESULTS} ORDER BY recorded LIMIT ?", (limit,)).fetchall()
        except sqlite3.Error as error:
            raise StoreError(f"reading request results failed: {error}") from error
        return tuple(_result_from(row) for row in rows)

    def forget_request_results(self, contexts: Sequence[str]) -> None:
        try:
            with self._write(durable=False) as connection:
                connection.executemany("DELETE FROM request_results WHERE context = ?", [(c,) for c in contexts])
        except sqlite3.Error as error:
            raise StoreError(f"forgetting request results failed: {error}") from error

    def find_certificates(self, query: CertificateQuery) -> CertificatePage:
        sql, parameters = _inventory_sql(query)
        try:
            rows = self._connection().execute(sql, parameters).fetchall()
        except sqlite3.Error as error:
            raise StoreError(f"listing certificates failed: {error}") from error
        items = tuple(_certificate_from(row) for row in rows[: _page_size(query)])
        more = len(rows) > len(items)
        next_page = f"{utc(items[-1].not_after).isoformat()}|{serial_text(items[-1].serial)}" if more else None
        return CertificatePage(items, next_page)

    # -- helpers -----------------------------------------------------------------------------------------

    @contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: every query inside sees the same committed state (WAL snapshot)."""
        connection = self._connection()
        connection.execute("BEGIN")
        try:
            yield connection
        finally:
            connection.execute("COMMIT")

    def _set_status(self, serial: int, status: CertStatus) -> None:
        key = serial_text(serial)
        try:
            with self._write() as connection:
                changed = connection.execute(_SET_STATUS, (status.value, key)).rowcount
                known = changed or connection.execute(_CERT_EXISTS, (key,)).fetchone() is not None
        except sqlite3.Error as error:
            raise StoreError(f"marking certificate {serial:x} {status.value} failed: {error}") from error
        if not known:
            raise UnknownSerial(f"no certificate with serial {serial:x} is recorded")

    def _read_certificate(self, query: str, key: str) -> IssuedCertificate | None:
        try:
            return self._select_certificate(self._connection(), query, key)
        except sqlite3.Error as error:
            raise StoreError(f"reading certificate failed: {error}") from error

    @staticmethod
    def _select_certificate(connection: sqlite3.Connection, query: str, key: str) -> IssuedCertificate | None:
        row = connection.execute(query, (key,)).fetchone()
        return None if row is None else _certificate_from(row)


def _certificate_from(row: tuple) -> IssuedCertificate:
    serial, transaction_id, subject, issuer_sha256, not_before, not_after, thumbprint, der, status, *revoked = row
    revoked_at, reason = revoked
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
        revoked_at=None if revoked_at is None else datetime.fromisoformat(revoked_at),
        revocation_reason=None if reason is None else RevocationReason(reason),
    )


def _upgrade_to_2(connection: sqlite3.Connection) -> None:
    """Add what schema 2 has and schema 1 lacks (every statement is a no-op on a schema 2 file)."""
    present = {row[1] for row in connection.execute("PRAGMA table_info(certificates)")}
    for name, kind in _REVOCATION_COLUMNS:
        if name not in present:
            connection.execute(f"ALTER TABLE certificates ADD COLUMN {name} {kind}")
    for statement in _SCHEMA_2:
        connection.execute(statement)


def _upgrade_to_3(connection: sqlite3.Connection, version: int | None) -> None:
    """Add the SAN lookup, the thumbprint index and the enrollment outcomes; a file of version 1 or 2 gets the SAN
    rows of the certificates it already holds."""
    for statement in _SCHEMA_3:
        connection.execute(statement)
    if version is not None and version < 3:
        for serial, der in connection.execute("SELECT serial, der FROM certificates").fetchall():
            connection.executemany(_INSERT_NAME, [(name, serial) for name in certificate_names(bytes(der))])


def _count(connection: sqlite3.Connection, outcome: EnrollmentOutcome) -> None:
    connection.execute(_COUNT_OUTCOME, (hour_bucket(datetime.now(timezone.utc)), outcome.value))


def _result_from(row: tuple) -> RequestResult:
    context, succeeded, error_code, error_message = row
    return RequestResult(context, bool(succeeded), error_code, error_message)


def _revision(connection: sqlite3.Connection, issuer_sha256: str) -> int:
    row = connection.execute(_SELECT_REVISION, (issuer_sha256,)).fetchone()
    return 0 if row is None else row[0]


def _crl_row(crl: StoredCrl) -> tuple:
    return (
        crl.issuer_sha256,
        crl.number,
        crl.revision,
        utc(crl.this_update).isoformat(),
        utc(crl.next_update).isoformat(),
        crl.der,
    )


def _crl_from(row: tuple) -> StoredCrl:
    issuer, number, revision, this_update, next_update, der = row
    return StoredCrl(
        issuer_sha256=issuer,
        number=number,
        revision=revision,
        this_update=datetime.fromisoformat(this_update),
        next_update=datetime.fromisoformat(next_update),
        der=bytes(der),
    )


def _page_size(query: CertificateQuery) -> int:
    if not 1 <= query.limit <= MAX_PAGE_SIZE:
        raise ValueError(f"page size must be 1 to {MAX_PAGE_SIZE}")
    return query.limit


def _inventory_sql(query: CertificateQuery) -> tuple[str, list]:
    """SELECT for one inventory page, ordered by (not_after, serial) and keyset-paged on it."""
    conditions: list[str] = []
    parameters: list = []

    def where(condition: str, *values: object) -> None:
        conditions.append(condition)
        parameters.extend(values)

    if query.serial is not None:
        where("serial = ?", serial_text(query.serial))
    if query.subject_prefix:
        where("subject >= ? AND subject < ?", query.subject_prefix, prefix_end(query.subject_prefix))
    if query.status is not None:
        where("status = ?", CertStatus(query.status).value)
    if query.issuer_sha256 is not None:
        where("issuer_sha256 = ?", query.issuer_sha256)
    if query.san:
        where("serial IN (SELECT serial FROM certificate_names WHERE name = ?)", query.san.strip().lower())
    if query.thumbprint_sha1:
        where("upper(thumbprint_sha1) = ?", query.thumbprint_sha1.strip().upper())
    if query.expires_after is not None:
        where("not_after >= ?", utc(query.expires_after).isoformat())
    if query.expires_before is not None:
        where("not_after < ?", utc(query.expires_before).isoformat())
    if query.page:
        where("(not_after, serial) > (?, ?)", *_page_position(query.page))
    clause = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    sql = f"SELECT {_CERT_COLUMNS} FROM certificates{clause} ORDER BY not_after, serial LIMIT ?"
    return sql, [*parameters, _page_size(query) + 1]


def _page_position(token: str) -> tuple[str, str]:
    not_after, _, serial = token.partition("|")
    try:
        datetime.fromisoformat(not_after)
        int(serial, 16)
    except ValueError:
        raise ValueError("not a page token of this inventory") from None
    return not_after, serial


def _claimed_token(claim: Claim) -> str:
    if claim.outcome is not ClaimOutcome.CLAIMED or not claim.token:
        raise ValueError("only a CLAIMED transaction can be finished")
    return claim.token


def _certificate_row(certificate: IssuedCertificate, serial: str, status: CertStatus, now: str) -> tuple:
    revoked_at = certificate.revoked_at
    reason = certificate.revocation_reason
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
        None if revoked_at is None else utc(revoked_at).isoformat(),
        None if reason is None else reason.value,
        now,
    )
