"""What real and legacy devices send, against a running `scep serve`: PKCS#10 version 1 and 2 (Apple), SHA-1
signed requests, EC device keys (their certificate comes back in a key-agreement envelope that OpenSSL opens),
and, in Intune mode, a signer key that can receive no envelope: refused before Intune hears anything."""

from __future__ import annotations

import subprocess

import pytest
from asn1crypto import csr as asn1_csr
from asn1crypto import keys as asn1_keys
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding

from scep.config import ConfigError, build_service, load_settings
from scep.core import message as msg
from scep.core.protocol import ContentCipher, FailInfo, PkiStatus
from scep.keys.local import LocalKey
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
from tests.emulators.intune import running_intune
from tests.interop import require_binary
from tests.scep_helpers import ra_and_ca
from tests.serverproc import ScepServer, run_cli

pytestmark = pytest.mark.e2e  # most of these run against `scep serve`

SIGNATURE_HASHES = {"sha1": hashes.SHA1, "sha256": hashes.SHA256}


def pkcs10(key: rsa.RSAPrivateKey, common_name: str, challenge: str, version: int, hash_name: str) -> bytes:
    """A PKCS#10 request built by hand as devices build it: any version field, any signature hash."""
    info = asn1_csr.CertificationRequestInfo(
        {
            "version": version,
            "subject": asn1_x509.Name.build({"common_name": common_name}),
            "subject_pk_info": asn1_keys.PublicKeyInfo.load(
                key.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            ),
            "attributes": [
                {
                    "type": "challenge_password",
                    "values": [asn1_x509.DirectoryString("printable_string", challenge)],
                }
            ],
        }
    )
    signature = key.sign(info.dump(), asym_padding.PKCS1v15(), SIGNATURE_HASHES[hash_name]())
    return asn1_csr.CertificationRequest(
        {
            "certification_request_info": info,
            "signature_algorithm": {"algorithm": f"{hash_name}_rsa", "parameters": None},
            "signature": signature,
        }
    ).dump()


def device_request(ra: x509.Certificate, csr_der: bytes, key, options: RequestOptions, common_name: str):
    """The PKIMessage carrying csr_der as sent, and the enrollment that reads its reply."""
    enrollment = new_enrollment(key, make_csr(key, common_name))
    return build_request(enrollment, ra, options, content=csr_der), enrollment


@pytest.fixture(scope="module")
def server():
    with ScepServer(env={"SCEP_CHALLENGE": CHALLENGE}) as running:
        yield running


LEGACY_REQUESTS = [
    (2, "sha1", RequestOptions(ContentCipher.DES3, "sha1")),
    (2, "sha256", RequestOptions(ContentCipher.AES128, "sha256")),
    (0, "sha1", RequestOptions(ContentCipher.AES256, "sha256")),
    (1, "sha256", RequestOptions(ContentCipher.DES3, "sha1", method="GET")),
]


@pytest.mark.parametrize("version,csr_hash,options", LEGACY_REQUESTS, ids=["v2-sha1-3des", "v2", "sha1", "v1-get"])
def test_legacy_csrs_are_issued_by_scep_serve(server, keys, version, csr_hash, options):
    client = ScepClient(server.scep_url)
    ra, ca = client.ca_certificates()
    key = keys.new()
    name = f"legacy-v{version}-{csr_hash}"
    request, enrollment = device_request(ra, pkcs10(key, name, CHALLENGE, version, csr_hash), key, options, name)
    result = read_reply(client.pki_operation(request, options.method), enrollment, ra)
    assert result.status is PkiStatus.SUCCESS, result.fail_info_text
    result.certificate.verify_directly_issued_by(ca)
    assert result.certificate.subject.rfc4514_string() == f"CN={name}"
    assert result.certificate.public_key().public_numbers() == key.public_key().public_numbers()


@pytest.mark.parametrize("version,csr_hash", [(2, "sha1"), (0, "sha1"), (2, "sha256")])
def test_lenient_reading_still_verifies_the_signature(service, keys, version, csr_hash):
    ra, _ = ra_and_ca(service)
    key = keys.new()
    csr_der = bytearray(pkcs10(key, "tampered", CHALLENGE, version, csr_hash))
    csr_der[-5] ^= 0x01  # inside the signature
    request, enrollment = device_request(ra, bytes(csr_der), key, RequestOptions(), "tampered")
    result = read_reply(service.pki_operation(request).der, enrollment, ra)
    assert result.status is PkiStatus.FAILURE and result.fail_info is FailInfo.BAD_MESSAGE_CHECK
    assert service.store.certificate_for_transaction(enrollment.transaction_id) is None


def test_wrong_challenge_in_a_legacy_csr_is_refused(service, keys):
    ra, _ = ra_and_ca(service)
    key = keys.new()
    request, enrollment = device_request(ra, pkcs10(key, "x", "wrong", 2, "sha1"), key, RequestOptions(), "x")
    result = read_reply(service.pki_operation(request).der, enrollment, ra)
    assert result.status is PkiStatus.FAILURE and result.fail_info is FailInfo.BAD_REQUEST


# --- EC device keys ---


def write_pem(tmp_path, key, certificate) -> tuple[str, str]:
    key_path, cert_path = tmp_path / "device.key", tmp_path / "device.pem"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return str(key_path), str(cert_path)


@pytest.mark.parametrize("curve", [ec.SECP256R1, ec.SECP384R1])
@pytest.mark.parametrize("cipher", [ContentCipher.AES128, ContentCipher.AES256, ContentCipher.DES3])
def test_openssl_opens_the_reply_to_an_ec_device(service, tmp_path, curve, cipher):
    openssl = require_binary("openssl")
    key = ec.generate_private_key(curve())
    ra, _ = ra_and_ca(service)
    enrollment = new_enrollment(key, make_csr(key, "ec-device", CHALLENGE))
    reply = msg.parse_pki_message(service.pki_operation(build_request(enrollment, ra, RequestOptions(cipher))).der)
    assert reply.pki_status is PkiStatus.SUCCESS
    key_path, cert_path = write_pem(tmp_path, key, enrollment.signer.certificate)
    opened = subprocess.run(
        [openssl, "cms", "-decrypt", "-inform", "DER", "-inkey", key_path, "-recip", cert_path],
        input=reply.content,
        capture_output=True,
        check=True,
    )
    [certificate] = msg.read_certs_only(opened.stdout)
    assert certificate.public_key().public_numbers() == key.public_key().public_numbers()
    usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_agreement and not usage.key_encipherment


def test_client_opens_an_envelope_openssl_made_for_an_ec_key(tmp_path):
    """The other direction: OpenSSL's default (dhSinglePass-stdDH-sha1kdf-scheme, aes128-wrap) opens too."""
    openssl = require_binary("openssl")
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = self_signed(key, x509.Name.from_rfc4514_string("CN=ec-device"))
    _, cert_path = write_pem(tmp_path, key, certificate)
    sealed = subprocess.run(
        [openssl, "cms", "-encrypt", "-aes128", "-outform", "DER", cert_path],
        input=b"certificate goes here",
        capture_output=True,
        check=True,
    )
    assert msg.open_key_agreement_envelope(sealed.stdout, key) == b"certificate goes here"


@pytest.mark.parametrize("curve", ["P-256", "P-384"])
def test_scep_enroll_with_an_ec_key(server, tmp_path, curve):
    prefix = tmp_path / "ec-device"
    enrolled = run_cli(
        {"SCEP_CHALLENGE": CHALLENGE},
        "enroll", "--url", server.scep_url, "--cn", "ec-device", "--out", str(prefix), "--key", f"ec:{curve}",
    )
    assert enrolled.returncode == 0, enrolled.stdout + enrolled.stderr
    key = serialization.load_pem_private_key((tmp_path / "ec-device.key").read_bytes(), None)
    certificate = x509.load_pem_x509_certificate((tmp_path / "ec-device.pem").read_bytes())
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == {"P-256": "secp256r1"}.get(
        curve, "secp384r1"
    )
    assert certificate.public_key().public_numbers() == key.public_key().public_numbers()
    certificate.verify_directly_issued_by(x509.load_pem_x509_certificate(server.ca_pem_path.read_bytes()))


def test_scep_enroll_refuses_an_unknown_key_kind(server, tmp_path):
    refused = run_cli({}, "enroll", "--url", server.scep_url, "--cn", "x", "--out", str(tmp_path / "x"),
                      "--key", "dsa:1024")
    assert refused.returncode == 1 and "ec:P-256" in refused.stderr


# --- RSA key size ---


def test_minimum_rsa_key_size_is_a_setting(tmp_path, keys):
    environment = {"SCEP_CHALLENGE": CHALLENGE, "SCEP_DATA_DIR": str(tmp_path)}
    with pytest.raises(ConfigError, match="SCEP_MIN_RSA_KEY_BITS"):
        load_settings({**environment, "SCEP_MIN_RSA_KEY_BITS": "512"})
    strict = build_service(load_settings(environment))
    assert strict.options.profile.min_rsa_bits == 2048
    legacy = build_service(load_settings({**environment, "SCEP_MIN_RSA_KEY_BITS": "1024"}))
    ra, _ = ra_and_ca(legacy)
    key = keys.new(1024)
    enrollment = new_enrollment(key, make_csr(key, "old-phone", CHALLENGE))
    request = build_request(enrollment, ra, RequestOptions())
    refused = read_reply(strict.pki_operation(request).der, enrollment, ra)
    assert refused.fail_info is FailInfo.BAD_ALG and "SCEP_MIN_RSA_KEY_BITS" in refused.fail_info_text
    assert read_reply(legacy.pki_operation(request).der, enrollment, ra).status is PkiStatus.SUCCESS


# --- Intune mode ---


@pytest.fixture(scope="module")
def intune_server():
    with running_intune() as bed, ScepServer(env=bed.environment()) as running:
        yield bed, running


@pytest.mark.parametrize("curve", [ec.SECP256R1, ec.SECP384R1])
def test_ec_device_in_intune_mode_gets_a_certificate_it_can_decrypt(intune_server, curve):
    bed, server = intune_server
    bed.reset()
    challenge = bed.intune.issue_challenge("CN=intune-ec-device")
    client = ScepClient(server.scep_url)
    ra, _ = client.ca_certificates()
    key = ec.generate_private_key(curve())
    enrollment = new_enrollment(key, make_csr(key, "intune-ec-device", challenge))
    result = client.enroll(enrollment, ra)
    assert result.status is PkiStatus.SUCCESS, result.fail_info_text
    assert result.certificate.public_key().public_numbers() == key.public_key().public_numbers()
    [notification] = bed.intune.notifications_of("success")
    assert notification.transaction_id == enrollment.transaction_id


def test_signer_that_can_receive_no_envelope_is_refused_before_intune_hears_of_it(intune_server):
    """secp256k1 signs (the signature verifies) but has no key-agreement scheme here: refused up front."""
    bed, server = intune_server
    bed.reset()
    challenge = bed.intune.issue_challenge("CN=k1-device")
    client = ScepClient(server.scep_url)
    ra, _ = client.ca_certificates()
    key = ec.generate_private_key(ec.SECP256R1())
    csr = make_csr(key, "k1-device", challenge)
    signer_key = ec.generate_private_key(ec.SECP256K1())
    enrollment = new_enrollment(key, csr)
    enrollment.signer = LocalKey(signer_key, self_signed(signer_key, csr.subject))
    result = read_reply(client.pki_operation(build_request(enrollment, ra, RequestOptions())), enrollment, ra)
    assert result.status is PkiStatus.FAILURE and result.fail_info is FailInfo.BAD_ALG
    assert bed.intune.notifications_of("success") == []
    assert bed.intune.validations == []
    assert SqliteStore(server.data_dir / "scep.db").certificate_for_transaction(enrollment.transaction_id) is None
