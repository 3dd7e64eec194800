"""SCEP messages: PKIMessage and CertRep as CMS SignedData around EnvelopedData (RFC 8894 section 3).

Framework-free and custody-agnostic: signing and key-transport decryption go through `KeyHandle`s, so the same
code serves local PEM keys, Key Vault keys and the project's own client.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from asn1crypto import algos, cms, core
from asn1crypto import parser as asn1_parser
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.serialization import Encoding

from scep.keys import KeyHandle, KeyTransport
from scep.protocol import ContentCipher, FailInfo, MessageType, PkiStatus

OID_MESSAGE_TYPE = "2.16.840.1.113733.1.9.2"
OID_PKI_STATUS = "2.16.840.1.113733.1.9.3"
OID_FAIL_INFO = "2.16.840.1.113733.1.9.4"
OID_SENDER_NONCE = "2.16.840.1.113733.1.9.5"
OID_RECIPIENT_NONCE = "2.16.840.1.113733.1.9.6"
OID_TRANSACTION_ID = "2.16.840.1.113733.1.9.7"
OID_FAIL_INFO_TEXT = "1.3.6.1.5.5.7.24.1"

HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
LEGACY_HASHES: dict[str, type[hashes.HashAlgorithm]] = {"md5": hashes.MD5}
LEGACY_CIPHERS = frozenset({ContentCipher.DES})

_CIPHER_KEY_BYTES = {
    ContentCipher.AES128: 16,
    ContentCipher.AES192: 24,
    ContentCipher.AES256: 32,
    ContentCipher.DES3: 24,
    ContentCipher.DES: 8,
}


class MalformedMessage(ValueError):
    """Too broken to answer with a CertRep: the HTTP layer answers 400 with this text."""


class MessageError(Exception):
    """A problem that deserves a signed CertRep FAILURE with this failInfo."""

    def __init__(self, fail_info: FailInfo, reason: str):
        super().__init__(reason)
        self.fail_info = fail_info
        self.reason = reason
        self.attributes: ScepAttributes | None = None  # set when the message was readable enough to answer


@dataclass(frozen=True)
class Envelope:
    """The encrypted content of a PKIMessage, not yet decrypted."""

    der: bytes
    cipher: ContentCipher
    transport: KeyTransport


@dataclass(frozen=True)
class PkiMessage:
    """A parsed, signature-checked SCEP message (request or CertRep)."""

    message_type: int
    transaction_id: str
    sender_nonce: bytes
    digest_name: str
    signer_certificate: x509.Certificate
    content: bytes | None  # the encapsulated pkcsPKIEnvelope (DER), if any
    pki_status: PkiStatus | None = None
    fail_info: FailInfo | None = None
    fail_info_text: str | None = None
    recipient_nonce: bytes | None = None
    certificates: tuple[x509.Certificate, ...] = field(default=())


# --- parsing ---------------------------------------------------------------------------------------------


def parse_pki_message(der: bytes, allow_legacy: bool = False) -> PkiMessage:
    """Parse a PKIMessage and check its signature.

    Raises MalformedMessage when the message cannot be answered at all, and MessageError (its `attributes`
    say whom to answer) when it deserves a FAILURE.
    """
    signed_data, signer_info = _load_signed_data(der)
    attributes = _signed_attributes(signer_info)
    partial = _read_scep_attributes(attributes)
    try:
        digest_name = _digest_name(signer_info, allow_legacy)
        certificates = _certificates(signed_data)
        signer = _find_signer(signer_info, certificates)
        content = _encapsulated_content(signed_data)
        _verify_signer_info(signer_info, signer, digest_name, content)
    except MessageError as error:
        error.attributes = partial
        raise
    return PkiMessage(
        message_type=partial.message_type,
        transaction_id=partial.transaction_id,
        sender_nonce=partial.sender_nonce,
        digest_name=digest_name,
        signer_certificate=signer,
        content=content,
        pki_status=partial.pki_status,
        fail_info=partial.fail_info,
        fail_info_text=partial.fail_info_text,
        recipient_nonce=partial.recipient_nonce,
        certificates=tuple(certificates),
    )


def read_signed_content(der: bytes) -> tuple[x509.Certificate, bytes | None]:
    """Verify a SignedData without SCEP attributes (GetNextCACert) and return its signer and content."""
    signed_data, signer_info = _load_signed_data(der)
    try:
        digest_name = _digest_name(signer_info, allow_legacy=False)
        signer = _find_signer(signer_info, _certificates(signed_data))
        content = _encapsulated_content(signed_data)
        _verify_signer_info(signer_info, signer, digest_name, content)
    except MessageError as error:
        raise MalformedMessage(error.reason) from None
    return signer, content


@dataclass(frozen=True)
class ScepAttributes:
    message_type: int
    transaction_id: str
    sender_nonce: bytes
    pki_status: PkiStatus | None
    fail_info: FailInfo | None
    fail_info_text: str | None
    recipient_nonce: bytes | None


def _load_signed_data(der: bytes) -> tuple[cms.SignedData, cms.SignerInfo]:
    try:
        info = cms.ContentInfo.load(der, strict=True)
        if info["content_type"].native != "signed_data":
            raise MalformedMessage("not a CMS SignedData")
        signed_data = info["content"]
        signer_infos = signed_data["signer_infos"]
        if len(signer_infos) != 1:
            raise MalformedMessage("a PKIMessage has exactly one signer")
        return signed_data, signer_infos[0]
    except MalformedMessage:
        raise
    except Exception as error:  # asn1crypto raises many types on bad DER
        raise MalformedMessage(f"not a valid PKIMessage: {_short(error)}") from None


def _signed_attributes(signer_info: cms.SignerInfo) -> dict[str, core.Asn1Value]:
    try:
        found: dict[str, core.Asn1Value] = {}
        for attribute in signer_info["signed_attrs"]:
            values = attribute["values"]
            if len(values) != 1:
                raise MalformedMessage(f"attribute {attribute['type'].dotted} must have one value")
            found[attribute["type"].dotted] = values[0]
        return found
    except MalformedMessage:
        raise
    except Exception as error:
        raise MalformedMessage(f"unreadable signed attributes: {_short(error)}") from None


def _read_scep_attributes(attributes: dict[str, core.Asn1Value]) -> ScepAttributes:
    try:
        message_type = int(_text(attributes, OID_MESSAGE_TYPE))
        transaction_id = _text(attributes, OID_TRANSACTION_ID)
        sender_nonce = _octets(attributes, OID_SENDER_NONCE)
        status_text = _optional_text(attributes, OID_PKI_STATUS)
        fail_text = _optional_text(attributes, OID_FAIL_INFO)
        recipient_nonce = _octets(attributes, OID_RECIPIENT_NONCE) if OID_RECIPIENT_NONCE in attributes else None
        fail_info_text = _optional_text(attributes, OID_FAIL_INFO_TEXT)
        return ScepAttributes(
            message_type=message_type,
            transaction_id=transaction_id,
            sender_nonce=sender_nonce,
            pki_status=PkiStatus(int(status_text)) if status_text is not None else None,
            fail_info=FailInfo(int(fail_text)) if fail_text is not None else None,
            fail_info_text=fail_info_text,
            recipient_nonce=recipient_nonce,
        )
    except MalformedMessage:
        raise
    except Exception as error:
        raise MalformedMessage(f"bad SCEP attributes: {_short(error)}") from None


def _text(attributes: dict[str, core.Asn1Value], oid: str) -> str:
    value = _optional_text(attributes, oid)
    if value is None:
        raise MalformedMessage(f"missing SCEP attribute {oid}")
    return value


def _optional_text(attributes: dict[str, core.Asn1Value], oid: str) -> str | None:
    if oid not in attributes:
        return None
    value = _parsed(attributes[oid])
    if not isinstance(value, core.AbstractString):
        raise MalformedMessage(f"SCEP attribute {oid} must be a string")
    text = value.native
    if not text or len(text) > 256:
        raise MalformedMessage(f"SCEP attribute {oid} has a bad length")
    return text


def _octets(attributes: dict[str, core.Asn1Value], oid: str) -> bytes:
    if oid not in attributes:
        raise MalformedMessage(f"missing SCEP attribute {oid}")
    value = _parsed(attributes[oid])
    if not isinstance(value, core.OctetString):
        raise MalformedMessage(f"SCEP attribute {oid} must be an OCTET STRING")
    nonce = value.native
    if not 8 <= len(nonce) <= 64:
        raise MalformedMessage(f"SCEP nonce {oid} has a bad length")
    return nonce


def _parsed(value: core.Asn1Value) -> core.Asn1Value:
    return value.parse() if isinstance(value, core.Any) else value


def _digest_name(signer_info: cms.SignerInfo, allow_legacy: bool) -> str:
    name = signer_info["digest_algorithm"]["algorithm"].native
    if name in HASHES or (allow_legacy and name in LEGACY_HASHES):
        return name
    raise MessageError(FailInfo.BAD_ALG, f"digest algorithm {name} is not accepted")


def _certificates(signed_data: cms.SignedData) -> list[x509.Certificate]:
    found = []
    for choice in signed_data["certificates"] or []:
        if choice.name == "certificate":
            try:
                found.append(x509.load_der_x509_certificate(choice.chosen.dump()))
            except ValueError:
                raise MessageError(FailInfo.BAD_MESSAGE_CHECK, "unreadable certificate in message") from None
    return found


def _find_signer(signer_info: cms.SignerInfo, certificates: list[x509.Certificate]) -> x509.Certificate:
    sid = signer_info["sid"]
    for certificate in certificates:
        if sid.name == "issuer_and_serial_number":
            issuer = asn1_x509.Name.load(certificate.issuer.public_bytes())
            if sid.chosen["serial_number"].native == certificate.serial_number and sid.chosen["issuer"] == issuer:
                return certificate
        elif sid.chosen.native == _subject_key_id(certificate):
            return certificate
    raise MessageError(FailInfo.BAD_MESSAGE_CHECK, "the signer's certificate is not in the message")


def _subject_key_id(certificate: x509.Certificate) -> bytes:
    try:
        return certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(certificate.public_key()).digest


def _encapsulated_content(signed_data: cms.SignedData) -> bytes | None:
    encap = signed_data["encap_content_info"]
    if encap["content_type"].native != "data":
        raise MessageError(FailInfo.BAD_MESSAGE_CHECK, "encapsulated content is not id-data")
    content = encap["content"]
    if isinstance(content, core.Void):
        return None
    return octets(content)


def _verify_signer_info(
    signer_info: cms.SignerInfo, signer: x509.Certificate, digest_name: str, content: bytes | None
) -> None:
    hash_class = HASHES.get(digest_name) or LEGACY_HASHES[digest_name]
    attributes = {attr["type"].dotted: attr["values"][0] for attr in signer_info["signed_attrs"]}
    expected_digest = attributes.get("1.2.840.113549.1.9.4")
    if expected_digest is None:
        raise MessageError(FailInfo.BAD_MESSAGE_CHECK, "no messageDigest attribute")
    actual = _hash(hash_class, content or b"")
    expected = _parsed(expected_digest)
    if not isinstance(expected, core.OctetString) or not _same(expected.native, actual):
        raise MessageError(FailInfo.BAD_MESSAGE_CHECK, "messageDigest does not match the content")
    signed_bytes = _as_set(signer_info["signed_attrs"])
    signature = signer_info["signature"].native
    try:
        _verify(signer.public_key(), signature, signed_bytes, signer_info["signature_algorithm"], hash_class)
    except (InvalidSignature, ValueError, TypeError):
        raise MessageError(FailInfo.BAD_MESSAGE_CHECK, "the message signature does not verify") from None


def verify_signature(public_key, signature: bytes, data: bytes, algorithm: algos.SignedDigestAlgorithm) -> None:
    """Verify an X.509-style signature (hash named by the algorithm); raises InvalidSignature or ValueError."""
    hash_name = algorithm.hash_algo
    if hash_name not in HASHES:
        raise ValueError(f"signature hash {hash_name} is not accepted")
    _verify(public_key, signature, data, algorithm, HASHES[hash_name])


def _verify(public_key, signature: bytes, data: bytes, algorithm: algos.SignedDigestAlgorithm, hash_class) -> None:
    scheme = algorithm.signature_algo
    if isinstance(public_key, rsa.RSAPublicKey):
        if scheme == "rsassa_pss":
            params = algorithm["parameters"]
            pss_hash = HASHES[params["hash_algorithm"]["algorithm"].native]()
            pad = asym_padding.PSS(asym_padding.MGF1(pss_hash), params["salt_length"].native)
            public_key.verify(signature, data, pad, pss_hash)
            return
        if scheme != "rsassa_pkcs1v15":
            raise ValueError("signature algorithm does not fit an RSA key")
        public_key.verify(signature, data, asym_padding.PKCS1v15(), hash_class())
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        if scheme != "ecdsa":
            raise ValueError("signature algorithm does not fit an EC key")
        public_key.verify(signature, data, ec.ECDSA(hash_class()))
    else:
        raise ValueError("unsupported signer key type")


def _as_set(attributes: cms.CMSAttributes) -> bytes:
    encoded = attributes.dump()
    return b"\x31" + encoded[1:]  # signed over as SET OF, sent as [0] IMPLICIT


# --- envelopes -------------------------------------------------------------------------------------------


def read_envelope(der: bytes, recipient: x509.Certificate, allow_legacy: bool = False) -> Envelope:
    """Identify the cipher and our key transport in an EnvelopedData, refusing legacy algorithms by default.

    recipient is our certificate: clients may encrypt to several (micromdm adds the CA beside the RA)."""
    try:
        info = cms.ContentInfo.load(der, strict=True)
        if info["content_type"].native != "enveloped_data":
            raise MessageError(FailInfo.BAD_REQUEST, "the message content is not an EnvelopedData")
        enveloped = info["content"]
        algorithm = enveloped["encrypted_content_info"]["content_encryption_algorithm"]
        recipient_info = _key_trans_recipient(enveloped, recipient)
        cipher = _content_cipher(algorithm)
        transport = _key_transport(recipient_info["key_encryption_algorithm"])
    except MessageError:
        raise
    except Exception as error:
        raise MessageError(FailInfo.BAD_REQUEST, f"unreadable EnvelopedData: {_short(error)}") from None
    if cipher in LEGACY_CIPHERS and not allow_legacy:
        raise MessageError(FailInfo.BAD_ALG, "single DES is refused (enable SCEP_ALLOW_DES for legacy clients)")
    return Envelope(der=der, cipher=cipher, transport=transport)


def open_envelope(envelope: Envelope, recipient: KeyHandle) -> bytes:
    """Decrypt an EnvelopedData with the recipient's key (custody does the RSA part)."""
    enveloped = cms.ContentInfo.load(envelope.der)["content"]
    recipient_info = _key_trans_recipient(enveloped, recipient.certificate)
    encrypted_content = enveloped["encrypted_content_info"]
    algorithm = encrypted_content["content_encryption_algorithm"]
    ciphertext = _encrypted_content(encrypted_content)
    if not ciphertext:
        raise MessageError(FailInfo.BAD_REQUEST, "the EnvelopedData has no content")
    content_key = recipient.decrypt(recipient_info["encrypted_key"].native, envelope.transport)
    if len(content_key) != _CIPHER_KEY_BYTES[envelope.cipher]:
        raise MessageError(FailInfo.BAD_MESSAGE_CHECK, "could not decrypt the content-encryption key")
    try:
        return _cbc_decrypt(envelope.cipher, content_key, algorithm.encryption_iv, ciphertext)
    except ValueError:
        raise MessageError(FailInfo.BAD_MESSAGE_CHECK, "could not decrypt the message content") from None


def seal_envelope(
    content: bytes,
    recipient: x509.Certificate,
    cipher: ContentCipher,
    transport: KeyTransport = KeyTransport.RSA_PKCS1V15,
) -> bytes:
    """Encrypt content to a recipient certificate's RSA key as a CMS EnvelopedData (DER ContentInfo)."""
    public_key = recipient.public_key()
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise MessageError(FailInfo.BAD_ALG, "the recipient certificate has no RSA key for key transport")
    content_key = os.urandom(_CIPHER_KEY_BYTES[cipher])
    iv = os.urandom(8 if cipher in (ContentCipher.DES, ContentCipher.DES3) else 16)
    ciphertext = _cbc_encrypt(cipher, content_key, iv, content)
    encrypted_key = public_key.encrypt(content_key, _rsa_padding(transport))
    recipient_info = cms.KeyTransRecipientInfo(
        {
            "version": "v0",
            "rid": cms.RecipientIdentifier(name="issuer_and_serial_number", value=_issuer_and_serial(recipient)),
            "key_encryption_algorithm": _key_transport_algorithm(transport),
            "encrypted_key": encrypted_key,
        }
    )
    enveloped = cms.EnvelopedData(
        {
            "version": "v0",
            "recipient_infos": [cms.RecipientInfo(name="ktri", value=recipient_info)],
            "encrypted_content_info": {
                "content_type": "data",
                "content_encryption_algorithm": {"algorithm": cipher.value, "parameters": core.OctetString(iv)},
                "encrypted_content": ciphertext,
            },
        }
    )
    return cms.ContentInfo({"content_type": "enveloped_data", "content": enveloped}).dump()


def _key_trans_recipient(enveloped: cms.EnvelopedData, ours: x509.Certificate) -> cms.KeyTransRecipientInfo:
    """Our key-transport RecipientInfo, by issuer and serial or key identifier; else the only one there is."""
    candidates = [r.chosen for r in enveloped["recipient_infos"] if r.name == "ktri"]
    if not candidates:
        raise MessageError(FailInfo.BAD_ALG, "no key-transport recipient (only RSA key transport is supported)")
    for candidate in candidates:
        if _identifies(candidate["rid"], ours):
            return candidate
    return candidates[0]


def _identifies(identifier: cms.RecipientIdentifier, certificate: x509.Certificate) -> bool:
    if identifier.name == "issuer_and_serial_number":
        chosen = identifier.chosen
        return chosen["serial_number"].native == certificate.serial_number and chosen["issuer"].dump() == (
            certificate.issuer.public_bytes()
        )
    return identifier.chosen.native == _subject_key_id(certificate)


def _encrypted_content(info: cms.EncryptedContentInfo) -> bytes:
    """encryptedContent ([0] IMPLICIT OCTET STRING), read raw: asn1crypto refuses the constructed form."""
    data, offset = info.contents or b"", 0
    while offset < len(data):
        class_, method, tag, header, contents, trailer = asn1_parser.parse(data[offset:])
        if (class_, tag) == (2, 0):
            return contents if method == 0 else _join_chunks(contents, depth=0)
        offset += len(header) + len(contents) + len(trailer)
    return b""


def octets(value: core.Asn1Value) -> bytes:
    """The bytes of an OCTET STRING, primitive or constructed (BER chunks, as Go's pkcs7 sends them)."""
    if value.method == 0:
        return value.contents or b""
    return _join_chunks(value.contents or b"", depth=0)


def _join_chunks(data: bytes, depth: int) -> bytes:
    if depth > 8:
        raise ValueError("OCTET STRING chunks nested too deeply")
    chunks, offset = [], 0
    while offset < len(data):
        parsed = asn1_parser.parse(data[offset:])
        class_, method, tag, header, contents, trailer = parsed
        if (class_, tag) != (0, 4):
            if (class_, method, tag, contents) == (0, 0, 0, b""):  # end-of-contents
                break
            raise ValueError("a constructed OCTET STRING holds something else")
        chunks.append(contents if method == 0 else _join_chunks(contents, depth + 1))
        offset += len(header) + len(contents) + len(trailer)
    return b"".join(chunks)


def _content_cipher(algorithm: algos.EncryptionAlgorithm) -> ContentCipher:
    name = algorithm["algorithm"].native
    try:
        return ContentCipher(name)
    except ValueError:
        raise MessageError(FailInfo.BAD_ALG, f"content encryption {name} is not supported") from None


def _key_transport(algorithm: cms.KeyEncryptionAlgorithm) -> KeyTransport:
    name = algorithm["algorithm"].native
    if name == "rsaes_pkcs1v15":
        return KeyTransport.RSA_PKCS1V15
    if name == "rsaes_oaep":
        params = algorithm["parameters"]
        oaep_hash = params["hash_algorithm"]["algorithm"].native
        mgf_hash = params["mask_gen_algorithm"]["parameters"]["algorithm"].native
        if oaep_hash == mgf_hash == "sha1":
            return KeyTransport.RSA_OAEP_SHA1
        if oaep_hash == mgf_hash == "sha256":
            return KeyTransport.RSA_OAEP_SHA256
    raise MessageError(FailInfo.BAD_ALG, f"key transport {name} is not supported")


def _key_transport_algorithm(transport: KeyTransport) -> cms.KeyEncryptionAlgorithm:
    if transport is KeyTransport.RSA_PKCS1V15:
        return cms.KeyEncryptionAlgorithm({"algorithm": "rsaes_pkcs1v15"})
    digest = "sha1" if transport is KeyTransport.RSA_OAEP_SHA1 else "sha256"
    return cms.KeyEncryptionAlgorithm(
        {
            "algorithm": "rsaes_oaep",
            "parameters": {
                "hash_algorithm": {"algorithm": digest},
                "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": digest}},
            },
        }
    )


def _rsa_padding(transport: KeyTransport) -> asym_padding.AsymmetricPadding:
    if transport is KeyTransport.RSA_PKCS1V15:
        return asym_padding.PKCS1v15()
    digest = hashes.SHA1() if transport is KeyTransport.RSA_OAEP_SHA1 else hashes.SHA256()
    return asym_padding.OAEP(asym_padding.MGF1(digest), digest, None)


def rsa_decrypt(private_key: rsa.RSAPrivateKey, ciphertext: bytes, transport: KeyTransport) -> bytes:
    """RSA key-transport decryption for in-process keys (local custody and the client)."""
    return private_key.decrypt(ciphertext, _rsa_padding(transport))


def _block_cipher(cipher: ContentCipher, key: bytes):
    if cipher in (ContentCipher.DES, ContentCipher.DES3):
        return TripleDES(key * 3 if len(key) == 8 else key)
    return algorithms.AES(key)


def _cbc_encrypt(cipher: ContentCipher, key: bytes, iv: bytes, data: bytes) -> bytes:
    block = _block_cipher(cipher, key)
    padder = padding.PKCS7(block.block_size).padder()
    encryptor = Cipher(block, modes.CBC(iv)).encryptor()
    return encryptor.update(padder.update(data) + padder.finalize()) + encryptor.finalize()


def _cbc_decrypt(cipher: ContentCipher, key: bytes, iv: bytes, data: bytes) -> bytes:
    block = _block_cipher(cipher, key)
    if len(iv) * 8 != block.block_size or len(data) % len(iv):
        raise ValueError("bad IV or ciphertext length")
    decryptor = Cipher(block, modes.CBC(iv)).decryptor()
    padded = decryptor.update(data) + decryptor.finalize()
    unpadder = padding.PKCS7(block.block_size).unpadder()
    return unpadder.update(padded) + unpadder.finalize()


# --- building --------------------------------------------------------------------------------------------


def sign_message(
    signer: KeyHandle,
    digest_name: str,
    scep_attributes: Iterable[cms.CMSAttribute],
    content: bytes | None,
    extra_certificates: Iterable[x509.Certificate] = (),
) -> bytes:
    """Build a SignedData (DER ContentInfo) over `content` with SCEP signed attributes, signed by custody."""
    hash_class = HASHES.get(digest_name) or LEGACY_HASHES[digest_name]
    attributes = cms.CMSAttributes(
        [
            cms.CMSAttribute({"type": "content_type", "values": ["data"]}),
            cms.CMSAttribute({"type": "signing_time", "values": [cms.Time(name="utc_time", value=_now())]}),
            cms.CMSAttribute({"type": "message_digest", "values": [_hash(hash_class, content or b"")]}),
            *scep_attributes,
        ]
    )
    digest = _hash(hash_class, _as_set(attributes))
    signature = signer.sign_digest(digest, digest_name)
    signer_cert = signer.certificate
    signer_info = cms.SignerInfo(
        {
            "version": "v1",
            "sid": cms.SignerIdentifier(name="issuer_and_serial_number", value=_issuer_and_serial(signer_cert)),
            "digest_algorithm": {"algorithm": digest_name},
            "signed_attrs": attributes,
            "signature_algorithm": _signature_algorithm(signer_cert),
            "signature": signature,
        }
    )
    encap: dict = {"content_type": "data"}
    if content is not None:
        encap["content"] = content
    certificates = [signer_cert, *extra_certificates]
    signed = cms.SignedData(
        {
            "version": "v1",
            "digest_algorithms": [{"algorithm": digest_name}],
            "encap_content_info": encap,
            "certificates": [_asn1_certificate(c) for c in certificates],
            "signer_infos": [signer_info],
        }
    )
    return cms.ContentInfo({"content_type": "signed_data", "content": signed}).dump()


def certs_only(certificates: Iterable[x509.Certificate]) -> bytes:
    """A degenerate certs-only SignedData (DER ContentInfo)."""
    signed = cms.SignedData(
        {
            "version": "v1",
            "digest_algorithms": [],
            "encap_content_info": {"content_type": "data"},
            "certificates": [_asn1_certificate(c) for c in certificates],
            "signer_infos": [],
        }
    )
    return cms.ContentInfo({"content_type": "signed_data", "content": signed}).dump()


def read_certs_only(der: bytes) -> list[x509.Certificate]:
    """The certificates of a degenerate certs-only SignedData."""
    try:
        info = cms.ContentInfo.load(der, strict=True)
        if info["content_type"].native != "signed_data":
            raise MalformedMessage("not a certs-only SignedData")
        choices = info["content"]["certificates"] or []
        return [x509.load_der_x509_certificate(c.chosen.dump()) for c in choices if c.name == "certificate"]
    except MalformedMessage:
        raise
    except Exception as error:
        raise MalformedMessage(f"not a certs-only SignedData: {_short(error)}") from None


def scep_attribute(oid: str, value: core.Asn1Value) -> cms.CMSAttribute:
    return cms.CMSAttribute({"type": oid, "values": [value]})


def request_attributes(message_type: MessageType, transaction_id: str, sender_nonce: bytes) -> list:
    return [
        scep_attribute(OID_MESSAGE_TYPE, core.PrintableString(str(int(message_type)))),
        scep_attribute(OID_TRANSACTION_ID, core.PrintableString(transaction_id)),
        scep_attribute(OID_SENDER_NONCE, core.OctetString(sender_nonce)),
    ]


def cert_rep_attributes(
    status: PkiStatus,
    transaction_id: str,
    recipient_nonce: bytes,
    fail_info: FailInfo | None = None,
    fail_info_text: str | None = None,
) -> list:
    attributes = [
        scep_attribute(OID_MESSAGE_TYPE, core.PrintableString(str(int(MessageType.CERT_REP)))),
        scep_attribute(OID_PKI_STATUS, core.PrintableString(str(int(status)))),
        scep_attribute(OID_TRANSACTION_ID, core.PrintableString(transaction_id)),
        scep_attribute(OID_SENDER_NONCE, core.OctetString(os.urandom(16))),
        scep_attribute(OID_RECIPIENT_NONCE, core.OctetString(recipient_nonce)),
    ]
    if status is PkiStatus.FAILURE:
        attributes.append(scep_attribute(OID_FAIL_INFO, core.PrintableString(str(int(fail_info or 0)))))
        if fail_info_text:
            attributes.append(scep_attribute(OID_FAIL_INFO_TEXT, core.UTF8String(fail_info_text[:255])))
    return attributes


def issuer_and_serial_der(certificate: x509.Certificate) -> bytes:
    return _issuer_and_serial(certificate).dump()


class IssuerAndSubject(core.Sequence):
    """The content of a CertPoll (RFC 8894 section 3.3.3)."""

    _fields = [("issuer", asn1_x509.Name), ("subject", asn1_x509.Name)]


def issuer_and_subject_der(issuer: x509.Name, subject: x509.Name) -> bytes:
    return IssuerAndSubject(
        {"issuer": asn1_x509.Name.load(issuer.public_bytes()), "subject": asn1_x509.Name.load(subject.public_bytes())}
    ).dump()


def _issuer_and_serial(certificate: x509.Certificate) -> cms.IssuerAndSerialNumber:
    return cms.IssuerAndSerialNumber(
        {
            "issuer": asn1_x509.Name.load(certificate.issuer.public_bytes()),
            "serial_number": certificate.serial_number,
        }
    )


def _signature_algorithm(certificate: x509.Certificate) -> dict:
    if isinstance(certificate.public_key(), ec.EllipticCurvePublicKey):
        return {"algorithm": "ecdsa"}
    return {"algorithm": "rsassa_pkcs1v15"}


def _asn1_certificate(certificate: x509.Certificate) -> asn1_x509.Certificate:
    return asn1_x509.Certificate.load(certificate.public_bytes(Encoding.DER))


def _hash(hash_class: type[hashes.HashAlgorithm], data: bytes) -> bytes:
    return hashlib.new(hash_class.name, data).digest()


def _same(left: bytes, right: bytes) -> bool:
    return hmac.compare_digest(left, right)


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def _short(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:120]
