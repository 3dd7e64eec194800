"""Revocation: where certificates point, CRLs (built, signed through custody, verified by OpenSSL, published when
due, concurrently), and the OCSP responder (answers checked by OpenSSL and cryptography)."""

from __future__ import annotations

import hashlib
import multiprocessing
import subprocess
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from scep.azure.tables import TableStore
from scep.core.ca import CaOptions, init_root, issue_ocsp_signer, promote, rollover
from scep.core.issuer import Profile, ca_id, device_certificate, random_serial
from scep.core.ocsp import OcspResponder, authorities, home_authorities
from scep.core.revocation import (
    DEFAULT_CRL_VALIDITY,
    build_crl,
    crl_headers,
    publish_due,
    signing_generations,
)
from scep.keys import KeyHandle, KeySpec, SignaturePadding
from scep.keys.local import LocalHome
from scep.store import (
    CertStatus,
    ClaimOutcome,
    IssuedCertificate,
    Revocation,
    RevocationReason,
    Store,
    StoreError,
)
from scep.store.sqlite import SqliteStore

BASE_URL = "http://pki.example.test"
LEASE = timedelta(minutes=5)
PEM = serialization.Encoding.PEM
DER = serialization.Encoding.DER


@pytest.fixture
def home(tmp_path: Path) -> LocalHome:
    keys = LocalHome(tmp_path / "ca")
    init_root(keys, CaOptions(subject="CN=Revocation Test CA,O=Contoso", spec=KeySpec("EC", curve="P-256")))
    return keys


@pytest.fixture(params=["sqlite", "tables"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "sqlite":
        return lambda: SqliteStore(tmp_path / "scep.db")
    emulator = request.getfixturevalue("azurite")
    prefix = "r" + uuid.uuid4().hex[:16]
    return lambda: TableStore.from_connection_string(emulator.connection_string, table_prefix=prefix)


@pytest.fixture
def store(tmp_path: Path) -> SqliteStore:
    return SqliteStore(tmp_path / "scep.db")


def _csr(common_name: str) -> x509.CertificateSigningRequest:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    return x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())


def enroll(
    store: Store, ca: KeyHandle, name: str = "device", status: CertStatus = CertStatus.ISSUED
) -> x509.Certificate:
    """Issue a device certificate the way the service does and record it."""
    certificate = device_certificate(_csr(name), ca, Profile(public_base_url=BASE_URL), random_serial())
    transaction_id = uuid.uuid4().hex
    claim = store.claim(transaction_id, "k" * 64, LEASE)
    assert claim.outcome is ClaimOutcome.CLAIMED
    der = certificate.public_bytes(DER)
    store.record_issued(
        claim,
        IssuedCertificate(
            serial=certificate.serial_number,
            transaction_id=transaction_id,
            subject=certificate.subject.rfc4514_string(),
            issuer_sha256=ca_id(ca.certificate),
            not_before=certificate.not_valid_before_utc,
            not_after=certificate.not_valid_after_utc,
            thumbprint_sha1=hashlib.sha1(der).hexdigest().upper(),
            der=der,
            status=status,
        ),
    )
    return certificate


def write_pem(path: Path, *items: x509.Certificate | x509.CertificateRevocationList) -> Path:
    path.write_bytes(b"".join(item.public_bytes(PEM) for item in items))
    return path


def openssl(*arguments: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", *map(str, arguments)], capture_output=True, text=True, timeout=60)


# -- where to check ------------------------------------------------------------------------------------------


def test_device_certificates_name_the_crl_the_ca_and_the_responder(home: LocalHome, store: SqliteStore) -> None:
    ca = home.keys().ca
    certificate = enroll(store, ca)
    identifier = ca_id(ca.certificate)
    points = certificate.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert [name.value for name in points[0].full_name] == [f"{BASE_URL}/api/crl/{identifier}.crl"]
    access = certificate.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    assert {(item.access_method, item.access_location.value) for item in access} == {
        (x509.AuthorityInformationAccessOID.OCSP, f"{BASE_URL}/api/ocsp"),
        (x509.AuthorityInformationAccessOID.CA_ISSUERS, f"{BASE_URL}/api/ca/{identifier}.der"),
    }
    plain = device_certificate(_csr("plain"), ca, Profile(), random_serial())
    for extension in (x509.CRLDistributionPoints, x509.AuthorityInformationAccess):
        with pytest.raises(x509.ExtensionNotFound):
            plain.extensions.get_extension_for_class(extension)


# -- CRL -----------------------------------------------------------------------------------------------------


def test_crl_contents_verify_with_openssl(home: LocalHome, store: SqliteStore, tmp_path: Path) -> None:
    ca = home.keys().ca
    good, compromised, unspecified = (enroll(store, ca, name) for name in ("good", "lost", "gone"))
    when = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(hours=1)
    store.revoke(compromised.serial_number, RevocationReason.KEY_COMPROMISE, when)
    store.revoke(unspecified.serial_number, RevocationReason.UNSPECIFIED, when)
    report = publish_due(store, signing_generations(home))
    assert [(p.number, p.published, p.why) for p in report.publications] == [(1, True, "first")]

    stored = store.latest_crl(ca_id(ca.certificate))
    crl = x509.load_der_x509_crl(stored.der)
    assert crl.is_signature_valid(ca.certificate.public_key())
    assert crl.issuer == ca.certificate.subject
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 1
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert crl.next_update_utc - crl.last_update_utc == DEFAULT_CRL_VALIDITY
    lost = crl.get_revoked_certificate_by_serial_number(compromised.serial_number)
    assert lost.revocation_date_utc == when
    assert lost.extensions.get_extension_for_class(x509.CRLReason).value.reason is x509.ReasonFlags.key_compromise
    gone = crl.get_revoked_certificate_by_serial_number(unspecified.serial_number)
    assert len(gone.extensions) == 0  # no reasonCode for unspecified, no invalidityDate ever
    assert crl.get_revoked_certificate_by_serial_number(good.serial_number) is None

    ca_pem = write_pem(tmp_path / "ca.pem", ca.certificate)
    crl_pem = write_pem(tmp_path / "crl.pem", crl)
    checked = openssl("crl", "-in", crl_pem, "-CAfile", ca_pem, "-noout", "-verify")
    assert checked.returncode == 0 and "verify OK" in checked.stderr + checked.stdout, checked
    accepted = openssl(
        "verify", "-crl_check", "-CAfile", ca_pem, "-CRLfile", crl_pem, write_pem(tmp_path / "g.pem", good)
    )
    assert accepted.returncode == 0, accepted
    refused = openssl(
        "verify", "-crl_check", "-CAfile", ca_pem, "-CRLfile", crl_pem, write_pem(tmp_path / "l.pem", compromised)
    )
    assert refused.returncode != 0 and "certificate revoked" in refused.stdout + refused.stderr, refused


def test_crl_is_signed_with_one_key_operation_and_lists_many_entries(home: LocalHome, tmp_path: Path) -> None:
    counting = CountingHandle(home.keys().ca)
    start = datetime(2025, 1, 1, tzinfo=timezone.utc)
    entries = [
        Revocation(serial, start + timedelta(seconds=serial), RevocationReason.SUPERSEDED) for serial in range(1, 3001)
    ]
    crl = build_crl(counting, entries, 42, start + timedelta(days=1))
    assert counting.signatures == 1
    assert len(crl) == 3000
    assert {revoked.serial_number for revoked in crl} == set(range(1, 3001))
    checked = openssl(
        "crl",
        "-in",
        write_pem(tmp_path / "big.pem", crl),
        "-CAfile",
        write_pem(tmp_path / "ca.pem", counting.certificate),
        "-noout",
        "-verify",
    )
    assert checked.returncode == 0, checked


def test_publication_is_due_first_after_a_revocation_and_at_half_life(home: LocalHome, store: SqliteStore) -> None:
    ca = home.keys().ca
    certificate = enroll(store, ca)
    now = datetime.now(timezone.utc)
    generations = signing_generations(home)
    assert publish_due(store, generations, now).publications[0].why == "first"
    assert publish_due(store, generations, now + timedelta(hours=1)).publications[0].published is False
    store.revoke(certificate.serial_number, RevocationReason.PRIVILEGE_WITHDRAWN, now)
    again = publish_due(store, generations, now + timedelta(hours=2)).publications[0]
    assert (again.number, again.published, again.why) == (2, True, "revocation")
    assert publish_due(store, generations, now + timedelta(days=3)).publications[0].published is False
    halfway = publish_due(store, generations, now + timedelta(hours=2) + DEFAULT_CRL_VALIDITY / 2).publications[0]
    assert (halfway.number, halfway.why) == (3, "half-life")
    latest = store.latest_crl(ca_id(ca.certificate))
    headers = crl_headers(latest, latest.this_update)
    assert headers["Content-Type"] == "application/pkix-crl"
    assert headers["Cache-Control"].startswith(f"public, max-age={int(DEFAULT_CRL_VALIDITY.total_seconds())},")


def test_withheld_certificates_are_revoked_by_the_publication_job(home: LocalHome, store: SqliteStore) -> None:
    ca = home.keys().ca
    withheld = enroll(store, ca, "withheld")
    store.mark_undelivered(withheld.serial_number)
    report = publish_due(store, signing_generations(home))
    assert report.withheld_revoked == (withheld.serial_number,)
    record = store.certificate_by_serial(withheld.serial_number)
    assert record.revocation_reason is RevocationReason.CESSATION_OF_OPERATION
    crl = x509.load_der_x509_crl(store.latest_crl(ca_id(ca.certificate)).der)
    entry = crl.get_revoked_certificate_by_serial_number(withheld.serial_number)
    assert (
        entry.extensions.get_extension_for_class(x509.CRLReason).value.reason is x509.ReasonFlags.cessation_of_operation
    )
    assert publish_due(store, signing_generations(home)).withheld_revoked == ()


def test_every_generation_in_use_gets_its_own_crl(home: LocalHome, store: SqliteStore) -> None:
    first_ca = home.keys().ca
    old = enroll(store, first_ca, "old")
    store.revoke(old.serial_number, RevocationReason.SUPERSEDED, datetime.now(timezone.utc))
    rollover(home, CaOptions(subject="CN=Revocation Test CA 2,O=Contoso", spec=KeySpec("EC", curve="P-256")))
    promote(home)
    keys = home.keys()
    assert keys.retired == (first_ca.certificate,)
    report = publish_due(store, signing_generations(home))
    assert {p.ca_id for p in report.publications} == {ca_id(keys.ca.certificate), ca_id(first_ca.certificate)}
    retired_crl = x509.load_der_x509_crl(store.latest_crl(ca_id(first_ca.certificate)).der)
    assert retired_crl.is_signature_valid(first_ca.certificate.public_key())
    assert retired_crl.get_revoked_certificate_by_serial_number(old.serial_number) is not None
    current_crl = x509.load_der_x509_crl(store.latest_crl(ca_id(keys.ca.certificate)).der)
    assert current_crl.is_signature_valid(keys.ca.certificate.public_key()) and len(current_crl) == 0


def test_concurrent_publishers_lose_no_revocation(home: LocalHome, open_store) -> None:
    stores = [open_store(), open_store()]
    generations = signing_generations(home)
    ca = generations[0]
    certificates = [enroll(stores[0], ca, f"d{index}") for index in range(8)]
    publish_due(stores[0], generations)
    start = threading.Barrier(8)

    def revoke_and_publish(index: int) -> list[int]:
        store = stores[index % 2]
        start.wait()
        store.revoke(certificates[index].serial_number, RevocationReason.KEY_COMPROMISE, datetime.now(timezone.utc))
        return [p.number for p in publish_due(store, generations).publications if p.published]

    with ThreadPoolExecutor(max_workers=8) as pool:
        published = [number for numbers in pool.map(revoke_and_publish, range(8)) for number in numbers]
    assert len(published) == len(set(published))  # every cRLNumber was stored once
    latest = stores[1].latest_crl(ca_id(ca.certificate))
    crl = x509.load_der_x509_crl(latest.der)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == latest.number == max(published)
    assert {revoked.serial_number for revoked in crl} == {c.serial_number for c in certificates}
    assert latest.revision == stores[0].revocation_revision(ca_id(ca.certificate)) == 8


# -- OCSP ----------------------------------------------------------------------------------------------------


@dataclass
class CountingHandle:
    """A KeyHandle that counts the signatures custody makes."""

    inner: KeyHandle
    signatures: int = 0

    @property
    def certificate(self) -> x509.Certificate:
        return self.inner.certificate

    def sign_digest(
        self, digest: bytes, hash_name: str, padding: SignaturePadding = SignaturePadding.PKCS1V15
    ) -> bytes:
        self.signatures += 1
        return self.inner.sign_digest(digest, hash_name, padding)

    def unwrap_key(self, wrapped_key, transport):
        return self.inner.unwrap_key(wrapped_key, transport)


@pytest.fixture
def responder_parts(home: LocalHome, store: SqliteStore):
    issue_ocsp_signer(home)
    keys = home.keys()
    signer = CountingHandle(home.ocsp_signer())
    responder = OcspResponder(store, lambda: authorities(signing_generations(home), signer))
    return responder, signer, keys


def test_home_authorities_pair_each_generation_with_its_signer(home: LocalHome) -> None:
    delegated = home.ocsp_signer()  # a new CA comes with its delegated OCSP signer
    assert delegated is not None
    assert [(a.ca.certificate, a.signer.certificate) for a in home_authorities(home)] == [
        (home.keys().ca.certificate, delegated.certificate)
    ]
    signer = issue_ocsp_signer(home)
    rollover(home, CaOptions(subject="CN=Next,O=Contoso", spec=KeySpec("EC", curve="P-256")))
    paired = home_authorities(home)
    assert [a.signer.certificate for a in paired] == [signer, home.keys().next_ca.certificate]
    late = datetime.now(timezone.utc) + timedelta(days=365)  # past the delegated signer's 90 days
    assert (
        authorities(signing_generations(home), home.ocsp_signer(), late)[0].signer.certificate
        == home.keys().ca.certificate
    )


def ocsp_request(
    certificate: x509.Certificate, issuer: x509.Certificate, nonce: bytes | None = None, algorithm=None
) -> bytes:
    builder = ocsp.OCSPRequestBuilder().add_certificate(certificate, issuer, algorithm or hashes.SHA1())
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(DER)


def test_ocsp_signer_is_a_delegated_responder(responder_parts) -> None:
    _, signer, keys = responder_parts
    certificate = signer.certificate
    assert certificate.issuer == keys.ca.certificate.subject
    eku = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.OCSP_SIGNING]
    certificate.extensions.get_extension_for_class(x509.OCSPNoCheck)
    assert certificate.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature


def test_ocsp_good_revoked_and_unknown(responder_parts, store: SqliteStore, tmp_path: Path) -> None:
    responder, signer, keys = responder_parts
    ca = keys.ca
    good, revoked = enroll(store, ca, "good"), enroll(store, ca, "revoked")
    when = datetime.now(timezone.utc).replace(microsecond=0)
    store.revoke(revoked.serial_number, RevocationReason.AFFILIATION_CHANGED, when)
    never_issued = device_certificate(_csr("stranger"), ca, Profile(), random_serial())

    answers = {}
    for name, certificate in (("good", good), ("revoked", revoked), ("unknown", never_issued)):
        answer = responder.respond(ocsp_request(certificate, ca.certificate))
        assert answer.status == "successful"
        parsed = ocsp.load_der_ocsp_response(answer.der)
        assert parsed.serial_number == certificate.serial_number
        assert parsed.certificates == [signer.certificate]
        signer.certificate.public_key().verify(
            parsed.signature, parsed.tbs_response_bytes, ec.ECDSA(parsed.signature_hash_algorithm)
        )
        answers[name] = parsed
    assert answers["good"].certificate_status is ocsp.OCSPCertStatus.GOOD
    assert answers["revoked"].certificate_status is ocsp.OCSPCertStatus.REVOKED
    assert answers["revoked"].revocation_time_utc == when
    assert answers["revoked"].revocation_reason is x509.ReasonFlags.affiliation_changed
    assert answers["unknown"].certificate_status is ocsp.OCSPCertStatus.UNKNOWN
    assert answers["good"].next_update_utc - answers["good"].this_update_utc == timedelta(hours=4)

    ca_pem = write_pem(tmp_path / "ca.pem", ca.certificate)
    for name, certificate in (("good", good), ("revoked", revoked)):
        request = tmp_path / f"{name}.req"
        made = openssl(
            "ocsp", "-issuer", ca_pem, "-cert", write_pem(tmp_path / f"{name}.pem", certificate), "-reqout", request
        )
        assert made.returncode == 0, made
        response = tmp_path / f"{name}.resp"
        response.write_bytes(responder.respond(request.read_bytes()).der)
        verified = openssl("ocsp", "-respin", response, "-reqin", request, "-CAfile", ca_pem)  # signature and nonce
        assert verified.returncode == 0 and "Response verify OK" in verified.stderr + verified.stdout, verified
        pem = tmp_path / f"{name}.pem"
        status = openssl("ocsp", "-respin", response, "-CAfile", ca_pem, "-issuer", ca_pem, "-cert", pem, "-no_nonce")
        assert status.returncode == 0 and f"{pem}: {name}" in status.stdout, status


def test_ocsp_garbage_and_foreign_cas(responder_parts, store: SqliteStore, tmp_path: Path) -> None:
    responder, _, keys = responder_parts
    for garbage in (b"", b"\x30\x03\x02\x01\x00", b"not der at all" * 10):
        answer = responder.respond(garbage)
        assert answer.status == "malformedRequest"
        assert ocsp.load_der_ocsp_response(answer.der).response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    other = LocalHome(tmp_path / "other")
    init_root(other, CaOptions(subject="CN=Someone Else,O=Elsewhere", spec=KeySpec("EC", curve="P-256")))
    foreign = device_certificate(_csr("foreign"), other.keys().ca, Profile(), random_serial())
    answer = responder.respond(ocsp_request(foreign, other.keys().ca.certificate))
    assert answer.status == "unauthorized"
    assert ocsp.load_der_ocsp_response(answer.der).response_status is ocsp.OCSPResponseStatus.UNAUTHORIZED
    # our CA's name with another key: a CertID we cannot vouch for
    impostor = LocalHome(tmp_path / "impostor")
    init_root(
        impostor, CaOptions(subject=keys.ca.certificate.subject.rfc4514_string(), spec=KeySpec("EC", curve="P-256"))
    )
    mine = enroll(store, keys.ca, "mine")
    twisted = ocsp_request(mine, impostor.keys().ca.certificate)
    parsed = ocsp.load_der_ocsp_response(responder.respond(twisted).der)
    assert parsed.certificate_status is ocsp.OCSPCertStatus.UNKNOWN


def test_ocsp_nonce_is_echoed_and_uncached(responder_parts, store: SqliteStore) -> None:
    responder, signer, keys = responder_parts
    certificate = enroll(store, keys.ca)
    first = responder.respond(ocsp_request(certificate, keys.ca.certificate, nonce=b"0123456789abcdef"))
    second = responder.respond(ocsp_request(certificate, keys.ca.certificate, nonce=b"fedcba9876543210"))
    for answer, nonce in ((first, b"0123456789abcdef"), (second, b"fedcba9876543210")):
        parsed = ocsp.load_der_ocsp_response(answer.der)
        assert parsed.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == nonce
        assert "no-store" in answer.headers["Cache-Control"]
    assert signer.signatures == 2


def test_ocsp_responses_are_cached_until_a_revocation(responder_parts, store: SqliteStore, tmp_path: Path) -> None:
    responder, signer, keys = responder_parts
    certificate = enroll(store, keys.ca)
    request = ocsp_request(certificate, keys.ca.certificate)
    answers = [responder.respond(request) for _ in range(20)]
    assert signer.signatures == 1 and len({answer.der for answer in answers}) == 1
    assert "max-age=" in answers[0].headers["Cache-Control"] and "public" in answers[0].headers["Cache-Control"]
    assert int(answers[0].headers["Cache-Control"].split("max-age=")[1].split(",")[0]) <= 3600
    SqliteStore(tmp_path / "scep.db").revoke(
        certificate.serial_number, RevocationReason.KEY_COMPROMISE, datetime.now(timezone.utc)
    )
    after = ocsp.load_der_ocsp_response(responder.respond(request).der)
    assert after.certificate_status is ocsp.OCSPCertStatus.REVOKED
    assert signer.signatures == 2
    sha256_request = ocsp_request(certificate, keys.ca.certificate, algorithm=hashes.SHA256())
    assert ocsp.load_der_ocsp_response(responder.respond(sha256_request).der).hash_algorithm.name == "sha256"


def test_ocsp_window_ends_and_the_response_is_signed_again(home: LocalHome, store: SqliteStore) -> None:
    keys = home.keys()
    signer = CountingHandle(keys.ca)  # no delegated signer: the CA signs
    clock = [datetime.now(timezone.utc)]
    responder = OcspResponder(store, lambda: authorities([signer], None), clock=lambda: clock[0])
    request = ocsp_request(enroll(store, keys.ca), keys.ca.certificate)
    first = ocsp.load_der_ocsp_response(responder.respond(request).der)
    assert first.certificates == []
    clock[0] += timedelta(minutes=59)
    responder.respond(request)
    assert signer.signatures == 1
    clock[0] += timedelta(minutes=2)
    responder.respond(request)
    assert signer.signatures == 2


class UnreachableStore(SqliteStore):
    def certificate_by_serial(self, serial: int) -> IssuedCertificate | None:
        raise StoreError("the store is unreachable")


def test_ocsp_store_failure_is_try_later(responder_parts, home: LocalHome, tmp_path: Path) -> None:
    _, signer, keys = responder_parts
    responder = OcspResponder(
        UnreachableStore(tmp_path / "down.db"), lambda: authorities(signing_generations(home), signer)
    )
    certificate = device_certificate(_csr("x"), keys.ca, Profile(), random_serial())
    answer = responder.respond(ocsp_request(certificate, keys.ca.certificate))
    assert answer.status == "tryLater"
    assert ocsp.load_der_ocsp_response(answer.der).response_status is ocsp.OCSPResponseStatus.TRY_LATER


def _revoke_and_publish_in_child(database: Path, keys_directory: Path, serial: int, start, results) -> None:
    store, home = SqliteStore(database), LocalHome(keys_directory)
    start.wait()
    store.revoke(serial, RevocationReason.SUPERSEDED, datetime.now(timezone.utc))
    results.put([p.number for p in publish_due(store, signing_generations(home)).publications if p.published])


def test_publisher_processes_on_sqlite_lose_no_revocation(home: LocalHome, store: SqliteStore) -> None:
    ca = home.keys().ca
    certificates = [enroll(store, ca, f"p{index}") for index in range(4)]
    publish_due(store, signing_generations(home))
    context = multiprocessing.get_context("fork")
    start, results = context.Barrier(4), context.Queue()
    children = [
        context.Process(
            target=_revoke_and_publish_in_child,
            args=(store.path, home.directory, certificate.serial_number, start, results),
        )
        for certificate in certificates
    ]
    for child in children:
        child.start()
    published = [number for _ in children for number in results.get(timeout=60)]
    for child in children:
        child.join(timeout=30)
        assert child.exitcode == 0
    assert len(published) == len(set(published))
    latest = store.latest_crl(ca_id(ca.certificate))
    assert latest.number == max(published) and latest.revision == 4
    crl = x509.load_der_x509_crl(latest.der)
    assert {revoked.serial_number for revoked in crl} == {c.serial_number for c in certificates}
