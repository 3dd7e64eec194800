"""The Intune validator (and the static+Intune composite) against the emulators: Microsoft's test matrix,
forged / expired / mismatched challenges, fail-closed outages, notifications, and no challenge in the logs."""

from __future__ import annotations

import base64
import datetime
import hashlib
import logging
import os
import time
from dataclasses import replace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from scep.azure.intune.client import ERROR_CODES, IntuneClient
from scep.azure.intune.credential import SecretSource
from scep.azure.intune.credential import build_intune_credential as build_credential
from scep.azure.intune.validator import (
    FAIL_INFO_BY_CODE,
    UNAVAILABLE,
    IntuneValidator,
    serial_number_hex,
)
from scep.challenge import EnrollmentRequest, HResult, NotificationFailed
from scep.challenge.composite import CompositeValidator
from scep.challenge.static import StaticValidator
from scep.config import ConfigError, build_validator, load_settings
from scep.core.der import fingerprint
from scep.core.protocol import FailInfo
from tests.emulators.intune import ChallengeCodec, IntuneTestbed, build_csr

SUBJECT = "CN=device1,O=Contoso"
SANS = ["dns:device1.contoso.com", "upn:user@contoso.com"]
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH.dotted_string




@pytest.fixture(autouse=True)
def all_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    return caplog


def validator_for(bed: IntuneTestbed, **options: object) -> IntuneValidator:
    settings = replace(load_settings(bed.environment()).intune.client, read_timeout=1.0)
    client = IntuneClient(settings, build_credential(settings, SecretSource.fixed(bed.secret)), sleep=lambda s: None)
    return IntuneValidator(client, **options)  # type: ignore[arg-type]


def request_for(
    challenge: str | None,
    subject: str = SUBJECT,
    sans: list[str] = SANS,
    renewal: bool = False,
    **csr_options: object,
) -> EnrollmentRequest:
    csr = build_csr(subject, challenge, sans, **csr_options)  # type: ignore[arg-type]
    return EnrollmentRequest(
        transaction_id=f"tx-{time.monotonic_ns()}",
        csr=csr,
        csr_der=csr.public_bytes(serialization.Encoding.DER),
        challenge=challenge,
        renewal=renewal,
    )


def issued_certificate(request: EnrollmentRequest, serial: int = 0x80F1) -> x509.Certificate:
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Contoso Issuing CA")])
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    return (
        x509.CertificateBuilder()
        .subject_name(request.csr.subject)
        .issuer_name(issuer)
        .public_key(request.csr.public_key())
        .serial_number(serial)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=365))
        .sign(ca_key, hashes.SHA256())
    )


def sealed_garbage(bed: IntuneTestbed) -> str:
    """Encrypted with the emulator's key, but not a challenge statement inside."""
    nonce = os.urandom(12)
    sealed = AESGCM(bed.intune.codec.encryption_key).encrypt(nonce, b"garbage" * 8, b"intune-challenge")
    return base64.urlsafe_b64encode(nonce + sealed).rstrip(b"=").decode()


def assert_challenge_not_logged(caplog: pytest.LogCaptureFixture, challenge: str) -> None:
    assert challenge not in caplog.text
    for record in caplog.records:
        assert challenge not in record.getMessage()


# Validation


def test_genuine_challenge_is_accepted(testbed: IntuneTestbed, all_logs: pytest.LogCaptureFixture) -> None:
    challenge = testbed.intune.issue_challenge(SUBJECT, SANS, key_usage=["digital_signature"], eku=[CLIENT_AUTH])
    validator = validator_for(testbed)
    request = request_for(challenge, key_usage=["digital_signature"], eku=[CLIENT_AUTH])
    verdict = validator.validate(request)
    assert verdict.accepted and verdict.validator is validator
    assert testbed.intune.validations[-1].code == "Success"
    assert request.transaction_id in all_logs.text
    assert_challenge_not_logged(all_logs, challenge)


@pytest.mark.parametrize(
    ("make_challenge", "csr_changes", "code", "fail_info"),
    [
        (lambda bed: ChallengeCodec().issue(SUBJECT, SANS), {}, "ChallengeDecryptionError", FailInfo.BAD_REQUEST),
        (
            lambda bed: ChallengeCodec(encryption_key=bed.intune.codec.encryption_key).issue(SUBJECT, SANS),
            {},
            "SignatureValidationFailed",
            FailInfo.BAD_MESSAGE_CHECK,
        ),
        (lambda bed: "%%%not-base64%%%", {}, "ChallengeDecodingError", FailInfo.BAD_REQUEST),
        (lambda bed: sealed_garbage(bed), {}, "ChallengeDeserializationError", FailInfo.BAD_REQUEST),
        (
            lambda bed: bed.intune.codec.issue(SUBJECT, SANS, ttl=3600, issued_at=time.time() - 3700),
            {},
            "ChallengeExpired",
            FailInfo.BAD_TIME,
        ),
        (
            lambda bed: bed.intune.codec.issue(SUBJECT, SANS, issued_at=time.time() + 3600),
            {},
            "ChallengeInvalidTimestamp",
            FailInfo.BAD_TIME,
        ),
        (
            lambda bed: bed.intune.issue_challenge(SUBJECT, SANS),
            {"subject": "CN=other"},
            "SubjectNameMismatch",
            FailInfo.BAD_REQUEST,
        ),
        (
            lambda bed: bed.intune.issue_challenge(SUBJECT, SANS),
            {"sans": ["dns:evil.example.com"]},
            "SubjectAltNameMismatch",
            FailInfo.BAD_REQUEST,
        ),
        (
            lambda bed: bed.intune.issue_challenge(SUBJECT, SANS),
            {"sans": []},
            "SubjectAltNameMissing",
            FailInfo.BAD_REQUEST,
        ),
        (
            lambda bed: bed.intune.issue_challenge(SUBJECT, SANS, eku=[CLIENT_AUTH]),
            {},
            "EnhancedKeyUsageMissing",
            FailInfo.BAD_REQUEST,
        ),
        (
            lambda bed: bed.intune.issue_challenge(SUBJECT, SANS, key_usage=["key_encipherment"]),
            {"key_usage": ["digital_signature"]},
            "KeyUsageMismatch",
            FailInfo.BAD_REQUEST,
        ),
        (
            lambda bed: bed.intune.issue_challenge(SUBJECT, SANS, key_size=4096),
            {},
            "KeyLengthMismatch",
            FailInfo.BAD_REQUEST,
        ),
    ],
)
def test_bad_challenges_are_rejected_with_intunes_code(
    testbed: IntuneTestbed,
    all_logs: pytest.LogCaptureFixture,
    make_challenge,  # noqa: ANN001 - a lambda of the table
    csr_changes: dict,
    code: str,
    fail_info: FailInfo,
) -> None:
    challenge = make_challenge(testbed)
    verdict = validator_for(testbed).validate(request_for(challenge, **csr_changes))
    assert not verdict.accepted
    assert verdict.fail_info is fail_info
    assert verdict.reason == f"Intune rejected the request: {code}"
    assert testbed.intune.validations[-1].code == code
    assert challenge not in verdict.reason
    assert_challenge_not_logged(all_logs, challenge)


def test_every_intune_error_code_has_a_fail_info() -> None:
    assert set(FAIL_INFO_BY_CODE) == ERROR_CODES


def test_missing_challenge_is_rejected_without_asking_intune(testbed: IntuneTestbed) -> None:
    verdict = validator_for(testbed).validate(request_for(None))
    assert not verdict.accepted and verdict.fail_info is FailInfo.BAD_REQUEST
    assert testbed.intune.requests_matching("POST", "validateRequest") == []


def test_renewal_without_challenge_is_rejected_by_default(testbed: IntuneTestbed) -> None:
    verdict = validator_for(testbed).validate(request_for(None, renewal=True))
    assert not verdict.accepted
    assert "renewal" in verdict.reason


def test_renewal_without_challenge_can_be_allowed_and_is_not_reported(testbed: IntuneTestbed) -> None:
    validator = validator_for(testbed, allow_renewal_without_challenge=True)
    request = request_for(None, renewal=True)
    verdict = validator.validate(request)
    assert verdict.accepted and verdict.validator is validator
    validator.notify_success(request, issued_certificate(request))
    validator.notify_failure(request, HResult.E_FAIL, "failed")
    assert testbed.intune.requests_matching("POST", "ScepActions") == []


def test_renewal_with_a_challenge_goes_to_intune(testbed: IntuneTestbed) -> None:
    challenge = testbed.intune.issue_challenge(SUBJECT, SANS)
    validator = validator_for(testbed, allow_renewal_without_challenge=True)
    assert validator.validate(request_for(challenge, renewal=True)).accepted
    assert testbed.intune.validations[-1].code == "Success"


# Fail closed (Microsoft's test matrix: validation failure or error -> no certificate)


@pytest.mark.parametrize(
    "break_it",
    [
        pytest.param(lambda bed: bed.intune.inject("validate", status=500), id="validation-500"),
        pytest.param(lambda bed: bed.intune.inject("validate", delay=2.0), id="validation-timeout"),
        pytest.param(lambda bed: bed.intune.refuse_credentials(bed.client_id), id="authentication-failure"),
        pytest.param(
            lambda bed: bed.intune.register_client(bed.client_id, secret=bed.secret, scep_role=False), id="no-role"
        ),
        pytest.param(lambda bed: bed.intune.inject("discovery", status=503), id="discovery-503"),
        pytest.param(
            lambda bed: bed.intune.set_service_uri("ScepRequestValidationFEService", "https://127.0.0.1:1/x"),
            id="unreachable",
        ),
    ],
)
def test_outages_fail_closed(testbed: IntuneTestbed, all_logs: pytest.LogCaptureFixture, break_it) -> None:  # noqa: ANN001
    challenge = testbed.intune.issue_challenge(SUBJECT, SANS)
    break_it(testbed)
    request = request_for(challenge)
    verdict = validator_for(testbed).validate(request)
    assert not verdict.accepted
    assert verdict.fail_info is FailInfo.BAD_REQUEST
    assert verdict.reason == UNAVAILABLE
    assert any(request.transaction_id in record.getMessage() for record in all_logs.records)
    assert_challenge_not_logged(all_logs, challenge)


def test_unknown_code_fails_closed(testbed: IntuneTestbed) -> None:
    testbed.intune.inject("validate", code="BrandNewSuccessLikeCode")
    verdict = validator_for(testbed).validate(request_for(testbed.intune.issue_challenge(SUBJECT, SANS)))
    assert not verdict.accepted and verdict.fail_info is FailInfo.BAD_REQUEST
    assert verdict.reason.startswith(UNAVAILABLE)


# Notifications


def test_success_notification_reports_the_certificate(testbed: IntuneTestbed) -> None:
    challenge = testbed.intune.issue_challenge(SUBJECT, SANS)
    validator = validator_for(testbed)
    request = request_for(challenge)
    assert validator.validate(request).accepted
    certificate = issued_certificate(request)
    validator.notify_success(request, certificate)
    [notification] = testbed.intune.notifications_of("success")
    body = notification.body
    assert body["transactionId"] == request.transaction_id
    assert (
        body["certificateThumbprint"]
        == hashlib.sha1(certificate.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    )
    assert body["certificateSerialNumber"] == "0080F1"
    assert body["certificateExpirationDateUtc"] == certificate.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    assert body["issuingCertificateAuthority"] == "CN=Contoso Issuing CA"
    assert body["caConfiguration"] == "scep-intune-ca\\Contoso Issuing CA"
    assert body["certificateAuthority"] == "Contoso Issuing CA"


def test_configured_ca_names_are_reported(testbed: IntuneTestbed) -> None:
    validator = validator_for(testbed, ca_configuration="contoso-scep\\Issuing", certificate_authority="Contoso CA")
    request = request_for(testbed.intune.issue_challenge(SUBJECT, SANS))
    validator.notify_success(request, issued_certificate(request))
    [notification] = testbed.intune.notifications_of("success")
    assert notification.body["caConfiguration"] == "contoso-scep\\Issuing"
    assert notification.body["certificateAuthority"] == "Contoso CA"


def test_success_notification_500_means_not_delivered(testbed: IntuneTestbed) -> None:
    testbed.intune.inject("success", status=500)
    validator = validator_for(testbed)
    request = request_for(testbed.intune.issue_challenge(SUBJECT, SANS))
    with pytest.raises(NotificationFailed):
        validator.notify_success(request, issued_certificate(request))
    assert len(testbed.intune.requests_matching("POST", "successNotification")) == 1


def test_success_notification_refused_by_code_means_not_delivered(testbed: IntuneTestbed) -> None:
    testbed.intune.inject("success", code="ChallengeExpired")
    validator = validator_for(testbed)
    request = request_for(testbed.intune.issue_challenge(SUBJECT, SANS))
    with pytest.raises(NotificationFailed, match="ChallengeExpired"):
        validator.notify_success(request, issued_certificate(request))


def test_success_notification_without_token_means_not_delivered(testbed: IntuneTestbed) -> None:
    validator = validator_for(testbed)
    request = request_for(testbed.intune.issue_challenge(SUBJECT, SANS))
    testbed.intune.refuse_credentials(testbed.client_id)
    with pytest.raises(NotificationFailed):
        validator.notify_success(request, issued_certificate(request))


def test_failure_notification_is_sent(testbed: IntuneTestbed, all_logs: pytest.LogCaptureFixture) -> None:
    challenge = testbed.intune.issue_challenge(SUBJECT, SANS)
    request = request_for(challenge)
    validator_for(testbed).notify_failure(request, HResult.CERTSRV_E_UNSUPPORTED_CERT_TYPE, f"EKU refused {challenge}")
    [notification] = testbed.intune.notifications_of("failure")
    assert notification.body["hResult"] == HResult.CERTSRV_E_UNSUPPORTED_CERT_TYPE - (1 << 32)
    assert notification.body["errorDescription"] == "EKU refused [challenge]"
    assert_challenge_not_logged(all_logs, challenge)


def test_failure_notification_never_raises(testbed: IntuneTestbed) -> None:
    testbed.intune.inject("failure", status=500)
    request = request_for(testbed.intune.issue_challenge(SUBJECT, SANS))
    validator_for(testbed).notify_failure(request, HResult.E_FAIL, "failed")
    testbed.intune.refuse_credentials(testbed.client_id)
    validator_for(testbed).notify_failure(request, HResult.E_FAIL, "failed")


# Certificate fields


def test_thumbprint_and_serial_formats() -> None:
    request = request_for(None)
    certificate = issued_certificate(request, serial=0x7F01)
    assert serial_number_hex(certificate) == "7F01"
    assert serial_number_hex(issued_certificate(request, serial=0xFF)) == "00FF"
    thumbprint = fingerprint(certificate, "sha1")  # what successNotification reports
    assert len(thumbprint) == 40 and thumbprint == thumbprint.upper()
    assert thumbprint == certificate.fingerprint(hashes.SHA1()).hex().upper()


# static + intune


def test_composite_static_challenge_skips_intune(testbed: IntuneTestbed) -> None:
    static = StaticValidator("static-secret")
    composite = CompositeValidator([static, validator_for(testbed)])
    assert composite.name == "static,intune" and composite.requires_notification
    request = request_for("static-secret")
    verdict = composite.validate(request)
    assert verdict.accepted and verdict.validator is static
    composite.notify_success(request, issued_certificate(request))
    assert testbed.intune.requests_matching("POST", "ScepActions") == []


def test_composite_intune_challenge_goes_to_intune(testbed: IntuneTestbed) -> None:
    intune = validator_for(testbed)
    composite = CompositeValidator([StaticValidator("static-secret"), intune])
    request = request_for(testbed.intune.issue_challenge(SUBJECT, SANS))
    verdict = composite.validate(request)
    assert verdict.accepted and verdict.validator is intune
    composite.notify_success(request, issued_certificate(request))
    assert len(testbed.intune.notifications_of("success")) == 1


def test_composite_rejection_is_intunes(testbed: IntuneTestbed) -> None:
    composite = CompositeValidator([StaticValidator("static-secret"), validator_for(testbed)])
    verdict = composite.validate(request_for(ChallengeCodec().issue(SUBJECT, SANS)))
    assert not verdict.accepted and verdict.reason == "Intune rejected the request: ChallengeDecryptionError"


# Building from settings


def test_build_from_settings(testbed: IntuneTestbed) -> None:
    env = {**testbed.environment(), "INTUNE_ALLOW_RENEWAL_WITHOUT_CHALLENGE": "true", "INTUNE_CA_CONFIGURATION": "x"}
    validator = build_validator(load_settings(env))
    assert isinstance(validator, IntuneValidator)
    assert validator.allow_renewal_without_challenge and validator.ca_configuration == "x"
    assert validator.validate(request_for(testbed.intune.issue_challenge(SUBJECT, SANS))).accepted


def test_build_without_a_secret_names_the_setting() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"SCEP_CHALLENGE_MODE": "intune", "INTUNE_TENANT_ID": "t", "INTUNE_CLIENT_ID": "c"})
    assert caught.value.setting == "INTUNE_CLIENT_SECRET"
