"""One contract for every inventory backend: SQLite, and Azure Tables (on Azurite)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from azure.core.credentials import AzureNamedKeyCredential
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from scep.azure.tables import TableStore
from scep.store import (
    CertificateQuery,
    CertStatus,
    Claim,
    ClaimOutcome,
    EnrollmentOutcome,
    IssuedCertificate,
    RequestResult,
    Revocation,
    RevocationReason,
    SerialInUse,
    Store,
    StoredCrl,
    StoreError,
    TxState,
    UnknownSerial,
)
from scep.store.sqlite import SCHEMA_VERSION, SqliteStore
from tests.azurite import ACCOUNT_KEY, ACCOUNT_NAME

REPO_ROOT = Path(__file__).resolve().parent.parent
LEASE = timedelta(minutes=5)
KEY = "a1" * 32
OTHER_KEY = "b2" * 32

OpenStore = Callable[[], Store]


@pytest.fixture(params=["sqlite", "tables"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> OpenStore:
    """Opens stores over one shared inventory: each call is another worker or instance."""
    if request.param == "sqlite":
        path = tmp_path / "scep.db"
        return lambda: SqliteStore(path)
    emulator = request.getfixturevalue("azurite")
    prefix = "t" + uuid.uuid4().hex[:16]
    return lambda: TableStore.from_connection_string(emulator.connection_string, table_prefix=prefix)


@pytest.fixture
def store(open_store: OpenStore) -> Store:
    return open_store()


def make_certificate(transaction_id: str, serial: int | None = None, size: int = 1400) -> IssuedCertificate:
    not_before = datetime.now(timezone.utc).replace(microsecond=123456)
    return IssuedCertificate(
        serial=serial if serial is not None else (1 << 150) + int.from_bytes(os.urandom(12), "big"),
        transaction_id=transaction_id,
        subject=f"CN=device-{transaction_id},O=Contoso",
        issuer_sha256=os.urandom(32).hex(),
        not_before=not_before,
        not_after=not_before + timedelta(days=365),
        thumbprint_sha1=os.urandom(20).hex().upper(),
        der=os.urandom(size),
    )


def new_transaction_id() -> str:
    return uuid.uuid4().hex.upper()


def issue(store: Store, transaction_id: str, serial: int | None = None) -> IssuedCertificate:
    claim = store.claim(transaction_id, KEY, LEASE)
    assert claim.outcome is ClaimOutcome.CLAIMED
    certificate = make_certificate(transaction_id, serial)
    store.record_issued(claim, certificate)
    return certificate


# -- claim semantics -----------------------------------------------------------------------------------------


def test_new_transaction_is_claimed(store: Store) -> None:
    transaction_id = new_transaction_id()
    assert store.transaction_state(transaction_id) is None
    claim = store.claim(transaction_id, KEY, LEASE)
    assert claim.outcome is ClaimOutcome.CLAIMED
    assert claim.transaction_id == transaction_id
    assert claim.token
    assert claim.certificate is None
    assert store.transaction_state(transaction_id) is TxState.PROCESSING


def test_claim_while_leased_is_busy(open_store: OpenStore) -> None:
    first, second = open_store(), open_store()
    transaction_id = new_transaction_id()
    assert first.claim(transaction_id, KEY, LEASE).outcome is ClaimOutcome.CLAIMED
    assert second.claim(transaction_id, KEY, LEASE) == Claim(ClaimOutcome.BUSY, transaction_id)
    assert first.claim(transaction_id, KEY, LEASE).outcome is ClaimOutcome.BUSY


def test_expired_lease_is_claimed_again(store: Store) -> None:
    transaction_id = new_transaction_id()
    stale = store.claim(transaction_id, KEY, timedelta(milliseconds=200))
    time.sleep(0.4)
    fresh = store.claim(transaction_id, KEY, LEASE)
    assert fresh.outcome is ClaimOutcome.CLAIMED
    assert fresh.token != stale.token
    assert store.claim(transaction_id, KEY, LEASE).outcome is ClaimOutcome.BUSY


def test_failed_transaction_is_claimed_again(store: Store) -> None:
    transaction_id = new_transaction_id()
    store.record_failed(store.claim(transaction_id, KEY, LEASE), fail_info=2, reason="challenge rejected")
    assert store.transaction_state(transaction_id) is TxState.FAILED
    again = store.claim(transaction_id, KEY, LEASE)
    assert again.outcome is ClaimOutcome.CLAIMED
    assert store.transaction_state(transaction_id) is TxState.PROCESSING
    certificate = make_certificate(transaction_id)
    store.record_issued(again, certificate)
    assert store.certificate_for_transaction(transaction_id) == certificate


def test_different_key_is_a_mismatch(store: Store) -> None:
    processing, issued = new_transaction_id(), new_transaction_id()
    store.claim(processing, KEY, LEASE)
    issue(store, issued)
    for transaction_id in (processing, issued):
        assert store.claim(transaction_id, OTHER_KEY, LEASE) == Claim(ClaimOutcome.KEY_MISMATCH, transaction_id)


def test_issued_transaction_answers_with_its_certificate(open_store: OpenStore) -> None:
    first, second = open_store(), open_store()
    transaction_id = new_transaction_id()
    certificate = issue(first, transaction_id)
    for store in (first, second):
        again = store.claim(transaction_id, KEY, LEASE)
        assert again.outcome is ClaimOutcome.ISSUED
        assert again.token is None
        assert again.certificate == certificate
    assert first.transaction_state(transaction_id) is TxState.ISSUED


def test_only_a_claimed_transaction_can_be_finished(store: Store) -> None:
    transaction_id = new_transaction_id()
    store.claim(transaction_id, KEY, LEASE)
    busy = store.claim(transaction_id, KEY, LEASE)
    with pytest.raises(ValueError):
        store.record_issued(busy, make_certificate(transaction_id))
    with pytest.raises(ValueError):
        store.record_failed(busy, 2, "nope")


def test_certificate_must_belong_to_the_claimed_transaction(store: Store) -> None:
    claim = store.claim(new_transaction_id(), KEY, LEASE)
    with pytest.raises(ValueError):
        store.record_issued(claim, make_certificate(new_transaction_id()))


# -- recording and lookups -------------------------------------------------------------------------------------


def test_round_trip_keeps_every_field(store: Store) -> None:
    transaction_id = "Tx/with#odd?chars\\ and spaces"
    claim = store.claim(transaction_id, KEY, LEASE)
    eastern = timezone(timedelta(hours=-5))
    certificate = IssuedCertificate(
        serial=(1 << 159) + 0xDEADBEEF,  # the widest serial RFC 5280 allows
        transaction_id=transaction_id,
        subject="CN=Zoë,OU=Ünits,O=Contoso\\, Ltd",
        issuer_sha256="ab" * 32,
        not_before=datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=eastern),
        not_after=datetime(9999, 12, 31, 23, 59, 59),  # naive: taken as UTC
        thumbprint_sha1="0F" * 20,
        der=bytes(range(256)) * 12,
    )
    store.record_issued(claim, certificate)
    for found in (store.certificate_by_serial(certificate.serial), store.certificate_for_transaction(transaction_id)):
        assert found is not None
        assert found.serial == certificate.serial
        assert found.transaction_id == transaction_id
        assert found.subject == certificate.subject
        assert found.issuer_sha256 == certificate.issuer_sha256
        assert found.thumbprint_sha1 == certificate.thumbprint_sha1
        assert found.der == certificate.der
        assert found.status is CertStatus.ISSUED
        assert found.not_before == datetime(2025, 1, 2, 8, 4, 5, 678901, tzinfo=timezone.utc)
        assert found.not_after == datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc)
        assert found.not_before.utcoffset() == timedelta(0)
        assert found.not_after.utcoffset() == timedelta(0)
    assert store.transaction_state(transaction_id) is TxState.ISSUED


def test_unknown_lookups_are_none(store: Store) -> None:
    assert store.certificate_by_serial(424242) is None
    assert store.certificate_for_transaction("never seen") is None
    assert store.transaction_state("never seen") is None


def test_unfinished_transaction_has_no_certificate(store: Store) -> None:
    transaction_id = new_transaction_id()
    store.claim(transaction_id, KEY, LEASE)
    assert store.certificate_for_transaction(transaction_id) is None


def test_serial_in_use(store: Store) -> None:
    taken = issue(store, new_transaction_id())
    transaction_id = new_transaction_id()
    claim = store.claim(transaction_id, KEY, LEASE)
    with pytest.raises(SerialInUse):
        store.record_issued(claim, make_certificate(transaction_id, serial=taken.serial))
    assert store.certificate_by_serial(taken.serial) == taken
    assert store.transaction_state(transaction_id) is TxState.PROCESSING
    retry = make_certificate(transaction_id)  # a fresh serial: the same claim still finishes
    store.record_issued(claim, retry)
    assert store.certificate_for_transaction(transaction_id) == retry


def test_lost_lease_keeps_certificate_as_undelivered(open_store: OpenStore) -> None:
    slow, fast = open_store(), open_store()
    transaction_id = new_transaction_id()
    stale = slow.claim(transaction_id, KEY, timedelta(milliseconds=200))
    time.sleep(0.4)
    current = fast.claim(transaction_id, KEY, LEASE)
    assert current.outcome is ClaimOutcome.CLAIMED

    late = make_certificate(transaction_id)
    with pytest.raises(StoreError) as raised:
        slow.record_issued(stale, late)
    assert not isinstance(raised.value, SerialInUse)
    kept = slow.certificate_by_serial(late.serial)
    assert kept is not None
    assert kept.status is CertStatus.UNDELIVERED
    assert kept.der == late.der
    assert fast.transaction_state(transaction_id) is TxState.PROCESSING
    assert fast.certificate_for_transaction(transaction_id) is None

    winner = make_certificate(transaction_id)
    fast.record_issued(current, winner)
    assert slow.claim(transaction_id, KEY, LEASE).certificate == winner
    with pytest.raises(StoreError):
        slow.record_failed(stale, 2, "too late")
    assert slow.transaction_state(transaction_id) is TxState.ISSUED


def test_mark_undelivered(store: Store) -> None:
    transaction_id = new_transaction_id()
    certificate = issue(store, transaction_id)
    store.mark_undelivered(certificate.serial)
    found = store.certificate_by_serial(certificate.serial)
    assert found is not None
    assert found.status is CertStatus.UNDELIVERED
    assert found.der == certificate.der
    again = store.claim(transaction_id, KEY, LEASE)
    assert again.outcome is ClaimOutcome.ISSUED
    assert again.certificate is not None
    assert again.certificate.status is CertStatus.UNDELIVERED
    with pytest.raises(StoreError):
        store.mark_undelivered(certificate.serial + 1)


def test_mark_delivered_after_confirmation(store: Store) -> None:
    transaction_id = new_transaction_id()
    claim = store.claim(transaction_id, KEY, LEASE)
    withheld = replace(make_certificate(transaction_id), status=CertStatus.UNDELIVERED)
    store.record_issued(claim, withheld)  # recorded before the validator has confirmed it
    assert store.transaction_state(transaction_id) is TxState.ISSUED
    assert store.certificate_for_transaction(transaction_id) == withheld
    store.mark_delivered(withheld.serial)
    delivered = replace(withheld, status=CertStatus.ISSUED)
    assert store.certificate_by_serial(withheld.serial) == delivered
    assert store.claim(transaction_id, KEY, LEASE).certificate == delivered
    with pytest.raises(StoreError):
        store.mark_delivered(withheld.serial + 1)


def test_ping_and_describe(store: Store) -> None:
    store.ping()
    description = store.describe()
    assert description
    assert "AccountKey" not in description
    assert ("SQLite" in description) or ("Tables" in description)


# -- revocation ----------------------------------------------------------------------------------------------

WHEN = datetime(2025, 6, 1, 12, 0, 0, tzinfo=timezone.utc)


def issue_for(store: Store, issuer: str, subject: str = "", not_after: datetime | None = None) -> IssuedCertificate:
    transaction_id = new_transaction_id()
    claim = store.claim(transaction_id, KEY, LEASE)
    certificate = replace(make_certificate(transaction_id), issuer_sha256=issuer)
    if subject:
        certificate = replace(certificate, subject=subject)
    if not_after is not None:
        certificate = replace(certificate, not_after=not_after)
    store.record_issued(claim, certificate)
    return certificate


def test_revoke_records_status_time_and_reason(open_store: OpenStore) -> None:
    store, other = open_store(), open_store()
    issuer = os.urandom(32).hex()
    certificate = issue_for(store, issuer)
    assert store.revocation_revision(issuer) == 0
    done = store.revoke(certificate.serial, RevocationReason.KEY_COMPROMISE, WHEN)
    assert done.already is False
    assert done.revocation == Revocation(certificate.serial, WHEN, RevocationReason.KEY_COMPROMISE)
    found = other.certificate_by_serial(certificate.serial)
    assert found == replace(
        certificate, status=CertStatus.REVOKED, revoked_at=WHEN, revocation_reason=RevocationReason.KEY_COMPROMISE
    )
    assert other.revocation_revision(issuer) == 1
    listed = other.revocations(issuer)
    assert listed.revision == 1
    assert listed.entries == (done.revocation,)


def test_revoking_twice_keeps_the_first_time_and_reason(store: Store) -> None:
    issuer = os.urandom(32).hex()
    certificate = issue_for(store, issuer)
    first = store.revoke(certificate.serial, RevocationReason.SUPERSEDED, WHEN)
    again = store.revoke(certificate.serial, RevocationReason.KEY_COMPROMISE, WHEN + timedelta(days=1))
    assert again.already is True
    assert again.revocation == first.revocation
    assert store.revocation_revision(issuer) == 1
    assert store.revocations(issuer).entries == (first.revocation,)


def test_revoking_an_unknown_serial_is_a_clear_error(store: Store) -> None:
    with pytest.raises(UnknownSerial, match="no certificate with serial 1234abcd"):
        store.revoke(0x1234ABCD, RevocationReason.UNSPECIFIED, WHEN)
    with pytest.raises(UnknownSerial):
        store.mark_delivered(0x1234ABCD)


def test_a_revoked_certificate_stays_revoked(store: Store) -> None:
    transaction_id = new_transaction_id()
    claim = store.claim(transaction_id, KEY, LEASE)
    confirming = replace(make_certificate(transaction_id), status=CertStatus.CONFIRMING)
    store.record_issued(claim, confirming)
    store.revoke(confirming.serial, RevocationReason.CESSATION_OF_OPERATION, WHEN)
    store.mark_delivered(confirming.serial)  # a late acknowledgement does not undo the revocation
    store.mark_undelivered(confirming.serial)
    found = store.certificate_by_serial(confirming.serial)
    assert found is not None and found.status is CertStatus.REVOKED
    assert store.claim(transaction_id, KEY, LEASE).certificate == found


def test_undelivered_certificates_can_be_found_and_revoked(store: Store) -> None:
    issuer = os.urandom(32).hex()
    withheld = issue_for(store, issuer)
    delivered = issue_for(store, issuer)
    store.mark_undelivered(withheld.serial)
    page = store.find_certificates(CertificateQuery(status=CertStatus.UNDELIVERED, issuer_sha256=issuer))
    assert [item.serial for item in page.items] == [withheld.serial]
    store.revoke(withheld.serial, RevocationReason.CESSATION_OF_OPERATION, WHEN)
    assert store.find_certificates(CertificateQuery(status=CertStatus.UNDELIVERED, issuer_sha256=issuer)).items == ()
    assert [entry.serial for entry in store.revocations(issuer).entries] == [withheld.serial]
    assert store.certificate_by_serial(delivered.serial).status is CertStatus.ISSUED


def test_revocations_are_listed_per_issuing_ca(store: Store) -> None:
    old_ca, new_ca = os.urandom(32).hex(), os.urandom(32).hex()
    old = [issue_for(store, old_ca) for _ in range(3)]
    new = [issue_for(store, new_ca) for _ in range(2)]
    for certificate in (old[0], old[2], new[1]):
        store.revoke(certificate.serial, RevocationReason.AFFILIATION_CHANGED, WHEN)
    assert sorted(e.serial for e in store.revocations(old_ca).entries) == sorted([old[0].serial, old[2].serial])
    assert [e.serial for e in store.revocations(new_ca).entries] == [new[1].serial]
    assert (store.revocation_revision(old_ca), store.revocation_revision(new_ca)) == (2, 1)
    assert store.revocations(os.urandom(32).hex()).entries == ()


def test_concurrent_revocations_raise_the_revision_once_each(open_store: OpenStore) -> None:
    stores = [open_store(), open_store()]
    issuer = os.urandom(32).hex()
    certificates = [issue_for(stores[0], issuer) for _ in range(12)]
    outcomes = _race(12, lambda i: stores[i % 2].revoke(certificates[i].serial, RevocationReason.UNSPECIFIED, WHEN))
    assert not any(outcome.already for outcome in outcomes)
    listed = stores[1].revocations(issuer)
    assert listed.revision == 12
    assert sorted(entry.serial for entry in listed.entries) == sorted(c.serial for c in certificates)


# -- CRL storage -------------------------------------------------------------------------------------------------


def make_crl(issuer: str, number: int, revision: int = 0, size: int = 300) -> StoredCrl:
    return StoredCrl(issuer, number, revision, WHEN, WHEN + timedelta(days=7), os.urandom(size))


def test_crl_is_saved_only_with_a_higher_number(open_store: OpenStore) -> None:
    store, other = open_store(), open_store()
    issuer = os.urandom(32).hex()
    assert store.latest_crl(issuer) is None
    first = make_crl(issuer, 1)
    assert store.save_crl(first) is True
    assert other.latest_crl(issuer) == first
    assert other.save_crl(make_crl(issuer, 1)) is False
    second = make_crl(issuer, 2, revision=4)
    assert other.save_crl(second) is True
    assert store.save_crl(make_crl(issuer, 1)) is False
    assert store.latest_crl(issuer) == second
    assert store.latest_crl(os.urandom(32).hex()) is None


def test_large_crl_round_trips(store: Store) -> None:
    issuer = os.urandom(32).hex()
    big = make_crl(issuer, 7, size=300_000)  # beyond one Tables property and one entity
    assert store.save_crl(big)
    assert store.latest_crl(issuer) == big
    bigger = make_crl(issuer, 8, size=120_000)
    assert store.save_crl(bigger)
    assert store.latest_crl(issuer) == bigger


def test_concurrent_crl_saves_never_go_backwards(open_store: OpenStore) -> None:
    stores = [open_store(), open_store()]
    issuer = os.urandom(32).hex()
    candidates = [make_crl(issuer, number, size=60_000) for number in (3, 1, 5, 2, 4, 5, 3, 1)]
    saved = _race(8, lambda i: stores[i % 2].save_crl(candidates[i]))
    latest = stores[0].latest_crl(issuer)
    assert latest is not None and latest.number == 5
    assert latest in [c for c, ok in zip(candidates, saved, strict=True) if ok]
    assert sum(1 for c, ok in zip(candidates, saved, strict=True) if ok and c.number == 5) == 1


def test_request_results_are_kept_first_wins_until_forgotten(open_store: OpenStore) -> None:
    first, second = open_store(), open_store()
    context = "ctx/#?\\" + uuid.uuid4().hex  # characters Tables forbids in keys
    revoked = RequestResult(context, True, "0", "")
    assert first.record_request_result(revoked) == revoked
    assert second.record_request_result(RequestResult(context, False, "4005", "already revoked")) == revoked
    other = first.record_request_result(RequestResult("other", False, "4004", "not found"))
    assert set(second.unreported_request_results(10)) == {revoked, other}
    assert len(second.unreported_request_results(1)) == 1
    second.forget_request_results([context, "never-recorded"])
    assert first.unreported_request_results(10) == (other,)


def test_concurrent_request_results_keep_exactly_one(open_store: OpenStore) -> None:
    stores = [open_store(), open_store()]
    candidates = [RequestResult("shared", i == 0, "0" if i == 0 else f"410{i}", "") for i in range(4)]
    kept = _race(4, lambda i: stores[i % 2].record_request_result(candidates[i]))
    assert len(set(kept)) == 1 and kept[0] in candidates
    assert stores[0].unreported_request_results(10) == (kept[0],)


# -- inventory ---------------------------------------------------------------------------------------------------


def test_inventory_filters_and_pages(store: Store) -> None:
    issuer = os.urandom(32).hex()
    base = datetime(2030, 1, 1, tzinfo=timezone.utc)
    tag = uuid.uuid4().hex[:8]
    made = [
        issue_for(store, issuer, subject=f"CN={tag}-{index:02d},O=Contoso", not_after=base + timedelta(days=index))
        for index in range(7)
    ]
    store.revoke(made[3].serial, RevocationReason.UNSPECIFIED, WHEN)

    def collect(query: CertificateQuery) -> list[int]:
        serials, page = [], None
        while True:
            result = store.find_certificates(replace(query, page=page, limit=2))
            assert len(result.items) <= 2
            serials += [item.serial for item in result.items]
            if result.next_page is None:
                return serials
            page = result.next_page

    everything = collect(CertificateQuery(issuer_sha256=issuer))
    assert sorted(everything) == sorted(c.serial for c in made) and len(set(everything)) == 7
    assert sorted(collect(CertificateQuery(subject_prefix=f"CN={tag}-0"))) == sorted(c.serial for c in made)
    assert collect(CertificateQuery(subject_prefix=f"CN={tag}-05")) == [made[5].serial]
    assert collect(CertificateQuery(status=CertStatus.REVOKED, issuer_sha256=issuer)) == [made[3].serial]
    window = CertificateQuery(
        issuer_sha256=issuer, expires_after=base + timedelta(days=2), expires_before=base + timedelta(days=4)
    )
    assert sorted(collect(window)) == sorted([made[2].serial, made[3].serial])
    assert collect(CertificateQuery(serial=made[6].serial)) == [made[6].serial]
    assert store.find_certificates(CertificateQuery(serial=made[6].serial)).items[0] == made[6]


def test_inventory_refuses_bad_pages(store: Store) -> None:
    with pytest.raises(ValueError):
        store.find_certificates(CertificateQuery(page="not a token"))
    with pytest.raises(ValueError):
        store.find_certificates(CertificateQuery(limit=0))


def der_with_names(*names: x509.GeneralName) -> bytes:
    """A real certificate DER carrying these subjectAltNames (the SAN lookup reads them from the DER)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "san test")])
    now = datetime.now(timezone.utc)
    builder = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def issue_with_names(store: Store, *names: x509.GeneralName) -> IssuedCertificate:
    transaction_id = new_transaction_id()
    claim = store.claim(transaction_id, KEY, LEASE)
    certificate = replace(make_certificate(transaction_id), der=der_with_names(*names))
    store.record_issued(claim, certificate)
    return certificate


def test_inventory_finds_certificates_by_san_and_thumbprint(store: Store) -> None:
    tag = uuid.uuid4().hex[:8]
    laptop = issue_with_names(store, x509.DNSName(f"{tag}-laptop.contoso.test"), x509.RFC822Name(f"{tag}@contoso.test"))
    phone = issue_with_names(store, x509.DNSName(f"{tag}-phone.contoso.test"), x509.RFC822Name(f"{tag}@contoso.test"))
    issue(store, new_transaction_id())  # no SAN at all

    def serials(query: CertificateQuery) -> list[int]:
        return sorted(item.serial for item in store.find_certificates(query).items)

    assert serials(CertificateQuery(san=f"{tag.upper()}-LAPTOP.contoso.test")) == [laptop.serial]
    assert serials(CertificateQuery(san=f"{tag}@contoso.test")) == sorted([laptop.serial, phone.serial])
    assert serials(CertificateQuery(san=f"{tag}-nothing.contoso.test")) == []
    assert serials(CertificateQuery(thumbprint_sha1=phone.thumbprint_sha1.lower())) == [phone.serial]
    both = CertificateQuery(san=f"{tag}@contoso.test", thumbprint_sha1=laptop.thumbprint_sha1)
    assert serials(both) == [laptop.serial]
    store.revoke(phone.serial, RevocationReason.KEY_COMPROMISE, WHEN)
    shared = CertificateQuery(san=f"{tag}@contoso.test", status=CertStatus.REVOKED)
    assert store.find_certificates(shared).items[0].status is CertStatus.REVOKED and serials(shared) == [phone.serial]
    first = store.find_certificates(CertificateQuery(san=f"{tag}@contoso.test", limit=1))
    assert len(first.items) == 1 and first.next_page is not None
    second = store.find_certificates(CertificateQuery(san=f"{tag}@contoso.test", limit=1, page=first.next_page))
    assert {first.items[0].serial, second.items[0].serial} == {laptop.serial, phone.serial}
    assert second.next_page is None


def test_enrollment_outcomes_are_counted_per_hour_and_failures_kept(open_store: OpenStore) -> None:
    store, other = open_store(), open_store()
    hour_ago = datetime.now(timezone.utc) - timedelta(hours=1)
    assert store.enrollment_counts(hour_ago) == dict.fromkeys(EnrollmentOutcome, 0)
    issue(store, new_transaction_id())
    issue(other, new_transaction_id())
    store.count_pending()
    refused = new_transaction_id()
    store.record_failed(store.claim(refused, KEY, LEASE), fail_info=2, reason="challenge rejected")
    store.record_failed(other.claim(refused, KEY, LEASE), fail_info=0, reason="bad algorithm")
    counts = other.enrollment_counts(hour_ago)
    assert counts == {EnrollmentOutcome.ISSUED: 2, EnrollmentOutcome.FAILED: 2, EnrollmentOutcome.PENDING: 1}
    assert store.enrollment_counts(datetime.now(timezone.utc) + timedelta(hours=2))[EnrollmentOutcome.ISSUED] == 0
    failures = other.recent_failures(10)
    assert [(f.transaction_id, f.fail_info, f.reason) for f in failures] == [
        (refused, 0, "bad algorithm"), (refused, 2, "challenge rejected")
    ]  # both attempts, newest first, though the transaction keeps only its last state
    assert failures[0].at >= failures[1].at >= hour_ago
    assert len(other.recent_failures(1)) == 1


def test_a_released_job_claim_counts_no_enrollment(open_store: OpenStore) -> None:
    store = open_store()
    hour_ago = datetime.now(timezone.utc) - timedelta(hours=1)
    job = "maintenance:job:".ljust(300, "-")
    store.release(store.claim(job, KEY, LEASE), "done")
    assert store.claim(job, KEY, LEASE).outcome is ClaimOutcome.CLAIMED  # released: free to claim again
    assert store.enrollment_counts(hour_ago) == dict.fromkeys(EnrollmentOutcome, 0)
    assert not store.recent_failures(10)


# -- concurrency ------------------------------------------------------------------------------------------------


def _race(workers: int, action: Callable[[int], object]) -> list:
    start = threading.Barrier(workers)

    def run(index: int) -> object:
        start.wait()
        return action(index)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(run, range(workers)))


def test_threads_claiming_one_transaction_exactly_one_wins(open_store: OpenStore) -> None:
    stores = [open_store(), open_store()]  # two workers / instances, many threads each
    transaction_id = new_transaction_id()
    outcomes = _race(16, lambda i: stores[i % 2].claim(transaction_id, KEY, LEASE).outcome)
    assert outcomes.count(ClaimOutcome.CLAIMED) == 1
    assert outcomes.count(ClaimOutcome.BUSY) == 15


def test_threads_retaking_an_expired_transaction_exactly_one_wins(open_store: OpenStore) -> None:
    stores = [open_store(), open_store()]
    transaction_id = new_transaction_id()
    stores[0].claim(transaction_id, KEY, timedelta(milliseconds=100))
    time.sleep(0.3)
    outcomes = _race(12, lambda i: stores[i % 2].claim(transaction_id, KEY, LEASE).outcome)
    assert outcomes.count(ClaimOutcome.CLAIMED) == 1
    assert outcomes.count(ClaimOutcome.BUSY) == 11


def test_concurrent_issuance_loses_no_rows(open_store: OpenStore) -> None:
    stores = [open_store(), open_store()]
    per_thread = 15

    def issue_many(index: int) -> list[IssuedCertificate]:
        return [issue(stores[index % 2], new_transaction_id()) for _ in range(per_thread)]

    issued = [certificate for batch in _race(8, issue_many) for certificate in batch]
    assert len(issued) == 8 * per_thread
    reader = open_store()
    for certificate in issued:
        assert reader.certificate_by_serial(certificate.serial) == certificate
        assert reader.certificate_for_transaction(certificate.transaction_id) == certificate
        assert reader.transaction_state(certificate.transaction_id) is TxState.ISSUED


# -- Tables specifics -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("open_store", ["tables"], indirect=True)
def test_tables_refuses_certificates_over_the_property_limit(store: Store) -> None:
    transaction_id = new_transaction_id()
    claim = store.claim(transaction_id, KEY, LEASE)
    with pytest.raises(StoreError):
        store.record_issued(claim, make_certificate(transaction_id, size=64 * 1024 + 1))
    big = make_certificate(transaction_id, size=64 * 1024)
    store.record_issued(claim, big)
    assert store.certificate_by_serial(big.serial) == big


def test_tables_from_endpoint_and_credential(azurite) -> None:
    credential = AzureNamedKeyCredential(ACCOUNT_NAME, ACCOUNT_KEY)
    prefix = "e" + uuid.uuid4().hex[:12]
    store = TableStore(azurite.table_endpoint, credential, table_prefix=prefix)
    store.ping()
    assert store.describe() == (
        f"Azure Tables at {azurite.table_endpoint} ({prefix}Transactions, {prefix}Certificates)"
    )
    certificate = issue(store, new_transaction_id())
    other = TableStore.from_connection_string(azurite.connection_string, table_prefix=prefix)
    assert other.certificate_by_serial(certificate.serial) == certificate


def test_tables_rejects_bad_prefix() -> None:
    with pytest.raises(ValueError):
        TableStore.from_connection_string("UseDevelopmentStorage=true", table_prefix="9-bad")


def test_tables_unreachable_endpoint_is_a_store_error() -> None:
    with socket.socket() as reserved:
        reserved.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = reserved.getsockname()[1]
        store = TableStore.from_connection_string(
            f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={ACCOUNT_KEY};"
            f"TableEndpoint=http://127.0.0.1:{port}/devstoreaccount1;"
        )
        assert str(port) in store.describe()
        with pytest.raises(StoreError):
            store.ping()


# -- SQLite specifics -------------------------------------------------------------------------------------------


def _claim_in_child(path: Path, transaction_id: str, start, results) -> None:
    store = SqliteStore(path)
    start.wait()
    results.put(store.claim(transaction_id, KEY, LEASE).outcome.value)


def _issue_in_child(store: SqliteStore, count: int, results) -> None:
    for _ in range(count):
        transaction_id = new_transaction_id()
        certificate = issue(store, transaction_id)
        results.put((transaction_id, certificate.serial))


def test_sqlite_processes_claiming_one_transaction_exactly_one_wins(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    transaction_id = new_transaction_id()
    SqliteStore(tmp_path / "scep.db")
    start, results = context.Barrier(4), context.Queue()
    children = [
        context.Process(target=_claim_in_child, args=(tmp_path / "scep.db", transaction_id, start, results))
        for _ in range(4)
    ]
    for child in children:
        child.start()
    outcomes = sorted(results.get(timeout=60) for _ in children)
    for child in children:
        child.join(timeout=30)
        assert child.exitcode == 0
    assert outcomes == ["busy", "busy", "busy", "claimed"]


def test_sqlite_forked_workers_share_one_inventory(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "scep.db")
    issue(store, new_transaction_id())  # the parent holds an open connection when it forks
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    children = [context.Process(target=_issue_in_child, args=(store, 25, results)) for _ in range(3)]
    for child in children:
        child.start()
    recorded = [results.get(timeout=60) for _ in range(3 * 25)]
    for child in children:
        child.join(timeout=30)
        assert child.exitcode == 0
    for transaction_id, serial in recorded:
        found = store.certificate_by_serial(serial)
        assert found is not None and found.transaction_id == transaction_id
        assert store.transaction_state(transaction_id) is TxState.ISSUED


_RECORD_UNTIL_KILLED = """
import os, sys, uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from scep.store import IssuedCertificate
from scep.store.sqlite import SqliteStore

store = SqliteStore(Path(sys.argv[1]))
serial = 1000
while True:
    serial += 1
    transaction_id = uuid.uuid4().hex
    claim = store.claim(transaction_id, "k", timedelta(minutes=5))
    now = datetime.now(timezone.utc)
    der = os.urandom(1200)
    certificate = IssuedCertificate(serial, transaction_id, "CN=x", "00", now, now, "00", der)
    store.record_issued(claim, certificate)
    print(transaction_id, serial, der.hex(), flush=True)
"""


def test_sqlite_recorded_certificate_survives_kill(tmp_path: Path) -> None:
    path = tmp_path / "scep.db"
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", _RECORD_UNTIL_KILLED, str(path)],
        cwd=REPO_ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        reported = [child.stdout.readline().split() for _ in range(40)]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
    assert all(len(fields) == 3 for fields in reported), reported
    store = SqliteStore(path)
    for transaction_id, serial, der in reported:
        found = store.certificate_by_serial(int(serial))
        assert found is not None
        assert found.der.hex() == der
        assert found.status is CertStatus.ISSUED
        assert store.transaction_state(transaction_id) is TxState.ISSUED


def test_sqlite_schema_is_created_once_and_versioned(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "nested" / "scep.db"
    first = SqliteStore(path)
    certificate = issue(first, new_transaction_id())
    second = SqliteStore(path)  # reopening keeps everything
    assert second.certificate_by_serial(certificate.serial) == certificate
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        raw.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError):
        SqliteStore(path)


def test_sqlite_unusable_path_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError):
        SqliteStore(blocker / "scep.db")


_SCHEMA_1_CERTIFICATES = """CREATE TABLE certificates (
    serial TEXT PRIMARY KEY, transaction_id TEXT NOT NULL, subject TEXT NOT NULL, issuer_sha256 TEXT NOT NULL,
    not_before TEXT NOT NULL, not_after TEXT NOT NULL, thumbprint_sha1 TEXT NOT NULL, der BLOB NOT NULL,
    status TEXT NOT NULL, created TEXT NOT NULL)"""


def test_sqlite_schema_1_file_is_upgraded_and_its_records_read(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as raw:
        raw.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        raw.execute("INSERT INTO schema_version VALUES (1)")
        raw.execute(_SCHEMA_1_CERTIFICATES)
        raw.execute(
            "INSERT INTO certificates VALUES (?, 'T1', 'CN=old', ?, '2024-01-01T00:00:00+00:00',"
            " '2026-01-01T00:00:00+00:00', 'AB', x'3000', 'issued', '2024-01-01T00:00:00+00:00')",
            (f"{0xABC:040x}", "cd" * 32),
        )
    store = SqliteStore(path)
    old = store.certificate_by_serial(0xABC)
    assert old is not None and old.subject == "CN=old" and old.issuer_sha256 == "cd" * 32
    assert old.status is CertStatus.ISSUED and old.revoked_at is None
    store.revoke(0xABC, RevocationReason.SUPERSEDED, WHEN)
    assert [entry.serial for entry in store.revocations("cd" * 32).entries] == [0xABC]
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


def test_sqlite_inventory_of_100000_certificates_uses_indexes(tmp_path: Path) -> None:
    import sqlite3

    from scep.store.sqlite import _INSERT_CERT, _inventory_sql

    path = tmp_path / "big.db"
    store = SqliteStore(path)
    issuer = "ef" * 32
    base = datetime(2030, 1, 1, tzinfo=timezone.utc)
    statuses = ["issued"] * 8 + ["revoked", "undelivered"]
    rows = [
        (
            f"{index + 1:040x}",
            f"T{index}",
            f"CN=device-{index:06d},O=Contoso",
            issuer,
            base.isoformat(),
            (base + timedelta(minutes=index)).isoformat(),
            "00",
            b"\x30\x00",
            statuses[index % 10],
            WHEN.isoformat() if statuses[index % 10] == "revoked" else None,
            "superseded" if statuses[index % 10] == "revoked" else None,
            base.isoformat(),
        )
        for index in range(100_000)
    ]
    with sqlite3.connect(path) as raw:
        raw.executemany(_INSERT_CERT, rows)
    queries = [
        CertificateQuery(status=CertStatus.UNDELIVERED),
        CertificateQuery(subject_prefix="CN=device-0999"),
        CertificateQuery(expires_after=base + timedelta(days=30)),
        CertificateQuery(status=CertStatus.REVOKED, issuer_sha256=issuer),
        CertificateQuery(),
    ]
    with sqlite3.connect(path) as raw:
        for query in queries:
            sql, parameters = _inventory_sql(replace(query, page=f"{base.isoformat()}|{1:040x}"))
            steps = [row[-1] for row in raw.execute(f"EXPLAIN QUERY PLAN {sql}", parameters)]
            reads = [step for step in steps if step.startswith(("SCAN", "SEARCH"))]
            assert reads and all("USING INDEX" in step for step in reads), steps
    page, seen, started = None, 0, time.perf_counter()
    for _ in range(50):  # fifty pages deep into the undelivered tenth
        result = store.find_certificates(CertificateQuery(status=CertStatus.UNDELIVERED, limit=100, page=page))
        assert all(item.status is CertStatus.UNDELIVERED for item in result.items)
        seen += len(result.items)
        page = result.next_page
    assert seen == 5000
    assert time.perf_counter() - started < 5  # keyset paging: each page is an index range read
    started = time.perf_counter()
    assert len(store.revocations(issuer).entries) == 10_000
    assert time.perf_counter() - started < 5


def test_sqlite_san_and_thumbprint_lookups_over_100000_certificates(tmp_path: Path) -> None:
    """Correctness of the lookups at volume, and that each reads an index (the timings are in the docs)."""
    import sqlite3

    from scep.store.sqlite import _INSERT_CERT, _INSERT_NAME, _inventory_sql

    path = tmp_path / "lookups.db"
    store = SqliteStore(path)
    base = datetime(2030, 1, 1, tzinfo=timezone.utc)
    rows = [
        (f"{index + 1:040x}", f"T{index}", f"CN=device-{index:06d}", "ef" * 32, base.isoformat(),
         (base + timedelta(minutes=index)).isoformat(), f"{index:040X}", b"\x30\x00", "issued", None, None,
         base.isoformat())
        for index in range(100_000)
    ]
    names = [(f"device-{index:06d}.contoso.test", f"{index + 1:040x}") for index in range(100_000)]
    with sqlite3.connect(path) as raw:
        raw.executemany(_INSERT_CERT, rows)
        raw.executemany(_INSERT_NAME, names)
    by_san = store.find_certificates(CertificateQuery(san="DEVICE-073421.contoso.test"))
    assert [item.serial for item in by_san.items] == [73_422] and by_san.next_page is None
    by_thumbprint = store.find_certificates(CertificateQuery(thumbprint_sha1=f"{73_421:040x}"))
    assert [item.subject for item in by_thumbprint.items] == ["CN=device-073421"]
    assert store.find_certificates(CertificateQuery(san="nobody.contoso.test")).items == ()
    with sqlite3.connect(path) as raw:
        for query in (CertificateQuery(san="device-073421.contoso.test"), CertificateQuery(thumbprint_sha1="AB" * 20)):
            sql, parameters = _inventory_sql(query)
            steps = [row[-1] for row in raw.execute(f"EXPLAIN QUERY PLAN {sql}", parameters)]
            reads = [step for step in steps if step.startswith(("SCAN", "SEARCH"))]
            assert reads and all(step.startswith("SEARCH") for step in reads), steps  # no table scan
