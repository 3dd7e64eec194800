"""Message parsing and building: every algorithm round trips; tampering and garbage are caught."""

from __future__ import annotations

import base64
import os

import pytest
from asn1crypto import cms

from scep import message as msg
from scep.client import RequestOptions, build_request, make_csr, new_enrollment
from scep.keys import KeyTransport
from scep.keys.local import LocalKey
from scep.protocol import ContentCipher, FailInfo, MessageType, PkiStatus
from scep.web import decode_message_param
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
