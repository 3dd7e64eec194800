"""`scep ca ...` and `scep doctor` on local custody: init, refusal to replace, RA renewal, rollover and promote,
a subordinate CA signed by an enterprise root, and what doctor says."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from scep.challenge.static import StaticValidator
from scep.core import message as msg
from scep.core.service import ScepService, ServiceOptions
from scep.keys.local import LocalHome
from scep.store.sqlite import SqliteStore
from scep.tools.cli import main
from scep.tools.client import split_ra_and_ca
from tests.conftest import CHALLENGE
from tests.scep_helpers import enroll


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SCEP_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SCEP_CHALLENGE", CHALLENGE)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "data"


def test_init_show_and_refuse_to_replace(data_dir, capsys):
    assert main(["ca", "init", "--subject", "CN=Test Root,O=Example", "--key-type", "EC", "--curve", "P-384"]) == 0
    assert main(["ca", "init"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["ca", "show"]) == 0
    shown = capsys.readouterr().out
    assert "[ca] CN=Test Root,O=Example" in shown and "EC secp384r1 (software)" in shown and "[ra]" in shown
    assert oct((data_dir / "ca.key").stat().st_mode & 0o777) == "0o600"
    old_ra = LocalHome(data_dir).keys().ra.certificate
    assert main(["ca", "ra", "renew"]) == 0
    new_ra = LocalHome(data_dir).keys().ra.certificate
    assert new_ra != old_ra and new_ra.public_key() != old_ra.public_key()
    assert main(["ca", "init", "--force", "--subject", "CN=Second Root"]) == 0
    assert LocalHome(data_dir).keys().ca.certificate.subject.rfc4514_string() == "CN=Second Root"


def test_rollover_and_promote(data_dir, make_service, keys, capsys):
    assert main(["ca", "init", "--subject", "CN=Root 1"]) == 0
    assert main(["ca", "promote"]) == 1  # nothing to promote yet
    assert main(["ca", "rollover", "--subject", "CN=Root 2"]) == 0
    home = LocalHome(data_dir)
    service = ScepService(home, SqliteStore(data_dir / "scep.db"), StaticValidator(CHALLENGE), ServiceOptions())
    old_key = keys.new()
    before, _ = enroll(service, old_key, "rolling")
    assert "GetNextCACert" in service.capabilities()
    signer, content = msg.read_signed_content(service.next_ca_certificates())
    assert signer == home.keys().ca.certificate
    (next_ca,) = msg.read_certs_only(content)
    assert next_ca.subject.rfc4514_string() == "CN=Root 2"
    assert main(["ca", "promote"]) == 0
    home._invalidate()
    ra, ca = split_ra_and_ca(msg.read_certs_only(service.ca_certificates()))
    assert ca == next_ca and "GetNextCACert" not in service.capabilities()
    ra.verify_directly_issued_by(next_ca)
    after, _ = enroll(service, keys.new(), "after-promote")
    after.certificate.verify_directly_issued_by(next_ca)
    renewed, _ = enroll(service, keys.new(), "rolling", challenge=None, renew_with=(old_key, before.certificate))
    renewed.certificate.verify_directly_issued_by(next_ca)  # a device of the retired CA renews under the new one


def _enterprise_root():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Enterprise Root")])
    now = datetime.now(timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def test_subordinate_ca(data_dir, tmp_path, capsys):
    assert main(["ca", "import", "--cert", str(tmp_path / "missing.pem")]) == 1
    assert "missing.pem" in capsys.readouterr().err
    assert main(["ca", "init", "--subordinate", "--subject", "CN=Issuing CA,O=Example", "--csr-out", "sub.csr"]) == 0
    csr = x509.load_pem_x509_csr((tmp_path / "sub.csr").read_bytes())
    assert csr.is_signature_valid and csr.subject.rfc4514_string() == "CN=Issuing CA,O=Example"
    root_key, root = _enterprise_root()
    now = datetime.now(timezone.utc)
    signed = (
        x509.CertificateBuilder().subject_name(csr.subject).issuer_name(root.subject).public_key(csr.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1825))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    (tmp_path / "sub.pem").write_bytes(signed.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "root.pem").write_bytes(root.public_bytes(serialization.Encoding.PEM))
    assert main(["ca", "import", "--cert", "root.pem"]) == 1  # not the certificate of the pending key
    assert main(["ca", "import", "--cert", "sub.pem", "--chain", "root.pem"]) == 0
    keys = LocalHome(data_dir).keys()
    assert keys.ca.certificate == signed and keys.chain == (root,)
    keys.ra.certificate.verify_directly_issued_by(signed)
    capsys.readouterr()
    assert main(["doctor"]) == 0
    assert "[ok] subordinate CA chain of 1 certificate(s) verifies" in capsys.readouterr().out


def test_doctor(data_dir, capsys):
    assert main(["doctor"]) == 1
    assert "run `scep ca init`" in capsys.readouterr().out
    assert main(["ca", "init"]) == 0
    capsys.readouterr()
    assert main(["doctor"]) == 0
    report = capsys.readouterr().out
    assert "[ok] CA key signs" in report and "[ok] RA key decrypts" in report and "[ok] store:" in report
    assert CHALLENGE not in report


def _encryption_twin_of(data_dir: Path) -> tuple[x509.Certificate, x509.Certificate, x509.Certificate]:
    """(RA, its encryption-only twin, CA) as the local custody serves them."""
    keys = LocalHome(data_dir).keys()
    assert keys.ra_encryption is not None
    return keys.ra.certificate, keys.ra_encryption, keys.ca.certificate


def _assert_twin(ra: x509.Certificate, twin: x509.Certificate, ca: x509.Certificate) -> None:
    usage = twin.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_encipherment and not usage.digital_signature
    assert twin.public_key() == ra.public_key() and twin.subject == ra.subject
    twin.verify_directly_issued_by(ca)
    der = serialization.Encoding.DER
    assert twin.public_bytes(der) > ra.public_bytes(der)  # sorts after the RA in GetCACert's SET OF


@pytest.mark.parametrize("key_options", [["--key-type", "RSA"], ["--key-type", "EC", "--curve", "P-384"]])
def test_every_ra_gets_an_encryption_twin_that_follows_renewal_and_promote(data_dir, key_options):
    assert main(["ca", "init", "--subject", "CN=Root 1", *key_options]) == 0
    _assert_twin(*_encryption_twin_of(data_dir))
    for _ in range(8):  # a fresh RA each time: the twin always sorts after it
        assert main(["ca", "ra", "renew"]) == 0
        _assert_twin(*_encryption_twin_of(data_dir))
    assert main(["ca", "rollover", "--subject", "CN=Root 2", *key_options]) == 0
    assert main(["ca", "promote"]) == 0
    ra, twin, ca = _encryption_twin_of(data_dir)
    assert ca.subject.rfc4514_string() == "CN=Root 2"
    _assert_twin(ra, twin, ca)


def test_an_ra_from_before_encryption_twins_gets_one_at_the_next_ra_command(data_dir):
    assert main(["ca", "init"]) == 0
    (data_dir / "ra.encryption.pem").unlink()
    assert LocalHome(data_dir).keys().ra_encryption is None
    assert main(["ca", "ra", "renew"]) == 0
    _assert_twin(*_encryption_twin_of(data_dir))


def test_a_twin_left_over_from_another_ra_key_is_not_served(data_dir):
    assert main(["ca", "init"]) == 0
    stale = (data_dir / "ra.encryption.pem").read_bytes()
    assert main(["ca", "ra", "renew"]) == 0
    (data_dir / "ra.encryption.pem").write_bytes(stale)
    assert LocalHome(data_dir).keys().ra_encryption is None
