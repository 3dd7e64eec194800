"""Message parsing and building: every algorithm round trips; tampering and garbage are caught."""

from __future__ import annotations

import base64
import os
from datetime import datetime, timedelta, timezone

import pytest
from asn1crypto import cms
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from scep.core import message as msg
from scep.core.protocol import ContentCipher, FailInfo, MessageType, PkiStatus
from scep.http.web import decode_message_param
from scep.keys import KeyTransport
from scep.keys.local import LocalKey
from scep.tools.client import RequestOptions, build_request, make_csr, new_enrollment, self_signed
from tests.scep_helpers import ra_and_ca


@pytest.fixture(scope="module")
def device(keys):
    key = keys.new()
    csr = make_csr(key, "unit", "pw")
    return key, csr


@pytest.mark.parametrize("cipher", list(ContentCipher))
@pytest.mark.parametrize("transport", list(KeyTransport))
def test_envelope_round_trip(device, cipher, transport):
    key, csr = device
    enrollment = new_enrollment(key, csr)
    sealed = msg.seal_envelope(b"secret payload", enrollment.signer.certificate, cipher, transport)
    envelope = msg.read_envelope(sealed, enrollment.signer.certificate, allow_legacy=True)
    assert (envelope.cipher, envelope.transport) == (cipher, transport)
    assert msg.open_envelope(envelope, enrollment.signer) == b"secret payload"


@pytest.mark.parametrize("curve", [ec.SECP256R1, ec.SECP384R1, ec.SECP521R1])
@pytest.mark.parametrize("cipher", sorted(set(ContentCipher) - {ContentCipher.DES}))
def test_key_agreement_envelope_round_trip(curve, cipher):
    key = ec.generate_private_key(curve())
    certificate = self_signed(key, x509.Name.from_rfc4514_string("CN=ec"))
    sealed = msg.seal_envelope(b"secret payload", certificate, cipher)
    [recipient] = cms.ContentInfo.load(sealed)["content"]["recipient_infos"]
    assert recipient.name == "kari" and recipient.chosen["version"].native == "v3"
    assert msg.open_key_agreement_envelope(sealed, key) == b"secret payload"
    other = ec.generate_private_key(curve())
    with pytest.raises(msg.MessageError):
        msg.open_key_agreement_envelope(sealed, other)


def _certificate_for(key) -> x509.Certificate:
    name = x509.Name.from_rfc4514_string("CN=no-envelope")
    now = datetime.now(timezone.utc)
    builder = x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
    builder = builder.serial_number(1).not_valid_before(now).not_valid_after(now + timedelta(days=1))
    return builder.sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256())


@pytest.mark.parametrize(
    "make_key,cipher",
    [
        (ed25519.Ed25519PrivateKey.generate, ContentCipher.AES128),
        (lambda: ec.generate_private_key(ec.SECP256K1()), ContentCipher.AES128),
        (lambda: ec.generate_private_key(ec.SECP256R1()), ContentCipher.DES),  # AES key wrap needs 16 bytes
    ],
    ids=["ed25519", "secp256k1", "p256-single-des"],
)
def test_keys_that_receive_no_envelope_are_bad_alg(make_key, cipher):
    certificate = _certificate_for(make_key())
    with pytest.raises(msg.MessageError) as caught:
        msg.envelope_recipient_key(certificate, cipher)
    assert caught.value.fail_info is FailInfo.BAD_ALG
    with pytest.raises(msg.MessageError):
        msg.seal_envelope(b"x", certificate, cipher)


@pytest.mark.parametrize("digest", ["sha1", "sha256", "sha384", "sha512"])
def test_signed_message_round_trip(device, digest):
    key, csr = device
    enrollment = new_enrollment(key, csr)
    attributes = msg.request_attributes(MessageType.PKCS_REQ, "TX-1", b"n" * 16)
    der = msg.sign_message(enrollment.signer, digest, attributes, b"content")
    parsed = msg.parse_pki_message(der)
    assert parsed.message_type == MessageType.PKCS_REQ
    assert parsed.transaction_id == "TX-1"
    assert parsed.sender_nonce == b"n" * 16
    assert parsed.digest_name == digest
    assert parsed.content == b"content"
    assert parsed.signer_certificate == enrollment.signer.certificate


def test_cert_rep_attributes_round_trip(device):
    key, csr = device
    signer = new_enrollment(key, csr).signer
    attributes = msg.cert_rep_attributes(PkiStatus.FAILURE, "TX", b"r" * 16, FailInfo.BAD_TIME, "too late")
    parsed = msg.parse_pki_message(msg.sign_message(signer, "sha256", attributes, None))
    assert parsed.pki_status is PkiStatus.FAILURE
    assert parsed.fail_info is FailInfo.BAD_TIME
    assert parsed.fail_info_text == "too late"
    assert parsed.recipient_nonce == b"r" * 16
    assert len(parsed.sender_nonce) == 16 and parsed.content is None


def _request(service, device) -> bytes:
    key, csr = device
    ra, _ = ra_and_ca(service)
    return build_request(new_enrollment(key, csr), ra, RequestOptions())


def test_tampered_signature_gets_a_signed_bad_message_check(service, device):
    der = bytearray(_request(service, device))
    der[-5] ^= 0x01  # inside the signature value, the last field of the message
    with pytest.raises(msg.MessageError) as caught:
        msg.parse_pki_message(bytes(der))
    assert caught.value.fail_info is FailInfo.BAD_MESSAGE_CHECK
    reply = service.pki_operation(bytes(der))
    assert reply.status is PkiStatus.FAILURE and reply.fail_info is FailInfo.BAD_MESSAGE_CHECK


def test_tampered_content_breaks_the_message_digest(service, device):
    info = cms.ContentInfo.load(_request(service, device))
    content = bytearray(info["content"]["encap_content_info"]["content"].native)
    content[-3] ^= 0xFF
    info["content"]["encap_content_info"]["content"] = bytes(content)
    with pytest.raises(msg.MessageError) as caught:
        msg.parse_pki_message(info.dump(force=True))
    assert "messageDigest" in caught.value.reason


def test_truncated_and_garbage_messages_are_malformed(service, device):
    der = _request(service, device)
    for broken in (der[: len(der) // 2], der[:10], b"", os.urandom(200), b"\x30\x80" * 5000, b"\x30\x03\x02\x01"):
        with pytest.raises(msg.MalformedMessage):
            service.pki_operation(broken)


def test_deeply_nested_message_is_malformed_quickly(service):
    nested = b""
    for _ in range(3000):
        nested = b"\x30" + _length(len(nested)) + nested
    with pytest.raises(msg.MalformedMessage):
        service.pki_operation(nested)


def test_envelope_for_another_recipient_fails_cleanly(service, device, keys):
    key, csr = device
    ra, _ = ra_and_ca(service)
    stranger = LocalKey(keys.new(), new_enrollment(key, csr).signer.certificate)
    sealed = msg.seal_envelope(b"x", ra, ContentCipher.AES128)
    with pytest.raises(msg.MessageError) as caught:
        msg.open_envelope(msg.read_envelope(sealed, ra), stranger)
    assert caught.value.fail_info is FailInfo.BAD_MESSAGE_CHECK


def test_single_des_refused_by_default(device):
    key, csr = device
    recipient = new_enrollment(key, csr).signer.certificate
    sealed = msg.seal_envelope(b"x", recipient, ContentCipher.DES)
    with pytest.raises(msg.MessageError) as caught:
        msg.read_envelope(sealed, recipient)
    assert caught.value.fail_info is FailInfo.BAD_ALG


def test_decode_message_param_tolerates_real_clients():
    data = os.urandom(300)
    standard = base64.b64encode(data).decode()
    assert decode_message_param(standard) == data
    assert decode_message_param(standard.replace("+", " ")) == data  # Apple: '+' unescaped
    folded = "\n".join(standard[i : i + 64] for i in range(0, len(standard), 64))
    assert decode_message_param(folded) == data  # strongSwan, Cisco: %0A line breaks
    assert decode_message_param(base64.urlsafe_b64encode(data).decode().rstrip("=")) == data
    assert decode_message_param("!!!not base64!!!") is None


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    encoded = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(encoded)]) + encoded
