"""The PKIOperation state machine, in process: issuance, policy, renewal, transactions, notifications."""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from scep.challenge import NotificationFailed, Verdict
from scep.challenge.static import StaticValidator
from scep.core.ca import CaOptions, init_root
from scep.core.issuer import Profile, is_ca_certificate
from scep.core.message import issuer_and_serial_der
from scep.core.protocol import ContentCipher, FailInfo, MessageType, PkiStatus
from scep.core.revocation import publish_due, signing_generations
from scep.core.service import ScepService, ServiceOptions
from scep.keys import CustodyError, KeyTransport
from scep.keys.local import LocalHome, LocalKey
from scep.store import CertStatus, EnrollmentOutcome, RevocationReason
from scep.store.sqlite import SqliteStore
from scep.tools.client import (
    RequestOptions,
    ScepClient,
    build_request,
    make_csr,
    new_enrollment,
    read_reply,
    self_signed,
)
from tests.conftest import CHALLENGE
from tests.scep_helpers import enroll, ra_and_ca, send

ALGORITHMS = [
    (ContentCipher.AES128, "sha256", KeyTransport.RSA_PKCS1V15),
    (ContentCipher.AES192, "sha384", KeyTransport.RSA_PKCS1V15),
    (ContentCipher.AES256, "sha512", KeyTransport.RSA_OAEP_SHA1),
    (ContentCipher.DES3, "sha1", KeyTransport.RSA_OAEP_SHA256),
]


@pytest.mark.parametrize("cipher,digest,transport", ALGORITHMS)
def test_enrolment_with_each_algorithm(service, keys, cipher, digest, transport):
    key = keys.new()
    result, _ = enroll(service, key, "laptop-1", options=RequestOptions(cipher, digest, transport),
                       dns=("laptop-1.example.org",))
    assert result.status is PkiStatus.SUCCESS
    certificate = result.certificate
    _, ca = ra_and_ca(service)
    certificate.verify_directly_issued_by(ca)
    assert certificate.subject.rfc4514_string() == "CN=laptop-1"
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["laptop-1.example.org"]
    assert not is_ca_certificate(certificate)
    assert certificate.public_key().public_numbers() == key.public_key().public_numbers()


def test_issued_certificate_profile(service, keys):
    result, _ = enroll(service, keys.new())
    certificate = result.certificate
    now = datetime.now(timezone.utc)
    assert now - timedelta(minutes=10) < certificate.not_valid_before_utc < now - timedelta(minutes=1)
    assert timedelta(days=364) < certificate.not_valid_after_utc - now <= timedelta(days=365)
    assert 0 < certificate.serial_number < 2**128
    constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment and not usage.key_cert_sign and not usage.crl_sign
    certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)


def test_validity_follows_the_profile(make_service, keys):
    service = make_service(profile=Profile(validity_days=30))
    result, _ = enroll(service, keys.new())
    lifetime = result.certificate.not_valid_after_utc - datetime.now(timezone.utc)
    assert timedelta(days=29) < lifetime <= timedelta(days=30)


@pytest.mark.parametrize("curve", [ec.SECP256R1, ec.SECP384R1, ec.SECP521R1])
def test_ec_device_signs_its_request_and_gets_a_key_agreement_reply(service, curve):
    key = ec.generate_private_key(curve())
    result, _ = enroll(service, key, "ec-device")
    assert result.status is PkiStatus.SUCCESS
    usage = result.certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_agreement and not usage.key_encipherment


def test_ec_device_with_an_rsa_signer_gets_a_key_transport_reply(service, keys):
    key = ec.generate_private_key(ec.SECP256R1())
    ra, _ = ra_and_ca(service)
    csr = make_csr(key, "ec-device", CHALLENGE)
    rsa_key = keys.new()
    enrollment = new_enrollment(key, csr)
    enrollment.signer = LocalKey(rsa_key, self_signed(rsa_key, csr.subject))
    result = read_reply(service.pki_operation(build_request(enrollment, ra, RequestOptions())).der, enrollment, ra)
    assert result.status is PkiStatus.SUCCESS


def test_signer_that_can_receive_no_envelope_changes_nothing(make_service, keys, caplog):
    """Checked before validation: no validator call, no certificate, no notification, one INFO line."""
    validator = RecordingValidator()
    service = make_service(validator)
    key = keys.new()
    ra, _ = ra_and_ca(service)
    csr = make_csr(key, "k1-signer", CHALLENGE)
    signer_key = ec.generate_private_key(ec.SECP256K1())
    enrollment = new_enrollment(key, csr)
    enrollment.signer = LocalKey(signer_key, self_signed(signer_key, csr.subject))
    with caplog.at_level(logging.INFO, logger="scep.core.service"):
        reply = service.pki_operation(build_request(enrollment, ra, RequestOptions()))
    result = read_reply(reply.der, enrollment, ra)
    assert result.status is PkiStatus.FAILURE and result.fail_info is FailInfo.BAD_ALG
    assert validator.validations == 0 and validator.successes == [] and validator.failures == []
    assert service.store.certificate_for_transaction(enrollment.transaction_id) is None
    assert refusal_lines(caplog, enrollment.transaction_id) == [f"failInfo BAD_ALG): {result.fail_info_text}"]


def test_unsupported_device_key_is_refused_before_validation(make_service):
    validator = RecordingValidator()
    service = make_service(validator)
    result, enrollment = enroll(service, ec.generate_private_key(ec.SECP256K1()), "k1-device")
    assert result.status is PkiStatus.FAILURE and result.fail_info is FailInfo.BAD_ALG
    assert validator.validations == 0 and validator.failures == []
    assert service.store.certificate_for_transaction(enrollment.transaction_id) is None


def refusal_lines(caplog, transaction_id: str) -> list[str]:
    prefix = f"transaction {transaction_id} refused ("
    return [
        record.getMessage().removeprefix(prefix)
        for record in caplog.records
        if record.levelno == logging.INFO and record.getMessage().startswith(prefix)
    ]


@pytest.mark.parametrize(
    "key_kind,challenge,extensions,expected",
    [
        ("rsa", "wrong", (), "BAD_REQUEST"),
        ("rsa1024", CHALLENGE, (), "BAD_ALG"),
        ("ec", CHALLENGE, (x509.KeyUsage(True, False, True, False, False, False, False, False, False),), "BAD_REQUEST"),
        ("rsa", CHALLENGE, (x509.BasicConstraints(ca=True, path_length=None),), "BAD_REQUEST"),
    ],
    ids=["wrong-challenge", "small-key", "ec-key-encipherment", "ca-request"],
)
def test_every_failure_is_logged_once_with_its_reason(service, keys, caplog, key_kind, challenge, extensions,
                                                      expected):
    key = {"rsa": keys.new, "rsa1024": lambda: keys.new(1024), "ec": lambda: ec.generate_private_key(ec.SECP256R1())}
    with caplog.at_level(logging.INFO, logger="scep.core.service"):
        result, enrollment = enroll(service, key[key_kind](), challenge=challenge, extensions=extensions)
    assert result.status is PkiStatus.FAILURE
    assert refusal_lines(caplog, enrollment.transaction_id) == [f"failInfo {expected}): {result.fail_info_text}"]


def test_unreadable_signer_subject_is_a_bad_message_check(service, keys, caplog):
    """cryptography parses the subject lazily; a damaged one must not reach the unexpected-error path."""
    key = keys.new()
    ra, _ = ra_and_ca(service)
    csr = make_csr(key, "device", CHALLENGE)
    certificate = self_signed(key, csr.subject).public_bytes(serialization.Encoding.DER)
    subject_value = certificate.rfind(b"\x0c\x06device")  # the subject's CN; the issuer's comes first
    damaged = certificate[:subject_value] + b"\x01" + certificate[subject_value + 1 :]  # UTF8String -> BOOLEAN
    enrollment = new_enrollment(key, csr)
    enrollment.signer = LocalKey(key, x509.load_der_x509_certificate(damaged))
    with caplog.at_level(logging.INFO):
        result = read_reply(service.pki_operation(build_request(enrollment, ra, RequestOptions())).der, enrollment, ra)
    assert result.status is PkiStatus.FAILURE and result.fail_info is FailInfo.BAD_MESSAGE_CHECK
    assert "unreadable signer certificate" in result.fail_info_text
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.mark.parametrize("challenge,reason", [("wrong", "wrong"), (None, "missing")])
def test_bad_challenge_issues_nothing(service, keys, challenge, reason):
    result, enrollment = enroll(service, keys.new(), challenge=challenge)
    assert result.status is PkiStatus.FAILURE
    assert result.fail_info is FailInfo.BAD_REQUEST
    assert reason in result.fail_info_text
    assert service.store.certificate_for_transaction(enrollment.transaction_id) is None


def test_failed_transaction_can_be_retried_with_the_right_challenge(service, keys):
    key = keys.new()
    failed, enrollment = enroll(service, key, challenge="wrong")
    assert failed.status is PkiStatus.FAILURE
    result, _ = enroll(service, key, transaction_id=enrollment.transaction_id)
    assert result.status is PkiStatus.SUCCESS


def test_retransmission_returns_the_same_certificate(service, keys):
    key = keys.new()
    first, enrollment = enroll(service, key)
    enrollment.sender_nonce = os.urandom(16)
    second = send(service, enrollment)
    assert second.status is PkiStatus.SUCCESS
    assert second.certificate == first.certificate


def test_transaction_id_of_another_key_is_refused(service, keys):
    first, enrollment = enroll(service, keys.new())
    result, _ = enroll(service, keys.new(), transaction_id=enrollment.transaction_id)
    assert result.status is PkiStatus.FAILURE and result.fail_info is FailInfo.BAD_REQUEST


def test_cert_poll_and_get_cert(service, keys):
    first, enrollment = enroll(service, keys.new())
    ra, ca = ra_and_ca(service)

    class InProcess(ScepClient):
        def pki_operation(self, request, method="POST"):
            return service.pki_operation(request).der

    client = InProcess("http://unused")
    polled = client.poll(enrollment, ra, ca)
    assert polled.status is PkiStatus.SUCCESS and polled.certificate == first.certificate
    fetched = client.get_cert(enrollment, ra, first.certificate)
    assert fetched.status is PkiStatus.SUCCESS and fetched.certificate == first.certificate
    unknown = new_enrollment(keys.new(), make_csr(keys.new(), "nobody"))
    assert client.poll(unknown, ra, ca).fail_info is FailInfo.BAD_CERT_ID


def test_get_crl_returns_the_latest_crl_of_the_issuer(service, keys):
    key = keys.new()
    ra, ca = ra_and_ca(service)
    enrollment = new_enrollment(key, make_csr(key, "x"))
    request = build_request(enrollment, ra, RequestOptions(), issuer_and_serial_der(ca), MessageType.GET_CRL)
    result = read_reply(service.pki_operation(request).der, enrollment, ra)
    assert result.status is PkiStatus.FAILURE and result.fail_info is FailInfo.BAD_CERT_ID  # nothing published yet
    issued, _ = enroll(service, keys.new())
    service.store.revoke(issued.certificate.serial_number, RevocationReason.KEY_COMPROMISE, datetime.now(timezone.utc))
    publish_due(service.store, signing_generations(service.custody))
    enrollment.sender_nonce = os.urandom(16)
    request = build_request(enrollment, ra, RequestOptions(), issuer_and_serial_der(ca), MessageType.GET_CRL)
    result = read_reply(service.pki_operation(request).der, enrollment, ra)
    assert result.status is PkiStatus.SUCCESS and result.crl is not None
    assert result.crl.is_signature_valid(ca.public_key())
    assert result.crl.get_revoked_certificate_by_serial_number(issued.certificate.serial_number) is not None


def test_weak_key_is_refused_naming_the_setting(service, keys):
    result, _ = enroll(service, keys.new(1024))
    assert result.status is PkiStatus.FAILURE and result.fail_info is FailInfo.BAD_ALG
    assert "SCEP_MIN_RSA_KEY_BITS" in result.fail_info_text


def test_minimum_rsa_key_size_follows_the_profile(make_service, keys):
    service = make_service(profile=Profile(min_rsa_bits=1024))
    result, _ = enroll(service, keys.new(1024))
    assert result.status is PkiStatus.SUCCESS and result.certificate.public_key().key_size == 1024


@pytest.mark.parametrize(
    "extension",
    [
        x509.BasicConstraints(ca=True, path_length=None),
        x509.KeyUsage(True, False, False, False, False, True, True, False, False),
        x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CODE_SIGNING]),
        x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE]),
    ],
)
def test_ca_and_unexpected_usages_are_refused(service, keys, extension):
    result, enrollment = enroll(service, keys.new(), extensions=(extension,))
    assert result.status is PkiStatus.FAILURE and result.fail_info is FailInfo.BAD_REQUEST
    assert service.store.certificate_for_transaction(enrollment.transaction_id) is None


def test_legacy_des_and_md5_only_when_enabled(make_service, keys):
    strict = make_service()
    des = RequestOptions(ContentCipher.DES, "sha1")
    result, _ = enroll(strict, keys.new(), options=des)
    assert result.status is PkiStatus.FAILURE and result.fail_info is FailInfo.BAD_ALG
    md5 = RequestOptions(ContentCipher.AES128, "md5")
    result, _ = enroll(strict, keys.new(), options=md5)
    assert result.status is PkiStatus.FAILURE and result.fail_info is FailInfo.BAD_ALG
    legacy = make_service(allow_legacy=True)
    assert enroll(legacy, keys.new(), options=des)[0].status is PkiStatus.SUCCESS


def test_renewal_signed_by_an_issued_certificate_needs_no_challenge(service, keys):
    old_key = keys.new()
    first, _ = enroll(service, old_key, "phone", dns=("phone.example",))
    renewed, _ = enroll(service, keys.new(), "phone", challenge=None, renew_with=(old_key, first.certificate),
                        dns=("phone.example",))
    assert renewed.status is PkiStatus.SUCCESS
    assert renewed.certificate.serial_number != first.certificate.serial_number


def test_renewal_cannot_change_the_identity(service, keys):
    old_key = keys.new()
    first, _ = enroll(service, old_key, "phone")
    result, _ = enroll(service, keys.new(), "admin", challenge=None, renew_with=(old_key, first.certificate))
    assert result.status is PkiStatus.FAILURE and result.fail_info is FailInfo.BAD_REQUEST


def test_renewal_with_a_foreign_certificate_is_refused(service, keys):
    with tempfile.TemporaryDirectory() as other:
        home = LocalHome(Path(other))
        init_root(home, CaOptions(subject="CN=SCEP Root CA,O=scep-intune-ca"))  # same name, other key
        foreign = ScepService(home, SqliteStore(Path(other) / "db"), StaticValidator("x"), ServiceOptions())
        old_key = keys.new()
        foreign_cert, _ = enroll(foreign, old_key, "phone", challenge="x")
    result, _ = enroll(service, keys.new(), "phone", challenge=None, renew_with=(old_key, foreign_cert.certificate))
    assert result.status is PkiStatus.FAILURE and result.fail_info is FailInfo.BAD_MESSAGE_CHECK


def test_pkcsreq_signed_by_issued_certificate_is_a_renewal(service, keys):
    """certmonger renews with a PKCSReq signed by the old certificate."""
    old_key = keys.new()
    first, _ = enroll(service, old_key, "host")
    key = keys.new()
    ra, _ = ra_and_ca(service)
    enrollment = new_enrollment(key, make_csr(key, "host"), renew_with=(old_key, first.certificate))
    enrollment.message_type = MessageType.PKCS_REQ
    result = read_reply(service.pki_operation(build_request(enrollment, ra, RequestOptions())).der, enrollment, ra)
    assert result.status is PkiStatus.SUCCESS


def test_self_signed_renewal_request_is_refused(service, keys):
    key = keys.new()
    csr = make_csr(key, "x")
    result, _ = enroll(service, keys.new(), "x", challenge=None, renew_with=(key, self_signed(key, csr.subject)))
    assert result.status is PkiStatus.FAILURE and result.fail_info is FailInfo.BAD_MESSAGE_CHECK


def test_concurrent_enrolments_never_share_a_serial(service, keys):
    pool = [keys.new() for _ in range(12)]
    serials: list[int] = []
    lock = threading.Lock()

    def run(key):
        result, _ = enroll(service, key)
        with lock:
            serials.append(result.certificate.serial_number)

    threads = [threading.Thread(target=run, args=(k,)) for k in pool]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(serials) == 12 == len(set(serials))


def test_concurrent_retransmissions_issue_once(service, keys):
    key = keys.new()
    ra, _ = ra_and_ca(service)
    enrollment = new_enrollment(key, make_csr(key, "same", "correct horse battery staple"))
    requests = []
    for _ in range(6):
        enrollment.sender_nonce = os.urandom(16)
        requests.append((build_request(enrollment, ra, RequestOptions()), enrollment.sender_nonce))
    statuses = []

    def run(request):
        statuses.append(service.pki_operation(request[0]).status)

    threads = [threading.Thread(target=run, args=(r,)) for r in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(statuses) <= {PkiStatus.SUCCESS, PkiStatus.PENDING}
    assert PkiStatus.SUCCESS in statuses
    record = service.store.certificate_for_transaction(enrollment.transaction_id)
    assert record is not None and record.status is CertStatus.ISSUED
    counts = service.store.enrollment_counts(datetime.now(timezone.utc) - timedelta(hours=1))
    assert counts[EnrollmentOutcome.PENDING] == statuses.count(PkiStatus.PENDING)


class RecordingValidator:
    """A validator that must be notified, like Intune; its notification can be made to fail."""

    name = "recording"
    requires_notification = True

    def __init__(self, notification_works: bool = True):
        self.notification_works = notification_works
        self.successes: list[int] = []
        self.failures: list[int] = []
        self.validations = 0

    def validate(self, request):
        self.validations += 1
        return Verdict(True, validator=self)

    def notify_success(self, request, certificate):
        if not self.notification_works:
            raise NotificationFailed("HTTP 500")
        self.successes.append(certificate.serial_number)

    def notify_failure(self, request, hresult, description):
        self.failures.append(hresult)


def test_notified_issuance_is_delivered(make_service, keys):
    validator = RecordingValidator()
    service = make_service(validator)
    result, enrollment = enroll(service, keys.new(), challenge="anything")
    assert result.status is PkiStatus.SUCCESS
    assert validator.successes == [result.certificate.serial_number]
    assert service.store.certificate_by_serial(result.certificate.serial_number).status is CertStatus.ISSUED


def test_failed_notification_withholds_the_certificate(make_service, keys):
    validator = RecordingValidator(notification_works=False)
    service = make_service(validator)
    result, enrollment = enroll(service, keys.new(), challenge="anything")
    assert result.status is PkiStatus.FAILURE
    record = service.store.certificate_for_transaction(enrollment.transaction_id)
    assert record is not None and record.status is CertStatus.UNDELIVERED
    enrollment.sender_nonce = os.urandom(16)
    assert send(service, enrollment).status is PkiStatus.FAILURE  # a retransmission does not get it either


def test_policy_failure_after_validation_is_reported(make_service, keys):
    validator = RecordingValidator()
    service = make_service(validator)
    extension = x509.BasicConstraints(ca=True, path_length=None)
    result, _ = enroll(service, keys.new(), challenge="anything", extensions=(extension,))
    assert result.status is PkiStatus.FAILURE
    assert validator.failures == [0x80094800]


def test_validator_crash_fails_closed(make_service, keys):
    class Broken(RecordingValidator):
        def validate(self, request):
            raise RuntimeError("boom")

    service = make_service(Broken())
    result, enrollment = enroll(service, keys.new())
    assert result.status is PkiStatus.FAILURE
    assert service.store.certificate_for_transaction(enrollment.transaction_id) is None


class FailingCaHome(LocalHome):
    """Local custody whose CA key stops signing, as a throttled or unreachable Key Vault would."""

    def keys(self):
        keys = super().keys()

        class Refusing:
            certificate = keys.ca.certificate

            def sign_digest(self, *args, **kwargs):
                raise CustodyError("Key Vault answered 429 after every retry")

        return type(keys)(ca=Refusing(), ra=keys.ra, next_ca=keys.next_ca, chain=keys.chain, retired=keys.retired)


def test_custody_failure_is_a_signed_failure_and_can_be_retried(ca_dir, tmp_path, keys):
    store = SqliteStore(tmp_path / "custody.db")
    failing = ScepService(FailingCaHome(ca_dir), store, StaticValidator(CHALLENGE), ServiceOptions())
    key = keys.new()
    result, enrollment = enroll(failing, key)
    assert result.status is PkiStatus.FAILURE and "temporarily unavailable" in result.fail_info_text
    assert store.certificate_for_transaction(enrollment.transaction_id) is None
    healthy = ScepService(LocalHome(ca_dir), store, StaticValidator(CHALLENGE), ServiceOptions())
    retried, _ = enroll(healthy, key, transaction_id=enrollment.transaction_id)
    assert retried.status is PkiStatus.SUCCESS


def test_retransmission_while_the_validator_is_being_told_gets_pending(make_service, keys):
    """A device that resends while Intune hears of its certificate polls, then gets the certificate."""
    service_holder = {}

    class SlowToConfirm(RecordingValidator):
        def notify_success(self, request, certificate):
            resent = dataclasses.replace(enrollment, sender_nonce=os.urandom(16))
            self.during = send(service_holder["service"], resent)
            super().notify_success(request, certificate)

    validator = SlowToConfirm()
    service = service_holder["service"] = make_service(validator)
    key = keys.new()
    ra, _ = ra_and_ca(service)
    enrollment = new_enrollment(key, make_csr(key, "patient", "anything"))
    first = read_reply(service.pki_operation(build_request(enrollment, ra, RequestOptions())).der, enrollment, ra)
    assert validator.during.status is PkiStatus.PENDING
    assert first.status is PkiStatus.SUCCESS
    enrollment.sender_nonce = os.urandom(16)
    assert send(service, enrollment).certificate == first.certificate
