"""CRL, CA certificate and OCSP served by `scep serve`, checked with real clients: openssl ocsp, openssl verify
-crl_check and strongSwan's pki --verify, with certificates issued by the server and revoked by `scep certs revoke`;
bad OCSP input; the Azure Functions adapters serving the same routes."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID

from tests.serverproc import ScepServer, run_cli

CHALLENGE = "revocation-e2e"
PUBLISH_WAIT_SECONDS = 20


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ScepServer(env={"SCEP_CHALLENGE": CHALLENGE}, workers=2) as running:
        yield running


def enroll(server: ScepServer, directory: Path, name: str) -> Path:
    out = directory / name
    done = run_cli(server.environment(), "enroll", "--url", server.scep_url, "--challenge", CHALLENGE,
                   "--cn", name, "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out.with_suffix(".pem")


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def pointers(certificate: x509.Certificate) -> tuple[str, str, str]:
    """(CRL URL, OCSP URL, caIssuers URL) the certificate names."""
    crl = certificate.extensions.get_extension_for_class(x509.CRLDistributionPoints).value[0].full_name[0].value
    access = certificate.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    by_method = {item.access_method: item.access_location.value for item in access}
    return crl, by_method[AuthorityInformationAccessOID.OCSP], by_method[AuthorityInformationAccessOID.CA_ISSUERS]


def fetch(url: str, data: bytes | None = None, headers: dict[str, str] | None = None):
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def fetch_crl(url: str, newer_than: int = 0) -> bytes:
    """The CRL at url once the publication job stored one with a cRLNumber above newer_than."""
    deadline = time.monotonic() + PUBLISH_WAIT_SECONDS
    while True:
        status, _, body = fetch(url)
        if status == 200:
            number = x509.load_der_x509_crl(body).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
            if number > newer_than:
                return body
        assert time.monotonic() < deadline, f"no CRL above {newer_than} at {url} (last status {status})"
        time.sleep(0.2)


def openssl_ocsp(ca: Path, certificate: Path, url: str) -> str:
    done = subprocess.run(
        ["openssl", "ocsp", "-issuer", str(ca), "-cert", str(certificate), "-url", url, "-CAfile", str(ca),
         "-resp_text", "-timeout", "20"],
        capture_output=True, text=True, timeout=60,
    )
    return done.stdout + done.stderr


def test_certificates_name_this_server_and_it_serves_the_ca_certificate(server, tmp_path):
    device = load(enroll(server, tmp_path, "pointer-device"))
    crl_url, ocsp_url, ca_url = pointers(device)
    assert crl_url.startswith(server.url + "/api/crl/") and crl_url.endswith(".crl")
    assert ocsp_url == server.url + "/api/ocsp"
    status, headers, body = fetch(ca_url)
    assert (status, headers["Content-Type"]) == (200, "application/pkix-cert")
    assert x509.load_der_x509_certificate(body) == load(server.ca_pem_path)


def test_openssl_ocsp_says_good_then_revoked_after_scep_certs_revoke(server, tmp_path):
    path = enroll(server, tmp_path, "ocsp-device")
    _, ocsp_url, _ = pointers(load(path))
    answer = openssl_ocsp(server.ca_pem_path, path, ocsp_url)
    assert f"{path}: good" in answer and "Response verify OK" in answer, answer

    serial = f"{load(path).serial_number:X}"
    revoked = run_cli(server.environment(), "certs", "revoke", "--serial", serial, "--reason", "keyCompromise")
    assert revoked.returncode == 0, revoked.stderr
    answer = openssl_ocsp(server.ca_pem_path, path, ocsp_url)
    assert f"{path}: revoked" in answer and "Reason: keyCompromise" in answer and "Response verify OK" in answer, answer


def test_openssl_and_strongswan_check_the_crl_from_the_certificate(server, tmp_path):
    good_path, bad_path = enroll(server, tmp_path, "crl-good"), enroll(server, tmp_path, "crl-bad")
    crl_url, _, _ = pointers(load(bad_path))
    first = x509.load_der_x509_crl(fetch_crl(crl_url))
    number = first.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    revoked = run_cli(server.environment(), "certs", "revoke", "--serial", f"{load(bad_path).serial_number:x}",
                      "--reason", "superseded")
    assert revoked.returncode == 0, revoked.stderr
    crl_der = fetch_crl(crl_url, newer_than=number)  # published at once by the revocation
    crl_pem, crl_der_path = tmp_path / "crl.pem", tmp_path / "crl.der"
    crl_der_path.write_bytes(crl_der)
    crl_pem.write_bytes(x509.load_der_x509_crl(crl_der).public_bytes(serialization.Encoding.PEM))

    def openssl_verify(certificate: Path) -> subprocess.CompletedProcess:
        return subprocess.run(["openssl", "verify", "-crl_check", "-CAfile", str(server.ca_pem_path),
                               "-CRLfile", str(crl_pem), str(certificate)], capture_output=True, text=True)

    assert openssl_verify(good_path).returncode == 0
    refused = openssl_verify(bad_path)
    assert refused.returncode != 0 and "certificate revoked" in refused.stdout + refused.stderr

    def pki_verify(certificate: Path) -> subprocess.CompletedProcess:
        return subprocess.run(["pki", "--verify", "--in", str(certificate), "--cacert", str(server.ca_pem_path),
                               "--crl", str(crl_der_path)], capture_output=True, text=True)

    trusted = pki_verify(good_path)
    assert trusted.returncode == 0 and "certificate trusted" in trusted.stdout, trusted.stdout + trusted.stderr
    untrusted = pki_verify(bad_path)
    assert untrusted.returncode != 0 and "revoked" in untrusted.stdout + untrusted.stderr


def test_crl_answer_is_cacheable_until_next_update_and_unknown_ca_is_404(server, tmp_path):
    crl_url, _, _ = pointers(load(enroll(server, tmp_path, "header-device")))
    fetch_crl(crl_url)
    status, headers, body = fetch(crl_url)
    crl = x509.load_der_x509_crl(body)
    assert (status, headers["Content-Type"]) == (200, "application/pkix-crl")
    assert headers["Expires"] == crl.next_update_utc.strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert headers["Last-Modified"] == crl.last_update_utc.strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert "max-age=" in headers["Cache-Control"] and headers["ETag"]
    assert fetch(crl_url, headers={"If-None-Match": headers["ETag"]})[0] == 304
    assert fetch(f"{server.url}/api/crl/{'0' * 64}.crl")[0] == 404
    assert fetch(f"{server.url}/api/crl/not-a-ca.crl")[0] == 404
    assert fetch(f"{server.url}/api/ca/{'0' * 64}.der")[0] == 404


def ocsp_status(body: bytes) -> ocsp.OCSPResponseStatus:
    return ocsp.load_der_ocsp_response(body).response_status


def test_ocsp_get_is_answered_like_post_with_rfc5019_caching(server, tmp_path):
    device = load(enroll(server, tmp_path, "get-device"))
    ca = load(server.ca_pem_path)
    request = ocsp.OCSPRequestBuilder().add_certificate(device, ca, hashes.SHA1()).build()
    encoded = urllib.parse.quote(base64.b64encode(request.public_bytes(serialization.Encoding.DER)), safe="")
    status, headers, body = fetch(f"{server.url}/api/ocsp/{encoded}")
    response = ocsp.load_der_ocsp_response(body)
    assert (status, headers["Content-Type"]) == (200, "application/ocsp-response")
    assert response.certificate_status is ocsp.OCSPCertStatus.GOOD
    assert "max-age=" in headers["Cache-Control"] and headers["ETag"] and headers["Last-Modified"]


def test_bad_ocsp_input_gets_an_ocsp_error_never_a_5xx(server, tmp_path):
    post = {"Content-Type": "application/ocsp-request"}
    status, headers, body = fetch(f"{server.url}/api/ocsp", data=b"\x30\x03garbage", headers=post)
    assert (status, ocsp_status(body)) == (200, ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
    assert headers["Content-Type"] == "application/ocsp-response"
    for empty_get in ("/api/ocsp", "/api/ocsp/", "/api/ocsp/%%%"):
        status, _, body = fetch(server.url + empty_get)
        assert (status, ocsp_status(body)) == (200, ocsp.OCSPResponseStatus.MALFORMED_REQUEST), empty_get

    stranger = load(enroll(server, tmp_path, "stranger"))  # a real serial, asked about under another CA's hashes
    wrong_issuer = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        hashlib.sha1(b"another CA name").digest(), hashlib.sha1(b"another CA key").digest(),
        stranger.serial_number, hashes.SHA1(),
    ).build()
    status, _, body = fetch(f"{server.url}/api/ocsp", data=wrong_issuer.public_bytes(serialization.Encoding.DER),
                            headers=post)
    assert (status, ocsp_status(body)) == (200, ocsp.OCSPResponseStatus.UNAUTHORIZED)

    assert fetch(f"{server.url}/api/ocsp", data=b"\x30" * 20_000, headers=post)[0] == 413
    assert fetch(f"{server.url}/api/ocsp/{'A' * 30_000}")[0] in (413, 414)
