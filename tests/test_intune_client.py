"""The Intune client against the Entra ID and Intune emulators: tokens, discovery, exact wire format, retries."""

from __future__ import annotations

import base64
import datetime
import json
import socket
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from scep.azure.intune.check import run_check
from scep.azure.intune.client import (
    VALIDATION_SERVICE,
    IntuneAuthenticationError,
    IntuneClient,
    IntuneConnectionError,
    IntuneHttpError,
    IntuneServiceNotFound,
    iso_utc,
)
from scep.azure.intune.credential import SecretSource, build_intune_credential
from scep.azure.intune.settings import AuthMode, IntuneConfigError, IntuneSettings
from scep.config import ConfigError, load_settings
from scep.findings import Status
from tests.emulators.intune import IntuneTestbed, build_csr

VALIDATE = "/ScepRequestValidationFEService/ScepActions/validateRequest"
SUCCESS = "/ScepRequestValidationFEService/ScepActions/successNotification"
FAILURE = "/ScepRequestValidationFEService/ScepActions/failureNotification"
DISCOVERY = "/endpoints$"




def settings_for(bed: IntuneTestbed, **overrides: object) -> IntuneSettings:
    settings = load_settings(bed.environment()).intune.client
    return replace(settings, **{"read_timeout": 2.0, **overrides})


def client_for(bed: IntuneTestbed, sleeps: list[float] | None = None, **overrides: object) -> IntuneClient:
    settings = settings_for(bed, **overrides)
    credential = build_intune_credential(settings, SecretSource.fixed(bed.secret))
    recorded = sleeps if sleeps is not None else []
    return IntuneClient(settings, credential, sleep=recorded.append)


def header(entry: object, name: str) -> str | None:
    for key, value in entry.headers.items():  # type: ignore[attr-defined]
        if key.lower() == name.lower():
            return value
    return None


def token_claims(authorization: str) -> dict:
    payload = authorization.removeprefix("Bearer ").split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"https://127.0.0.1:{port}/{VALIDATION_SERVICE}"


def csr_der(bed: IntuneTestbed) -> bytes:
    challenge = bed.intune.issue_challenge("CN=device1", ["dns:device1.example.com"])
    csr = build_csr("CN=device1", challenge, ["dns:device1.example.com"])
    return csr.public_bytes(serialization.Encoding.DER)


# Settings


INTUNE_MODE = {"SCEP_CHALLENGE_MODE": "intune", "INTUNE_CLIENT_SECRET": "s"}


def test_settings_defaults_and_scopes() -> None:
    settings = load_settings({**INTUNE_MODE, "INTUNE_TENANT_ID": "t", "INTUNE_CLIENT_ID": "c"}).intune.client
    assert settings.auth is AuthMode.SECRET
    assert settings.intune_scope == "https://api.manage.microsoft.com//.default"
    assert settings.graph_scope == "https://graph.microsoft.com/.default"
    assert settings.discovery_url == (
        "https://graph.microsoft.com/v1.0/servicePrincipals/appId=0000000a-0000-0000-c000-000000000000/endpoints"
    )
    assert settings.authority_host == "https://login.microsoftonline.com"
    assert settings.user_agent.startswith("scep-intune-ca/")


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"INTUNE_CLIENT_ID": "c"}, "INTUNE_TENANT_ID"),
        ({"INTUNE_TENANT_ID": "t"}, "INTUNE_CLIENT_ID"),
        ({"INTUNE_TENANT_ID": "t", "INTUNE_CLIENT_ID": "c", "INTUNE_AUTH": "password"}, "INTUNE_AUTH"),
        (
            {"INTUNE_TENANT_ID": "t", "INTUNE_CLIENT_ID": "c", "INTUNE_AUTH": "certificate"},
            "INTUNE_CLIENT_CERTIFICATE_PATH",
        ),
        ({"INTUNE_TENANT_ID": "t", "INTUNE_CLIENT_ID": "c", "INTUNE_GRAPH_URL": "http://x"}, "INTUNE_GRAPH_URL"),
        ({"INTUNE_TENANT_ID": "t", "INTUNE_CLIENT_ID": "c", "INTUNE_TIMEOUT": "soon"}, "INTUNE_TIMEOUT"),
    ],
)
def test_settings_errors_name_the_setting(env: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({**INTUNE_MODE, **env})
    assert caught.value.setting == setting


def test_managed_identity_needs_no_tenant_or_client() -> None:
    environment = {"SCEP_CHALLENGE_MODE": "intune", "INTUNE_AUTH": "managed-identity", "AZURE_CLIENT_ID": "mi"}
    settings = load_settings(environment).intune.client
    assert settings.auth is AuthMode.MANAGED_IDENTITY
    assert settings.managed_identity_client_id == "mi"


def test_secret_mode_without_secret_is_a_config_error() -> None:
    settings = IntuneSettings(tenant_id="t", client_id="c")
    with pytest.raises(IntuneConfigError):
        build_intune_credential(settings, None)


# Wire format


def test_validate_request_sends_exact_headers_and_body(testbed: IntuneTestbed) -> None:
    client = client_for(testbed)
    der = csr_der(testbed)
    result = client.validate_request("tx-1", der)
    assert result.succeeded and result.known
    [sent] = testbed.intune.requests_matching("POST", VALIDATE)
    assert sent.json == {
        "request": {
            "transactionId": "tx-1",
            "certificateRequest": base64.b64encode(der).decode(),
            "callerInfo": client.settings.user_agent,
        }
    }
    assert header(sent, "api-version") == "2018-02-20"
    assert header(sent, "UserAgent") == client.settings.user_agent
    assert header(sent, "Content-Type") == "application/json"
    assert (
        uuid.UUID(header(sent, "client-request-id") or "") and header(sent, "client-request-id") == result.activity_id
    )
    claims = token_claims(header(sent, "Authorization") or "")
    assert claims["aud"] == "https://api.manage.microsoft.com/"
    assert "scep_challenge_provider" in claims["roles"]


def test_success_notification_body(testbed: IntuneTestbed) -> None:
    client = client_for(testbed)
    der = csr_der(testbed)
    expires = datetime.datetime(2027, 3, 4, 5, 6, 7, tzinfo=datetime.timezone.utc)
    result = client.success_notification(
        "tx-2",
        der,
        thumbprint="AB" * 20,
        serial_number="01FF",
        expires=expires,
        issuing_ca="CN=Issuing CA",
        ca_configuration="scep-intune-ca\\Issuing CA",
        certificate_authority="Issuing CA",
    )
    assert result.succeeded
    [notification] = testbed.intune.notifications_of("success")
    assert notification.body == {
        "transactionId": "tx-2",
        "certificateRequest": base64.b64encode(der).decode(),
        "certificateThumbprint": "AB" * 20,
        "certificateSerialNumber": "01FF",
        "certificateExpirationDateUtc": "2027-03-04T05:06:07.000Z",
        "issuingCertificateAuthority": "CN=Issuing CA",
        "caConfiguration": "scep-intune-ca\\Issuing CA",
        "certificateAuthority": "Issuing CA",
        "callerInfo": client.settings.user_agent,
    }


def test_failure_notification_body(testbed: IntuneTestbed) -> None:
    client = client_for(testbed)
    der = csr_der(testbed)
    client.failure_notification("tx-3", der, 0x80094811, "x" * 400)
    [notification] = testbed.intune.notifications_of("failure")
    assert notification.body["hResult"] == 0x80094811 - (1 << 32)
    assert notification.body["errorDescription"] == "x" * 255
    assert notification.body["transactionId"] == "tx-3"
    assert notification.body["callerInfo"] == client.settings.user_agent


def test_iso_utc_converts_to_utc() -> None:
    moment = datetime.datetime(2026, 1, 1, 1, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=1)))
    assert iso_utc(moment) == "2026-01-01T00:00:00.000Z"


# Tokens and discovery


class RecordingCredential:
    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.scopes: list[str] = []

    def get_token(self, *scopes: str, **kwargs: object):  # noqa: ANN201 - azure-core's AccessToken
        self.scopes.extend(scopes)
        return self.inner.get_token(*scopes, **kwargs)  # type: ignore[attr-defined]


def test_scopes_and_token_caching(testbed: IntuneTestbed) -> None:
    settings = settings_for(testbed)
    recording = RecordingCredential(build_intune_credential(settings, SecretSource.fixed(testbed.secret)))
    client = IntuneClient(settings, recording)
    tokens_before = testbed.entra.tokens_issued_to(testbed.client_id)
    for number in range(3):
        assert client.validate_request(f"tx-{number}", csr_der(testbed)).succeeded
    assert set(recording.scopes) == {"https://api.manage.microsoft.com//.default", f"{testbed.intune.url}/.default"}
    # One token per audience, one discovery, three validations.
    assert testbed.entra.tokens_issued_to(testbed.client_id) - tokens_before == 2
    assert len(testbed.intune.requests_matching("GET", DISCOVERY)) == 1
    assert len(testbed.intune.requests_matching("POST", VALIDATE)) == 3


def test_discovery_matches_provider_name_case_insensitively(testbed: IntuneTestbed) -> None:
    testbed.intune.provider_names[VALIDATION_SERVICE] = VALIDATION_SERVICE.lower()
    client = client_for(testbed)
    assert client.service_url("SCEPREQUESTVALIDATIONFESERVICE") == testbed.intune.service_url
    assert client.validate_request("tx", csr_der(testbed)).succeeded


def test_discovery_is_refreshed_when_the_service_does_not_answer(testbed: IntuneTestbed) -> None:
    testbed.intune.set_service_uri(VALIDATION_SERVICE, closed_port_url())
    sleeps: list[float] = []
    client = client_for(testbed, sleeps)
    client._sleep = lambda seconds: testbed.intune.set_service_uri(VALIDATION_SERVICE, None)  # the service moved
    assert client.validate_request("tx", csr_der(testbed)).succeeded
    assert len(testbed.intune.requests_matching("GET", DISCOVERY)) == 2
    assert len(testbed.intune.requests_matching("POST", VALIDATE)) == 1


def test_discovery_follows_pages(testbed: IntuneTestbed) -> None:
    testbed.intune.discovery_page_size = 1
    client = client_for(testbed)
    assert client.service_url(VALIDATION_SERVICE) == testbed.intune.service_url
    assert len(testbed.intune.requests_matching("GET", DISCOVERY)) == 2


def test_discovery_without_the_service(testbed: IntuneTestbed) -> None:
    client = client_for(testbed)
    with pytest.raises(IntuneServiceNotFound):
        client.service_url("NoSuchService")


def test_discovery_refused_without_graph_role(testbed: IntuneTestbed) -> None:
    testbed.intune.register_client(testbed.client_id, secret=testbed.secret, graph_role=False)
    with pytest.raises(IntuneHttpError) as caught:
        client_for(testbed).validate_request("tx", csr_der(testbed))
    assert caught.value.status == 403


def test_scep_actions_refused_without_scep_role(testbed: IntuneTestbed) -> None:
    testbed.intune.register_client(testbed.client_id, secret=testbed.secret, scep_role=False)
    with pytest.raises(IntuneHttpError) as caught:
        client_for(testbed, validate_retries=0).validate_request("tx", csr_der(testbed))
    assert caught.value.status == 403


def test_refused_credentials_raise_authentication_error(testbed: IntuneTestbed) -> None:
    testbed.intune.refuse_credentials(testbed.client_id)
    with pytest.raises(IntuneAuthenticationError) as caught:
        client_for(testbed).validate_request("tx", csr_der(testbed))
    assert "AADSTS7000215" in caught.value.detail
    assert testbed.intune.requests_matching("POST", VALIDATE) == []


# Retries and timeouts


def test_validate_retries_a_server_error(testbed: IntuneTestbed) -> None:
    testbed.intune.inject("validate", status=500, times=1)
    sleeps: list[float] = []
    assert client_for(testbed, sleeps).validate_request("tx", csr_der(testbed)).succeeded
    assert len(testbed.intune.requests_matching("POST", VALIDATE)) == 2
    assert sleeps == [0.25]


def test_validate_gives_up_after_its_retries(testbed: IntuneTestbed) -> None:
    testbed.intune.inject("validate", status=503)
    with pytest.raises(IntuneHttpError) as caught:
        client_for(testbed, validate_retries=2).validate_request("tx", csr_der(testbed))
    assert caught.value.status == 503
    assert len(testbed.intune.requests_matching("POST", VALIDATE)) == 3


def test_validate_does_not_retry_a_client_error(testbed: IntuneTestbed) -> None:
    testbed.intune.inject("validate", status=400)
    with pytest.raises(IntuneHttpError):
        client_for(testbed).validate_request("tx", csr_der(testbed))
    assert len(testbed.intune.requests_matching("POST", VALIDATE)) == 1


def test_read_timeout_is_not_retried(testbed: IntuneTestbed) -> None:
    testbed.intune.inject("validate", delay=2.5)
    client = client_for(testbed, read_timeout=0.5)
    client.services()  # discovery and tokens first, so only the validation is timed
    started = time.monotonic()
    with pytest.raises(IntuneConnectionError) as caught:
        client.validate_request("tx", csr_der(testbed))
    assert caught.value.timed_out
    assert time.monotonic() - started < 2.0
    assert len(testbed.intune.requests_matching("POST", VALIDATE)) == 1


def test_success_notification_is_not_retried_after_a_server_error(testbed: IntuneTestbed) -> None:
    testbed.intune.inject("success", status=500, times=1)
    with pytest.raises(IntuneHttpError):
        client_for(testbed).success_notification(
            "tx",
            csr_der(testbed),
            thumbprint="00",
            serial_number="01",
            expires=datetime.datetime.now(),
            issuing_ca="CN=CA",
            ca_configuration="c",
            certificate_authority="a",
        )
    assert len(testbed.intune.requests_matching("POST", SUCCESS)) == 1


def test_notification_is_retried_when_it_was_never_sent(testbed: IntuneTestbed) -> None:
    testbed.intune.set_service_uri(VALIDATION_SERVICE, closed_port_url())
    client = client_for(testbed)
    client._sleep = lambda seconds: testbed.intune.set_service_uri(VALIDATION_SERVICE, None)
    assert client.failure_notification("tx", csr_der(testbed), 0x80004005, "failed").succeeded
    assert len(testbed.intune.notifications_of("failure")) == 1


def test_unknown_code_is_not_success(testbed: IntuneTestbed) -> None:
    testbed.intune.inject("validate", code="SomethingNew")
    result = client_for(testbed).validate_request("tx", csr_der(testbed))
    assert not result.succeeded and not result.known and result.code == "SomethingNew"


# Credentials


def test_rotated_secret_is_picked_up_without_a_restart(testbed: IntuneTestbed) -> None:
    current = {"secret": testbed.secret}
    source = SecretSource(lambda: current["secret"], lambda: current["secret"])
    settings = settings_for(testbed)
    client = IntuneClient(settings, build_intune_credential(settings, source))
    client.services()  # Graph token obtained with the first secret
    testbed.entra.set_client_secret(testbed.client_id, "rotated-secret")
    current["secret"] = "rotated-secret"
    assert client.validate_request("tx", csr_der(testbed)).succeeded  # Intune token: refused once, then re-read


def test_certificate_credential(testbed: IntuneTestbed, tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "scep-intune-ca")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    pem = tmp_path / "app.pem"
    pem.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        + certificate.public_bytes(serialization.Encoding.PEM)
    )
    testbed.intune.register_client("cert-app", certificate=certificate)
    settings = replace(
        settings_for(testbed), client_id="cert-app", auth=AuthMode.CERTIFICATE, client_certificate_path=str(pem)
    )
    client = IntuneClient(settings, build_intune_credential(settings))
    assert client.validate_request("tx", csr_der(testbed)).succeeded


def test_managed_identity_credential(testbed: IntuneTestbed, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in testbed.entra.managed_identity_environment().items():
        monkeypatch.setenv(name, value)
    testbed.entra.register_managed_identity("mi-client", "mi-principal", roles=testbed.intune.roles())
    settings = replace(settings_for(testbed), auth=AuthMode.MANAGED_IDENTITY, managed_identity_client_id="mi-client")
    client = IntuneClient(settings, build_intune_credential(settings))
    assert client.validate_request("tx", csr_der(testbed)).succeeded


def test_federated_credential(testbed: IntuneTestbed, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in testbed.entra.managed_identity_environment().items():
        monkeypatch.setenv(name, value)
    testbed.entra.register_managed_identity("uami", "uami-principal")
    testbed.intune.register_client("federated-app", federated_subjects=["uami-principal"])
    settings = replace(
        settings_for(testbed), client_id="federated-app", auth=AuthMode.FEDERATED, managed_identity_client_id="uami"
    )
    client = IntuneClient(settings, build_intune_credential(settings))
    assert client.validate_request("tx", csr_der(testbed)).succeeded
    assert testbed.entra.tokens_issued_to("uami") == 1  # the exchange token, for the first assertion only


# scep intune check


def test_check_reports_a_working_service(testbed: IntuneTestbed) -> None:
    report = run_check(client_for(testbed))
    assert report.ok, [str(line) for line in report.lines]
    assert [line.step for line in report.lines] == [
        "Graph token",
        "Intune token",
        "Service discovery",
        "validateRequest",
    ]
    assert "ChallengeDecryptionError" in report.lines[-1].message
    assert all(line.status is Status.OK for line in report.lines)


def test_check_explains_a_refused_secret(testbed: IntuneTestbed) -> None:
    testbed.entra.set_client_secret(testbed.client_id, "another-secret")
    report = run_check(client_for(testbed))
    assert not report.ok
    assert report.lines[0].status is Status.FAIL
    assert "INTUNE_CLIENT_SECRET" in report.lines[0].message


def test_check_explains_a_missing_scep_role(testbed: IntuneTestbed) -> None:
    testbed.intune.register_client(testbed.client_id, secret=testbed.secret, scep_role=False)
    report = run_check(client_for(testbed, validate_retries=0))
    by_step = {line.step: line for line in report.lines}
    assert by_step["Intune token"].status is Status.WARN
    assert by_step["validateRequest"].status is Status.FAIL
    assert "scep_challenge_provider" in by_step["validateRequest"].message


def test_check_explains_a_missing_graph_permission(testbed: IntuneTestbed) -> None:
    testbed.intune.register_client(testbed.client_id, secret=testbed.secret, graph_role=False)
    report = run_check(client_for(testbed))
    by_step = {line.step: line for line in report.lines}
    assert by_step["Service discovery"].status is Status.FAIL
    assert "Application.Read.All" in by_step["Service discovery"].message
    assert "validateRequest" not in by_step


def test_check_explains_an_unreachable_service(testbed: IntuneTestbed) -> None:
    testbed.intune.set_service_uri(VALIDATION_SERVICE, closed_port_url())
    report = run_check(client_for(testbed, validate_retries=0))
    assert report.lines[-1].status is Status.FAIL
    assert "cannot reach" in report.lines[-1].message
