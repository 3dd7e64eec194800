"""step-ca webhook callbacks: HMAC authentication, SCEPCHALLENGE allow/deny, NOTIFYING success and failure."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import os
from dataclasses import replace
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from scep.azure.intune.client import IntuneClient
from scep.azure.intune.credential import SecretSource, build_intune_credential
from scep.azure.intune.validator import IntuneValidator
from scep.challenge import EnrollmentRequest, HResult, NotificationFailed, Verdict
from scep.challenge.composite import CompositeValidator
from scep.challenge.static import StaticValidator
from scep.challenge.webhook import (
    SIGNATURE_HEADER,
    WEBHOOK_ID_HEADER,
    WebhookHandler,
    build_webhook_handler,
    decode_webhook_secret,
    sign_webhook_body,
)
from scep.config import build_webhooks, load_settings
from scep.core.protocol import FailInfo
from tests.emulators.intune import ChallengeCodec, IntuneTestbed, build_csr

STEP_SECRET = base64.b64encode(os.urandom(64)).decode()  # what `step ca provisioner webhook add` prints
KEY = base64.b64decode(STEP_SECRET)
WEBHOOK_ID = "5a3d1c9e-7f2b-4e8a-9c1d-2b3e4f5a6b7c"


class RecordingValidator:
    name = "recording"
    requires_notification = True

    def __init__(self, accept: bool = True) -> None:
        self.accept = accept
        self.validated: list[EnrollmentRequest] = []
        self.successes: list[tuple[EnrollmentRequest, x509.Certificate]] = []
        self.failures: list[tuple[EnrollmentRequest, int, str]] = []
        self.notification_error: Exception | None = None
        self.validation_error: Exception | None = None

    def validate(self, request: EnrollmentRequest) -> Verdict:
        self.validated.append(request)
        if self.validation_error is not None:
            raise self.validation_error
        return Verdict(True, validator=self) if self.accept else Verdict(False, FailInfo.BAD_REQUEST, "no")

    def notify_success(self, request: EnrollmentRequest, certificate: x509.Certificate) -> None:
        if self.notification_error is not None:
            raise self.notification_error
        self.successes.append((request, certificate))

    def notify_failure(self, request: EnrollmentRequest, hresult: int, description: str) -> None:
        self.failures.append((request, hresult, description))


def step_timestamp(offset_seconds: float = 0) -> str:
    """Go's time.Time JSON form (RFC 3339 with nanoseconds), as step-ca sends it."""
    moment = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=offset_seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f") + "123Z"


def csr_section(csr: x509.CertificateSigningRequest) -> dict[str, Any]:
    return {
        "subject": {"commonName": csr.subject.rfc4514_string()},
        "publicKey": base64.b64encode(
            csr.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        ).decode(),
        "publicKeyAlgorithm": "RSA",
        "raw": base64.b64encode(csr.public_bytes(serialization.Encoding.DER)).decode(),
    }


def challenge_body(challenge: str, csr: x509.CertificateSigningRequest, transaction_id: str = "tx-1") -> dict:
    return {
        "timestamp": step_timestamp(),
        "provisionerName": "intune",
        "x509CertificateRequest": csr_section(csr),
        "scepChallenge": challenge,
        "scepTransactionID": transaction_id,
    }


def certificate_for(csr: x509.CertificateSigningRequest) -> x509.Certificate:
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "step-ca Intermediate")]))
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(ca_key, hashes.SHA256())
    )


def success_body(
    csr: x509.CertificateSigningRequest, certificate: x509.Certificate, transaction_id: str = "tx-1"
) -> dict:
    return {
        "timestamp": step_timestamp(),
        "x509CertificateRequest": csr_section(csr),
        "x509Certificate": {
            "serialNumber": str(certificate.serial_number),
            "raw": base64.b64encode(certificate.public_bytes(serialization.Encoding.DER)).decode(),
        },
        "scepTransactionID": transaction_id,
    }


def signed(body: dict | bytes, key: bytes = KEY, webhook_id: str = WEBHOOK_ID) -> tuple[bytes, dict[str, str]]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return raw, {SIGNATURE_HEADER: sign_webhook_body(key, raw), WEBHOOK_ID_HEADER: webhook_id}


@pytest.fixture(scope="module")
def csr() -> x509.CertificateSigningRequest:
    return build_csr("CN=router1", "the-challenge", ["dns:router1.example.com"])


# Signature


def test_signature_is_hex_hmac_sha256_of_the_body_keyed_with_the_decoded_secret() -> None:
    body = b'{"scepTransactionID":"x"}'
    assert decode_webhook_secret(STEP_SECRET) == KEY
    assert sign_webhook_body(KEY, body) == hmac.new(KEY, body, hashlib.sha256).hexdigest()


def test_good_signature_allows(csr: x509.CertificateSigningRequest) -> None:
    validator = RecordingValidator(accept=True)
    status, reply = WebhookHandler(KEY, validator).handle_challenge(*signed(challenge_body("the-challenge", csr)))
    assert (status, reply) == (200, {"allow": True})
    [request] = validator.validated
    assert request.challenge == "the-challenge" and request.transaction_id == "tx-1"
    assert request.csr_der == csr.public_bytes(serialization.Encoding.DER) and not request.renewal


def test_rejected_challenge_is_allow_false(csr: x509.CertificateSigningRequest) -> None:
    status, reply = WebhookHandler(KEY, RecordingValidator(accept=False)).handle_challenge(
        *signed(challenge_body("wrong", csr))
    )
    assert (status, reply) == (200, {"allow": False})


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda body, headers: (body, {WEBHOOK_ID_HEADER: WEBHOOK_ID}), id="missing"),
        pytest.param(lambda body, headers: (body, {**headers, SIGNATURE_HEADER: "zz" * 32}), id="not-hex"),
        pytest.param(lambda body, headers: (body + b" ", headers), id="tampered-body"),
        pytest.param(lambda body, headers: signed(body, key=os.urandom(32)), id="other-secret"),
        pytest.param(lambda body, headers: signed(body, key=STEP_SECRET.encode()), id="undecoded-secret"),
    ],
)
def test_bad_signatures_are_401(csr: x509.CertificateSigningRequest, mangle) -> None:  # noqa: ANN001
    validator = RecordingValidator()
    body, headers = mangle(*signed(challenge_body("the-challenge", csr)))
    status, reply = WebhookHandler(KEY, validator).handle_challenge(body, headers)
    assert status == 401 and reply["allow"] is False
    assert validator.validated == []


def test_headers_are_case_insensitive(csr: x509.CertificateSigningRequest) -> None:
    body, headers = signed(challenge_body("the-challenge", csr))
    lower = {name.lower(): value for name, value in headers.items()}
    assert WebhookHandler(KEY, RecordingValidator()).handle_challenge(body, lower)[0] == 200


def test_webhook_id_filter(csr: x509.CertificateSigningRequest) -> None:
    handler = WebhookHandler(KEY, RecordingValidator(), webhook_ids=[WEBHOOK_ID])
    assert handler.handle_challenge(*signed(challenge_body("c", csr)))[0] == 200
    assert handler.handle_challenge(*signed(challenge_body("c", csr), webhook_id="another"))[0] == 401


def test_stale_timestamp_is_refused(csr: x509.CertificateSigningRequest) -> None:
    body = {**challenge_body("c", csr), "timestamp": step_timestamp(-3600)}
    assert WebhookHandler(KEY, RecordingValidator()).handle_challenge(*signed(body))[0] == 401
    assert WebhookHandler(KEY, RecordingValidator(), max_age_seconds=None).handle_challenge(*signed(body))[0] == 200


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"not json", id="not-json"),
        pytest.param(b"[1, 2]", id="not-an-object"),
        pytest.param({"timestamp": "yesterday", "scepTransactionID": "t"}, id="bad-timestamp"),
        pytest.param({"timestamp": None, "scepTransactionID": "t"}, id="no-timestamp"),
    ],
)
def test_malformed_bodies_are_400(body: dict | bytes) -> None:
    status, reply = WebhookHandler(KEY, RecordingValidator()).handle_challenge(*signed(body))
    assert status == 400 and reply["allow"] is False


def test_missing_request_or_transaction_is_400(csr: x509.CertificateSigningRequest) -> None:
    handler = WebhookHandler(KEY, RecordingValidator())
    no_csr = {key: value for key, value in challenge_body("c", csr).items() if key != "x509CertificateRequest"}
    no_transaction = {**challenge_body("c", csr), "scepTransactionID": ""}
    bad_csr = {**challenge_body("c", csr), "x509CertificateRequest": {"raw": base64.b64encode(b"junk").decode()}}
    for body in (no_csr, no_transaction, bad_csr):
        assert handler.handle_challenge(*signed(body))[0] == 400


def test_a_crashing_validator_denies(csr: x509.CertificateSigningRequest) -> None:
    validator = RecordingValidator()
    validator.validation_error = RuntimeError("boom")
    assert WebhookHandler(KEY, validator).handle_challenge(*signed(challenge_body("c", csr))) == (200, {"allow": False})


# Notifications


def test_success_notification(csr: x509.CertificateSigningRequest) -> None:
    validator = RecordingValidator()
    certificate = certificate_for(csr)
    status, _ = WebhookHandler(KEY, validator).handle_notify(*signed(success_body(csr, certificate)))
    assert status == 200
    [(request, reported)] = validator.successes
    assert reported == certificate
    assert request.transaction_id == "tx-1"
    assert request.challenge == "the-challenge"  # from the CSR: lets a composite find the owner


def test_failed_success_notification_is_not_a_5xx(csr: x509.CertificateSigningRequest) -> None:
    validator = RecordingValidator()
    validator.notification_error = NotificationFailed("Intune answered 500")
    status, reply = WebhookHandler(KEY, validator).handle_notify(*signed(success_body(csr, certificate_for(csr))))
    assert status == 424 and "500" in reply["error"]


def test_failure_notification(csr: x509.CertificateSigningRequest) -> None:
    validator = RecordingValidator()
    body = {
        "timestamp": step_timestamp(),
        "x509CertificateRequest": csr_section(csr),
        "scepTransactionID": "tx-9",
        "scepErrorDescription": "error when signing new certificate",
    }
    assert WebhookHandler(KEY, validator).handle_notify(*signed(body))[0] == 200
    [(request, hresult, description)] = validator.failures
    assert request.transaction_id == "tx-9"
    assert hresult == HResult.E_FAIL and description == "error when signing new certificate"


def test_notify_uses_its_own_secret(csr: x509.CertificateSigningRequest) -> None:
    notify_key = os.urandom(32)
    handler = WebhookHandler(KEY, RecordingValidator(), notify_secret=notify_key)
    body = success_body(csr, certificate_for(csr))
    assert handler.handle_notify(*signed(body, key=notify_key))[0] == 200
    assert handler.handle_notify(*signed(body, key=KEY))[0] == 401
    assert handler.handle_challenge(*signed(challenge_body("c", csr), key=notify_key))[0] == 401


# Settings


def test_secret_decoding() -> None:
    with pytest.raises(ValueError, match="SCEP_WEBHOOK_SECRET"):
        decode_webhook_secret("not base64 at all!")
    with pytest.raises(ValueError, match="shorter"):
        decode_webhook_secret(base64.b64encode(b"short").decode())


def test_build_from_settings_with_two_secrets(csr: x509.CertificateSigningRequest) -> None:
    other = base64.b64encode(os.urandom(64)).decode()
    settings = load_settings({"SCEP_CHALLENGE": "c", "SCEP_WEBHOOK_SECRET": f"{STEP_SECRET}, {other}",
                              "SCEP_WEBHOOK_IDS": WEBHOOK_ID})
    handler = build_webhooks(settings, RecordingValidator())
    assert handler is not None
    assert handler.handle_challenge(*signed(challenge_body("c", csr)))[0] == 200
    body = success_body(csr, certificate_for(csr))
    assert handler.handle_notify(*signed(body, key=base64.b64decode(other)))[0] == 200
    assert handler.handle_notify(*signed(body, key=base64.b64decode(other), webhook_id="x"))[0] == 401


def test_build_without_a_secret_names_the_setting() -> None:
    with pytest.raises(ValueError, match="SCEP_WEBHOOK_SECRET"):
        build_webhook_handler((), RecordingValidator())


# With Intune behind it (the emulators)




def intune_validator(bed: IntuneTestbed) -> IntuneValidator:
    settings = replace(load_settings(bed.environment()).intune.client, read_timeout=2.0)
    return IntuneValidator(IntuneClient(settings, build_intune_credential(settings, SecretSource.fixed(bed.secret))))


def test_step_ca_enrols_an_intune_device(testbed: IntuneTestbed) -> None:
    handler = WebhookHandler(KEY, intune_validator(testbed))
    challenge = testbed.intune.issue_challenge("CN=laptop7", ["dns:laptop7.contoso.com"])
    device_csr = build_csr("CN=laptop7", challenge, ["dns:laptop7.contoso.com"])
    assert handler.handle_challenge(*signed(challenge_body(challenge, device_csr, "tx-77"))) == (200, {"allow": True})
    certificate = certificate_for(device_csr)
    assert handler.handle_notify(*signed(success_body(device_csr, certificate, "tx-77")))[0] == 200
    [notification] = testbed.intune.notifications_of("success")
    assert notification.transaction_id == "tx-77"
    assert notification.body["certificateThumbprint"] == certificate.fingerprint(hashes.SHA1()).hex().upper()


def test_step_ca_forged_challenge_is_denied(testbed: IntuneTestbed) -> None:
    handler = WebhookHandler(KEY, intune_validator(testbed))
    forged = ChallengeCodec().issue("CN=laptop7", ["dns:laptop7.contoso.com"])
    device_csr = build_csr("CN=laptop7", forged, ["dns:laptop7.contoso.com"])
    assert handler.handle_challenge(*signed(challenge_body(forged, device_csr))) == (200, {"allow": False})
    assert testbed.intune.validations[-1].code == "ChallengeDecryptionError"


def test_step_ca_success_notification_failure_is_reported(testbed: IntuneTestbed) -> None:
    testbed.intune.inject("success", status=500)
    handler = WebhookHandler(KEY, intune_validator(testbed))
    challenge = testbed.intune.issue_challenge("CN=laptop8")
    device_csr = build_csr("CN=laptop8", challenge)
    assert handler.handle_notify(*signed(success_body(device_csr, certificate_for(device_csr))))[0] == 424


def test_step_ca_with_static_and_intune(testbed: IntuneTestbed) -> None:
    handler = WebhookHandler(KEY, CompositeValidator([StaticValidator("shared-secret"), intune_validator(testbed)]))
    router_csr = build_csr("CN=router9", "shared-secret")
    assert handler.handle_challenge(*signed(challenge_body("shared-secret", router_csr))) == (200, {"allow": True})
    assert handler.handle_notify(*signed(success_body(router_csr, certificate_for(router_csr))))[0] == 200
    assert testbed.intune.requests_matching("POST", "ScepActions") == []  # static requests never reach Intune
