"""A RecipientInfo names our RA by issuer and serial: an issuer encoded byte for byte as in our certificate is
matched without RFC 5280 name matching (the fast path every enrollment takes), and one encoded differently is still
matched by RFC 5280's rules (case and white space folded), while another name is refused."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from asn1crypto import cms
from asn1crypto.x509 import Name as Asn1Name
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from scep.core import message as msg
from scep.core.protocol import ContentCipher, FailInfo


@pytest.fixture(scope="module")
def ra() -> x509.Certificate:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Bench RA")])  # a UTF8String
    now = datetime.now(timezone.utc)
    builder = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + timedelta(days=1))
    )  # fmt: skip
    return builder.sign(key, hashes.SHA256())


def with_issuer(envelope: bytes, issuer: Asn1Name) -> bytes:
    info = cms.ContentInfo.load(envelope)
    rid = info["content"]["recipient_infos"][0].chosen["rid"].chosen
    rid["issuer"] = issuer
    return info.dump(force=True)


def test_an_issuer_encoded_as_in_our_certificate_names_us(ra):
    envelope = msg.seal_envelope(b"content", ra, ContentCipher.AES128)
    assert msg.read_envelope(envelope, [ra]).cipher is ContentCipher.AES128


def test_an_issuer_encoded_differently_names_us_by_rfc5280_matching(ra):
    printable = Asn1Name.build({"common_name": "bench   RA"}, use_printable=True)  # PrintableString, folded case
    envelope = with_issuer(msg.seal_envelope(b"content", ra, ContentCipher.AES128), printable)
    assert printable.dump() != ra.issuer.public_bytes()
    assert msg.read_envelope(envelope, [ra]).cipher is ContentCipher.AES128


def test_another_issuer_does_not_name_us(ra):
    other = Asn1Name.build({"common_name": "Another RA"})
    envelope = with_issuer(msg.seal_envelope(b"content", ra, ContentCipher.AES128), other)
    with pytest.raises(msg.MessageError) as refused:
        msg.read_envelope(envelope, [ra])
    assert refused.value.fail_info is FailInfo.BAD_MESSAGE_CHECK
