"""Which certificates a request may be encrypted to: the RA, its encryption-only twin (what clients written for
Microsoft NDES pick by key usage), by issuer and serial or by subjectKeyIdentifier, alone or beside the CA; and
a signed FAILURE that says so for a request encrypted to a certificate that is not ours."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from asn1crypto import cms
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from scep.challenge.static import StaticValidator
from scep.core import message as msg
from scep.core.ca import CaOptions, init_root
from scep.core.protocol import FailInfo, PkiStatus
from scep.core.service import ScepService, ServiceOptions
from scep.keys.local import LocalHome
from scep.store.sqlite import SqliteStore
from scep.tools.client import DEFAULT_OPTIONS, Enrollment, Result, make_csr, new_enrollment, read_reply
from tests.conftest import CHALLENGE


def served(service: ScepService) -> list[x509.Certificate]:
    return msg.read_certs_only(service.ca_certificates())


def key_usage(certificate: x509.Certificate) -> x509.KeyUsage:
    return certificate.extensions.get_extension_for_class(x509.KeyUsage).value


def is_ca(certificate: x509.Certificate) -> bool:
    return certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def roles(service: ScepService) -> tuple[x509.Certificate, x509.Certificate, x509.Certificate]:
    """(signing RA, CA, encryption-only RA) from GetCACert, told apart by key usage as NDES clients do."""
    certificates = served(service)
    (ca,) = [c for c in certificates if is_ca(c)]
    (ra,) = [c for c in certificates if not is_ca(c) and key_usage(c).digital_signature]
    (encryption,) = [c for c in certificates if not is_ca(c) and not key_usage(c).digital_signature]
    return ra, ca, encryption


def envelope_to(content: bytes, *recipients: x509.Certificate) -> bytes:
    """An EnvelopedData (AES-128-CBC, RSA PKCS#1 v1.5) with one RecipientInfo per certificate, in this order."""
    builder = pkcs7.PKCS7EnvelopeBuilder().set_data(content)
    for recipient in recipients:
        builder = builder.add_recipient(recipient)
    return builder.encrypt(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary])


def addressed_by_key_identifier(envelope: bytes, key_ids: dict[int, bytes]) -> bytes:
    """The same envelope with every RecipientInfo naming its certificate (by serial in key_ids) by key identifier."""
    info = cms.ContentInfo.load(envelope)
    enveloped = info["content"]
    infos = []
    for recipient_info in enveloped["recipient_infos"]:
        ktri = recipient_info.chosen
        serial = ktri["rid"].chosen["serial_number"].native
        infos.append(
            cms.RecipientInfo(
                name="ktri",
                value={
                    "version": "v2",
                    "rid": cms.RecipientIdentifier(name="subject_key_identifier", value=key_ids[serial]),
                    "key_encryption_algorithm": ktri["key_encryption_algorithm"],
                    "encrypted_key": ktri["encrypted_key"],
                },
            )
        )
    rebuilt = cms.EnvelopedData(
        {
            "version": "v2",
            "recipient_infos": cms.RecipientInfos(infos),
            "encrypted_content_info": enveloped["encrypted_content_info"],
        }
    )
    return cms.ContentInfo({"content_type": "enveloped_data", "content": rebuilt}).dump(force=True)


def subject_key_id(certificate: x509.Certificate) -> bytes:
    return certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


def request(keys, cn: str) -> Enrollment:
    key = keys.new()
    return new_enrollment(key, make_csr(key, cn, CHALLENGE))


def send(service: ScepService, enrollment: Enrollment, envelope: bytes, ra: x509.Certificate) -> Result:
    """Sign a PKCSReq around envelope, and read the CertRep (which the signing RA must have signed)."""
    attributes = msg.request_attributes(enrollment.message_type, enrollment.transaction_id, enrollment.sender_nonce)
    der = msg.sign_message(enrollment.signer, DEFAULT_OPTIONS.digest, attributes, envelope)
    return read_reply(service.pki_operation(der).der, enrollment, ra)


def served_pair(service: ScepService) -> tuple[x509.Certificate, x509.Certificate]:
    certificates = served(service)
    (ca,) = [c for c in certificates if is_ca(c)]
    (ra,) = [c for c in certificates if not is_ca(c)]
    return ra, ca


def csr_der(enrollment: Enrollment) -> bytes:
    return enrollment.csr.public_bytes(serialization.Encoding.DER)


def test_getcacert_serves_the_ra_the_ca_and_an_encryption_only_twin_of_the_ra(service):
    ra, ca, encryption = roles(service)
    assert len(served(service)) == 3
    assert key_usage(ra).digital_signature and key_usage(ra).key_encipherment  # what Apple requires of the RA
    assert key_usage(encryption).key_encipherment and not key_usage(encryption).content_commitment
    assert encryption.public_key() == ra.public_key() and encryption.subject == ra.subject
    encryption.verify_directly_issued_by(ca)
    assert encryption.serial_number != ra.serial_number
    # clients that take the first non-CA certificate as the RA still find the signing RA
    assert [c for c in served(service) if not is_ca(c)][0] == ra


def test_request_encrypted_to_the_encryption_certificate_is_issued(service, keys):
    ra, ca, encryption = roles(service)
    enrollment = request(keys, "ndes-style")
    result = send(service, enrollment, envelope_to(csr_der(enrollment), encryption), ra)
    assert result.status is PkiStatus.SUCCESS
    result.certificate.verify_directly_issued_by(ca)


@pytest.mark.parametrize("role", [0, 2], ids=["ra", "encryption"])
def test_request_addressed_by_subject_key_identifier_is_issued(service, keys, role):
    ra = roles(service)[0]
    recipient = roles(service)[role]
    enrollment = request(keys, "by-key-id")
    key_ids = {recipient.serial_number: subject_key_id(recipient)}
    envelope = addressed_by_key_identifier(envelope_to(csr_der(enrollment), recipient), key_ids)
    assert send(service, enrollment, envelope, ra).status is PkiStatus.SUCCESS


def test_request_encrypted_to_the_ca_and_the_ra_is_issued(service, keys):
    """micromdm's scepclient encrypts to every certificate of GetCACert, the CA among them."""
    ra, ca, encryption = roles(service)
    enrollment = request(keys, "everyone")
    envelope = envelope_to(csr_der(enrollment), ca, ra, encryption)
    assert send(service, enrollment, envelope, ra).status is PkiStatus.SUCCESS


def test_request_encrypted_to_a_certificate_not_ours_is_a_signed_failure_that_says_so(service, keys, caplog):
    """What NDES-style clients did before the encryption certificate: encrypt to the CA alone."""
    ra, ca, _ = roles(service)
    enrollment = request(keys, "to-the-ca")
    with caplog.at_level(logging.INFO, logger="scep.core.service"):
        result = send(service, enrollment, envelope_to(csr_der(enrollment), ca), ra)
    assert result.status is PkiStatus.FAILURE and result.fail_info is FailInfo.BAD_MESSAGE_CHECK
    assert "not ours" in (result.fail_info_text or "")
    assert any("not ours" in record.getMessage() and enrollment.transaction_id in record.getMessage()
               for record in caplog.records)


def test_request_addressed_by_an_unknown_key_identifier_is_refused(service, keys):
    ra, _, _ = roles(service)
    enrollment = request(keys, "unknown-key-id")
    envelope = addressed_by_key_identifier(envelope_to(csr_der(enrollment), ra), {ra.serial_number: b"\x01" * 20})
    result = send(service, enrollment, envelope, ra)
    assert result.status is PkiStatus.FAILURE and result.fail_info is FailInfo.BAD_MESSAGE_CHECK


def test_an_ra_without_encryption_certificate_keeps_working(tmp_path: Path, keys):
    """A data directory from before encryption certificates: RA and CA are served, the RA still decrypts."""
    init_root(LocalHome(tmp_path), CaOptions())
    (tmp_path / "ra.encryption.pem").unlink()
    home = LocalHome(tmp_path)
    service = ScepService(home, SqliteStore(tmp_path / "db"), StaticValidator(CHALLENGE), ServiceOptions())
    ra, _ = served_pair(service)
    assert key_usage(ra).digital_signature and len(served(service)) == 2
    enrollment = request(keys, "legacy-layout")
    assert send(service, enrollment, envelope_to(csr_der(enrollment), ra), ra).status is PkiStatus.SUCCESS
