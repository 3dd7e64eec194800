"""micromdm scepclient 2.1.0 (Debian package `scep`) against `scep serve`.

The client always encrypts with single DES and signs with SHA-1, so the server needs SCEP_ALLOW_DES=true. It
writes csr.pem (and a transient self.pem) next to the private key, so every run gets its own directory. When
the certificate file already exists it sends a RenewalReq signed by that certificate, re-using key and CSR.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from . import CHALLENGE, ScepServer, assert_end_entity_from, load_certificate, require_binary, run_client

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def scepclient() -> str:
    return require_binary("scepclient")


@pytest.fixture(scope="module")
def des_server(start_server) -> ScepServer:
    return start_server({"SCEP_ALLOW_DES": "true"})


def enrol(scepclient: str, server: ScepServer, directory: Path, cn: str, challenge: str | None = CHALLENGE):
    command = [
        scepclient,
        "-server-url", server.scep_url,
        "-private-key", directory / "key.pem",
        "-certificate", directory / "cert.pem",
        "-cn", cn,
        "-organization", "Interop",
        "-debug",
    ]
    if challenge is not None:
        command += ["-challenge", challenge]
    return run_client(command, cwd=directory)


def public_key_der(key_or_cert) -> bytes:
    public_key = key_or_cert.public_key()
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def client_key(directory: Path):
    return serialization.load_pem_private_key((directory / "key.pem").read_bytes(), password=None)


def test_enrol_then_renew_with_the_issued_certificate(scepclient, des_server, tmp_path):
    ca = load_certificate(des_server.ca_pem_path)

    first = enrol(scepclient, des_server, tmp_path, "scepclient-device-1")
    assert first.succeeded, first.describe(des_server)
    issued = load_certificate(tmp_path / "cert.pem")
    assert_end_entity_from(issued, ca, cn="scepclient-device-1")
    assert public_key_der(issued) == public_key_der(client_key(tmp_path))
    assert not (tmp_path / "self.pem").exists(), "scepclient removes its self-signed signer after success"

    # The certificate file now exists: scepclient signs a RenewalReq with it (same key, same CSR).
    renewal = enrol(scepclient, des_server, tmp_path, "scepclient-device-1")
    assert renewal.succeeded, renewal.describe(des_server)
    assert "signer_cn=scepclient-device-1" in renewal.stderr, "expected a request signed by the old cert"
    renewed = load_certificate(tmp_path / "cert.pem")
    assert_end_entity_from(renewed, ca, cn="scepclient-device-1")
    assert renewed.serial_number != issued.serial_number, (
        "the renewal returned the certificate already issued instead of a new one "
        "(scepclient re-uses the transactionID of the first enrolment)\n" + renewal.describe(des_server)
    )
    assert public_key_der(renewed) == public_key_der(issued)


def test_wrong_challenge_is_refused_and_nothing_issued(scepclient, des_server, tmp_path):
    result = enrol(scepclient, des_server, tmp_path, "scepclient-wrong-challenge", challenge="not-the-challenge")
    assert not result.succeeded, result.describe(des_server)
    assert "PKCSReq (19) request failed" in result.stdout, (
        "expected a SCEP FAILURE CertRep, not a transport error\n" + result.describe(des_server)
    )
    assert not (tmp_path / "cert.pem").exists()


def test_retry_with_the_right_challenge_after_a_refusal(scepclient, des_server, tmp_path):
    """scepclient keeps its key, so the corrected request carries the refused request's transactionID."""
    refused = enrol(scepclient, des_server, tmp_path, "scepclient-retry", challenge="not-the-challenge")
    assert not refused.succeeded, refused.describe(des_server)
    (tmp_path / "csr.pem").unlink()  # the stored CSR holds the wrong challenge; scepclient would re-send it

    retried = enrol(scepclient, des_server, tmp_path, "scepclient-retry")
    assert retried.succeeded, retried.describe(des_server)
    ca = load_certificate(des_server.ca_pem_path)
    assert_end_entity_from(load_certificate(tmp_path / "cert.pem"), ca, cn="scepclient-retry")


def test_missing_challenge_is_refused(scepclient, des_server, tmp_path):
    result = enrol(scepclient, des_server, tmp_path, "scepclient-no-challenge", challenge=None)
    assert not result.succeeded, result.describe(des_server)
    assert "PKCSReq (19) request failed" in result.stdout, result.describe(des_server)
    assert not (tmp_path / "cert.pem").exists()


def test_renewal_signed_by_a_foreign_certificate_is_refused(scepclient, des_server, tmp_path):
    """A RenewalReq whose signer this CA never issued must not be trusted (and carries no valid challenge)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "cert.pem").write_bytes(
        self_signed(key, "scepclient-forged").public_bytes(serialization.Encoding.PEM)
    )
    forged = (tmp_path / "cert.pem").read_bytes()

    result = enrol(scepclient, des_server, tmp_path, "scepclient-forged", challenge="not-the-challenge")
    assert not result.succeeded, result.describe(des_server)
    assert "RenewalReq (17) request failed" in result.stdout, result.describe(des_server)
    assert (tmp_path / "cert.pem").read_bytes() == forged


def self_signed(key: rsa.RSAPrivateKey, cn: str) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )


def test_single_des_is_refused_unless_allowed(scepclient, start_server, tmp_path):
    strict_server = start_server({}, workers=1)
    result = enrol(scepclient, strict_server, tmp_path, "scepclient-des-refused")
    assert not result.succeeded, result.describe(strict_server)
    assert "failInfo: badAlg" in result.stdout, result.describe(strict_server)
    assert not (tmp_path / "cert.pem").exists()


def test_enrolment_through_the_legacy_cgi_path(scepclient, des_server, tmp_path):
    """The path is irrelevant to the CA; scepclient users often configure /cgi-bin/pkiclient.exe."""
    command = [
        scepclient,
        "-server-url", f"{des_server.url}/cgi-bin/pkiclient.exe",
        "-private-key", tmp_path / "key.pem",
        "-certificate", tmp_path / "cert.pem",
        "-cn", "scepclient-cgi-path",
        "-challenge", CHALLENGE,
    ]
    result = run_client(command, cwd=tmp_path)
    assert result.succeeded, result.describe(des_server)
    ca = load_certificate(des_server.ca_pem_path)
    assert_end_entity_from(load_certificate(tmp_path / "cert.pem"), ca, cn="scepclient-cgi-path")
