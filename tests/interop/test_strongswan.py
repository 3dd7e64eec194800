"""strongSwan 5.9.8 `pki --scepca` / `pki --scep` (Debian strongswan-pki + libstrongswan-extra-plugins).

`pki --scep` uses AES-128-CBC and SHA-256 by default and checks GetCACaps before sending anything; it POSTs
when POSTPKIOperation is advertised. Renewal (`--cert old --key oldkey`) sends a RenewalReq signed by the old
certificate, for a new key, and needs the `Renewal` capability.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from . import CHALLENGE, ScepServer, assert_end_entity_from, load_certificate, require_binary
from .strongswan import enrol, fetch_ca_certificates, generate_key

pytestmark = pytest.mark.interop

@pytest.fixture(scope="module")
def pki() -> str:
    return require_binary("pki")


@pytest.fixture(scope="module")
def server(start_server) -> ScepServer:
    return start_server()


@pytest.fixture(scope="module")
def scep_ca_files(pki, server, tmp_path_factory) -> tuple[Path, Path]:
    """CA and RA certificates as fetched by `pki --scepca` (PEM)."""
    directory = tmp_path_factory.mktemp("strongswan-scepca")
    result = fetch_ca_certificates(pki, server, directory)
    assert result.succeeded, result.describe(server)
    return directory / "ca.pem", directory / "ra.pem"


def spki(key_or_cert) -> bytes:
    return key_or_cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_key(path: Path):
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def test_scepca_writes_the_servers_ca_and_ra(pki, server, scep_ca_files):
    """strongSwan files the RA certificates by key usage: ra.pem is the one it encrypts to (the encryption-only
    twin), ra-2.pem the signing RA; both carry the RA's key and are issued by the CA."""
    ca_pem, encryption_pem = scep_ca_files
    ca = load_certificate(ca_pem)
    assert ca == load_certificate(server.ca_pem_path)
    ra = load_certificate(encryption_pem.with_name("ra-2.pem"))
    assert ra == load_certificate(server.ra_pem_path)
    encryption = load_certificate(encryption_pem)
    assert spki(encryption) == spki(ra)
    for certificate in (ra, encryption):
        certificate.verify_directly_issued_by(ca)
    ra_usage = ra.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ra_usage.digital_signature and ra_usage.key_encipherment
    encryption_usage = encryption.extensions.get_extension_for_class(x509.KeyUsage).value
    assert encryption_usage.key_encipherment and not encryption_usage.digital_signature


def test_enrol_with_san_then_renew_with_a_new_key(pki, server, scep_ca_files, tmp_path):
    ca = load_certificate(server.ca_pem_path)
    generate_key(pki, tmp_path / "key.pem")
    enrolment = enrol(
        pki, server, scep_ca_files, tmp_path,
        "--in", tmp_path / "key.pem",
        "--dn", "C=CH, O=Interop, CN=strongswan-device",
        "--san", "strongswan-device.example.test",
        "--password", CHALLENGE,
    )
    assert enrolment.succeeded, enrolment.describe(server)
    issued = load_certificate(tmp_path / "issued.pem")
    assert_end_entity_from(issued, ca, cn="strongswan-device")
    assert spki(issued) == spki(load_key(tmp_path / "key.pem"))
    names = issued.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "strongswan-device.example.test" in names.get_values_for_type(x509.DNSName)
    (tmp_path / "old.pem").write_bytes((tmp_path / "issued.pem").read_bytes())

    generate_key(pki, tmp_path / "new-key.pem")
    renewal = enrol(
        pki, server, scep_ca_files, tmp_path,
        "--in", tmp_path / "new-key.pem",
        "--dn", "C=CH, O=Interop, CN=strongswan-device",
        "--san", "strongswan-device.example.test",
        "--cert", tmp_path / "old.pem",
        "--key", tmp_path / "key.pem",
    )
    assert renewal.succeeded, renewal.describe(server)
    renewed = load_certificate(tmp_path / "issued.pem")
    assert_end_entity_from(renewed, ca, cn="strongswan-device")
    assert renewed.serial_number != issued.serial_number
    assert spki(renewed) == spki(load_key(tmp_path / "new-key.pem"))


def test_wrong_challenge_is_refused(pki, server, scep_ca_files, tmp_path):
    generate_key(pki, tmp_path / "key.pem")
    result = enrol(
        pki, server, scep_ca_files, tmp_path,
        "--in", tmp_path / "key.pem",
        "--dn", "CN=strongswan-wrong-challenge",
        "--password", "not-the-challenge",
    )
    assert not result.succeeded, result.describe(server)
    assert "reply status is not 'SUCCESS'" in result.stderr, (
        "expected a SCEP FAILURE reply, not a transport error\n" + result.describe(server)
    )
    assert "BEGIN CERTIFICATE" not in result.stdout
