"""Revocation settings and jobs in process: SCEP_REVOKE_SUPERSEDED, the OCSP signature budget, the OCSP signer
renewed by the daily job, `scep ca ocsp issue`, the settings checked at start, and the Azure Functions adapters
serving the CRL and OCSP routes."""

from __future__ import annotations

import base64
from datetime import datetime, timedelta, timezone
from urllib.parse import quote

import azure.functions as func
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from scep import config
from scep.core import ca as ca_lifecycle
from scep.core import maintenance
from scep.core.issuer import ca_id
from scep.core.ocsp import OcspResponder, home_authorities
from scep.core.protocol import PkiStatus
from scep.http.revocation import SignatureBudget, budgeted
from scep.keys import Slot
from scep.keys.local import LocalHome
from scep.store import CertStatus, RevocationReason
from scep.store.sqlite import SqliteStore
from tests.conftest import CHALLENGE
from tests.scep_helpers import enroll, send
from tests.serverproc import run_cli
from tests.test_functions import registered_functions


def test_renewal_revokes_the_superseded_certificate_and_publishes_the_crl(make_service, keys):
    service = make_service(revoke_superseded=True)
    old_key = keys.new()
    first, _ = enroll(service, old_key, "phone")
    renewed, renewal = enroll(service, keys.new(), "phone", challenge=None, renew_with=(old_key, first.certificate))
    assert renewed.status is PkiStatus.SUCCESS
    old = service.store.certificate_by_serial(first.certificate.serial_number)
    assert (old.status, old.revocation_reason) == (CertStatus.REVOKED, RevocationReason.SUPERSEDED)
    crl = x509.load_der_x509_crl(service.store.latest_crl(old.issuer_sha256).der)
    assert crl.get_revoked_certificate_by_serial_number(first.certificate.serial_number) is not None

    again = send(service, renewal)  # the device lost the reply: the superseded certificate still signs this one
    assert again.status is PkiStatus.SUCCESS
    assert again.certificate.serial_number == renewed.certificate.serial_number
    other, _ = enroll(service, keys.new(), "phone", challenge=None, renew_with=(old_key, first.certificate))
    assert other.status is PkiStatus.FAILURE  # but renews nothing else


def test_renewal_keeps_the_old_certificate_by_default(service, keys):
    old_key = keys.new()
    first, _ = enroll(service, old_key, "phone")
    enroll(service, keys.new(), "phone", challenge=None, renew_with=(old_key, first.certificate))
    assert service.store.certificate_by_serial(first.certificate.serial_number).status is CertStatus.ISSUED


def ocsp_request_for(certificate: x509.Certificate, issuer: x509.Certificate) -> bytes:
    request = ocsp.OCSPRequestBuilder().add_certificate(certificate, issuer, hashes.SHA1()).build()
    return request.public_bytes(serialization.Encoding.DER)


def test_fresh_signatures_past_the_budget_get_try_later_and_cached_answers_go_on(service, keys):
    issued = [enroll(service, keys.new(), f"budget-{index}")[0].certificate for index in range(3)]
    ca = service.custody.keys().ca.certificate
    now = [0.0]
    budget = SignatureBudget(2 * 60, clock=lambda: now[0])  # two per second, a minute's worth saved up
    for _ in range(118):
        assert budget.take()
    responder = OcspResponder(service.store, lambda: budgeted(home_authorities(service.custody), budget))
    first, second, third = (ocsp_request_for(certificate, ca) for certificate in issued)
    assert responder.respond(first).status == "successful"
    assert responder.respond(second).status == "successful"
    assert responder.respond(third).status == "tryLater"  # the bucket is empty: no key operation
    assert responder.respond(first).status == "successful"  # cached, costs nothing
    now[0] = 1.0
    assert responder.respond(third).status == "successful"  # refilled


def test_daily_job_renews_an_expiring_ocsp_signer_once(tmp_path):
    home = LocalHome(tmp_path)
    ca_lifecycle.init_root(home, ca_lifecycle.CaOptions())
    store = SqliteStore(tmp_path / "scep.db")
    assert maintenance.renew_ocsp_signer_if_due(home, store) is None  # none issued: the CA signs its answers
    short = ca_lifecycle.issue_ocsp_signer(home, days=10)
    renewed = maintenance.renew_ocsp_signer_if_due(home, store)
    assert renewed is not None and renewed.serial_number != short.serial_number
    assert home.handle(Slot.OCSP).certificate.serial_number == renewed.serial_number
    assert maintenance.renew_ocsp_signer_if_due(home, store) is None  # 90 days left: not due


def test_scep_ca_ocsp_issue_creates_the_delegated_signer(tmp_path):
    environment = {"SCEP_DATA_DIR": str(tmp_path)}
    assert run_cli(environment, "ca", "init").returncode == 0
    done = run_cli(environment, "ca", "ocsp", "issue", "--days", "30")
    assert done.returncode == 0 and "OCSP signer" in done.stdout, done.stderr
    signer = LocalHome(tmp_path).ocsp_signer().certificate
    assert signer.not_valid_after_utc - datetime.now(timezone.utc) < timedelta(days=31)
    eku = signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.OCSP_SIGNING in eku


@pytest.mark.parametrize(
    "name,value",
    [
        ("SCEP_PUBLIC_BASE_URL", "ftp://pki.example.com"),
        ("SCEP_PUBLIC_BASE_URL", "http://"),
        ("SCEP_PUBLIC_BASE_URL", "https://pki.example.com/?x=1"),
        ("SCEP_CRL_VALIDITY_DAYS", "0"),
        ("SCEP_OCSP_CACHE_SECONDS", "14400"),
        ("SCEP_OCSP_SIGNATURES_PER_MINUTE", "lots"),
        ("SCEP_REVOKE_SUPERSEDED", "perhaps"),
    ],
)
def test_a_wrong_revocation_setting_is_named_at_start(name, value):
    with pytest.raises(config.ConfigError) as caught:
        config.load_settings({"SCEP_CHALLENGE": CHALLENGE, name: value})
    assert caught.value.setting == name


def test_base_url_goes_into_the_profile():
    settings = config.load_settings({"SCEP_CHALLENGE": CHALLENGE, "SCEP_PUBLIC_BASE_URL": "http://pki.example.com/"})
    assert settings.service.options.profile.public_base_url == "http://pki.example.com"


@pytest.fixture
def functions(tmp_path, monkeypatch):
    monkeypatch.setenv("SCEP_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SCEP_CHALLENGE", CHALLENGE)
    monkeypatch.setenv("SCEP_PUBLIC_BASE_URL", "https://scep.example.com")
    config.reset()
    yield {function.get_function_name(): function.get_user_function() for function in registered_functions()}
    config.reset()


def test_functions_adapter_serves_crl_ca_and_ocsp(functions, keys):
    functions["crl_publication"](timer=None)
    service = config.service()
    ca = service.custody.keys().ca.certificate
    device = enroll(service, keys.new(), "functions-device")[0].certificate
    crl_url = device.extensions.get_extension_for_class(x509.CRLDistributionPoints).value[0].full_name[0].value
    assert crl_url == f"https://scep.example.com/api/crl/{ca_id(ca)}.crl"

    crl = functions["crl"](func.HttpRequest("GET", f"http://localhost/api/crl/{ca_id(ca)}.crl", body=b""))
    assert (crl.status_code, crl.headers["Content-Type"]) == (200, "application/pkix-crl")
    assert x509.load_der_x509_crl(crl.get_body()).is_signature_valid(ca.public_key())

    issuer = functions["ca_issuer"](func.HttpRequest("GET", f"http://localhost/api/ca/{ca_id(ca)}.der", body=b""))
    assert x509.load_der_x509_certificate(issuer.get_body()) == ca

    body = ocsp_request_for(device, ca)
    posted = functions["ocsp"](func.HttpRequest("POST", "http://localhost/api/ocsp", body=body))
    assert ocsp.load_der_ocsp_response(posted.get_body()).certificate_status is ocsp.OCSPCertStatus.GOOD
    path = quote(base64.b64encode(body).decode(), safe="")
    got = functions["ocsp_get"](func.HttpRequest("GET", f"http://localhost/api/ocsp/{path}", body=b""))
    assert ocsp.load_der_ocsp_response(got.get_body()).certificate_status is ocsp.OCSPCertStatus.GOOD
    garbage = functions["ocsp"](func.HttpRequest("POST", "http://localhost/api/ocsp", body=b"junk"))
    assert garbage.status_code == 200
    assert ocsp.load_der_ocsp_response(garbage.get_body()).response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST
