"""SCEP messages: PKIMessage and CertRep as CMS SignedData around EnvelopedData (RFC 8894 section 3).

Framework-free and custody-agnostic: signing and key-transport decryption go through `KeyHandle`s, so the same
code serves local PEM keys, Key Vault keys and the project's own client.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache

from asn1crypto import algos, cms, core
from asn1crypto import parser as asn1_parser
from asn1crypto.x509 import Name as Asn1Name
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import hashes, keywrap, padding
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.x963kdf import X963KDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from scep.core import der
from scep.core.protocol import ContentCipher, FailInfo, MessageType, PkiStatus
from scep.keys import HASHES, LEGACY_HASHES, CustodyError, KeyHandle, KeyTransport, hash_type, rsa_padding

OID_MESSAGE_TYPE = "2.16.840.1.113733.1.9.2"
OID_PKI_STATUS = "2.16.840.1.113733.1.9.3"
OID_FAIL_INFO = "2.16.840.1.113733.1.9.4"
OID_SENDER_NONCE = "2.16.840.1.113733.1.9.5"
OID_RECIPIENT_NONCE = "2.16.840.1.113733.1.9.6"
OID_TRANSACTION_ID = "2.16.840.1.113733.1.9.7"
OID_FAIL_INFO_TEXT = "1.3.6.1.5.5.7.24.1"
OID_DATA = "1.2.840.113549.1.7.1"
OID_SIGNED_DATA = "1.2.840.113549.1.7.2"
OID_ENVELOPED_DATA = "1.2.840.113549.1.7.3"
OID_CONTENT_TYPE = "1.2.840.113549.1.9.3"
OID_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
OID_SIGNING_TIME = "1.2.840.113549.1.9.5"
OID_RSA_ENCRYPTION = "1.2.840.113549.1.1.1"
OID_EC_PUBLIC_KEY = "1.2.840.10045.2.1"

LEGACY_CIPHERS = frozenset({ContentCipher.DES})

_CIPHER_OIDS = {
    ContentCipher.AES128: "2.16.840.1.101.3.4.1.2",
    ContentCipher.AES192: "2.16.840.1.101.3.4.1.22",
    ContentCipher.AES256: "2.16.840.1.101.3.4.1.42",
    ContentCipher.DES3: "1.2.840.113549.3.7",
    ContentCipher.DES: "1.3.14.3.2.7",
}
_CIPHER_KEY_BYTES = {
    ContentCipher.AES128: 16,
    ContentCipher.AES192: 24,
    ContentCipher.AES256: 32,
    ContentCipher.DES3: 24,
    ContentCipher.DES: 8,
}


# ECDH key agreement for EC recipients (RFC 5753 section 7.1.4): dhSinglePass-stdDH-<hash>kdf-scheme, the
# hash following the curve as in Suite B (RFC 6318); OpenSSL 3 `cms -decrypt` opens all of these.
_AGREEMENT_OIDS = {
    "sha1": "1.3.133.16.840.63.0.2",
    "sha256": "1.3.132.1.11.1",
    "sha384": "1.3.132.1.11.2",
    "sha512": "1.3.132.1.11.3",
}
_AGREEMENT_HASH_BY_CURVE = {"secp256r1": "sha256", "secp384r1": "sha384", "secp521r1": "sha512"}
_KEY_WRAP_OIDS = {16: "2.16.840.1.101.3.4.1.5", 24: "2.16.840.1.101.3.4.1.25", 32: "2.16.840.1.101.3.4.1.45"}

_KNOWN_OIDS = {
    der.oid(dotted): dotted
    for dotted in (
        OID_MESSAGE_TYPE,
        OID_PKI_STATUS,
        OID_FAIL_INFO,
        OID_SENDER_NONCE,
        OID_RECIPIENT_NONCE,
        OID_TRANSACTION_ID,
        OID_FAIL_INFO_TEXT,
        OID_CONTENT_TYPE,
        OID_MESSAGE_DIGEST,
        OID_SIGNING_TIME,
    )
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
    """The encrypted content of a PKIMessage, read but not yet decrypted."""

    cipher: ContentCipher
    transport: KeyTransport
    encrypted_key: bytes
    iv: bytes
    ciphertext: bytes


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
        _verify_signer_info(signer_info, attributes, signer, digest_name, content)
    except MessageError as error:
        error.attributes = partial
        raise
    except Exception as error:  # asn1crypto parses lazily: a damaged field surfaces as it is read
        failure = MessageError(FailInfo.BAD_MESSAGE_CHECK, f"unreadable message: {_short(error)}")
        failure.attributes = partial
        raise failure from None
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
        _verify_signer_info(signer_info, _signed_attributes(signer_info), signer, digest_name, content)
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


_INTEGER, _OCTET_STRING, _OID, _SEQUENCE, _SET = 2, 4, 6, 16, 17  # universal tag numbers (X.680 section 8.4)
_CONSTRUCTED = {_INTEGER: False, _OID: False, _SEQUENCE: True, _SET: True}  # an OCTET STRING may be either (BER)


@dataclass(frozen=True)
class _SignerInfo:
    """The fields of a SignerInfo (RFC 5652 section 5.3) SCEP reads, still encoded."""

    sid: der.Element
    digest_algorithm: der.Element
    signed_attrs: der.Element | None
    signature_algorithm: der.Element
    signature: der.Element


@dataclass(frozen=True)
class _SignedData:
    """The fields of a SignedData (RFC 5652 section 5.1) SCEP reads, still encoded."""

    encapsulated: der.Element
    certificates: der.Element | None
    crls: der.Element | None
    signer_infos: list[der.Element]


def _load_signed_data(data: bytes) -> tuple[_SignedData, _SignerInfo]:
    try:
        signed_data = _signed_data_of(data)
        if signed_data is None:
            raise MalformedMessage("not a CMS SignedData")
        if len(signed_data.signer_infos) != 1:
            raise MalformedMessage("a PKIMessage has exactly one signer")
        return signed_data, _signer_info(signed_data.signer_infos[0])
    except MalformedMessage:
        raise
    except Exception as error:  # the parser raises ValueError on bad DER, the walk ValueError and IndexError
        raise MalformedMessage(f"not a valid PKIMessage: {_short(error)}") from None


def _content_info(data: bytes, content_type: str) -> der.Element | None:
    """The content of a ContentInfo (RFC 5652 section 3), or None when its content type is another."""
    fields = der.children(_universal(der.read(data), _SEQUENCE, "ContentInfo").contents)
    if len(fields) != 2 or not fields[1].is_(der.CONTEXT, 0):
        raise ValueError("a ContentInfo is a content type and an [0] content")
    if _universal(fields[0], _OID, "content type").encoded != der.oid(content_type):
        return None
    return der.read(fields[1].contents)


def _signed_data_of(data: bytes) -> _SignedData | None:
    """The fields of a ContentInfo holding a SignedData, or None when it holds something else."""
    content = _content_info(data, OID_SIGNED_DATA)
    if content is None:
        return None
    fields = der.children(_universal(content, _SEQUENCE, "SignedData").contents)
    if len(fields) < 4:
        raise ValueError("SignedData has too few fields")
    _universal(fields[0], _INTEGER, "SignedData version")
    _universal(fields[1], _SET, "digestAlgorithms")
    optional = {field.tag: field for field in fields[3:-1] if field.class_ == der.CONTEXT}  # [0] certs, [1] crls
    if len(optional) != len(fields) - 4 or not set(optional) <= {0, 1}:
        raise ValueError("SignedData has an unexpected field")
    return _SignedData(
        encapsulated=_universal(fields[2], _SEQUENCE, "encapContentInfo"),
        certificates=optional.get(0),
        crls=optional.get(1),
        signer_infos=der.children(_universal(fields[-1], _SET, "signerInfos").contents),
    )


def _signer_info(element: der.Element) -> _SignerInfo:
    fields = der.children(_universal(element, _SEQUENCE, "SignerInfo").contents)
    if len(fields) < 5:
        raise ValueError("SignerInfo has too few fields")
    _universal(fields[0], _INTEGER, "SignerInfo version")
    rest = fields[3:]
    signed_attrs = rest.pop(0) if rest[0].is_(der.CONTEXT, 0) else None
    if len(rest) not in (2, 3) or (len(rest) == 3 and not rest[2].is_(der.CONTEXT, 1)):
        raise ValueError("SignerInfo has an unexpected field")
    return _SignerInfo(
        sid=fields[1],
        digest_algorithm=_universal(fields[2], _SEQUENCE, "digestAlgorithm"),
        signed_attrs=signed_attrs,
        signature_algorithm=_universal(rest[0], _SEQUENCE, "signatureAlgorithm"),
        signature=_universal(rest[1], _OCTET_STRING, "signature"),
    )


def _universal(element: der.Element, tag: int, what: str) -> der.Element:
    """element, when it is of the universal type `tag` in a form that type allows; else ValueError."""
    if not element.is_(der.UNIVERSAL, tag) or _CONSTRUCTED.get(tag, element.constructed) != element.constructed:
        raise ValueError(f"{what} is not of its ASN.1 type")
    return element


@dataclass(frozen=True)
class _Value:
    """One attribute value, undecoded: its universal tag number and content octets."""

    tag: int
    contents: bytes


_STRING_TAGS = {12: "utf-8", 19: "ascii", 20: "latin-1", 22: "ascii"}  # UTF8, Printable, T61, IA5 String


def _signed_attributes(signer_info: _SignerInfo) -> dict[str, _Value]:
    """The signed attributes by OID, each with its one value undecoded."""
    signed_attrs = signer_info.signed_attrs.contents if signer_info.signed_attrs else b""
    try:
        found = {}
        for attribute in der.children(signed_attrs):
            fields = der.children(_universal(attribute, _SEQUENCE, "a signed attribute").contents)
            if len(fields) != 2 or not fields[1].is_(der.UNIVERSAL, _SET) or not fields[1].contents:
                raise MalformedMessage("a signed attribute has no SET of values")
            values = der.children(fields[1].contents, limit=2)
            if len(values) != 1:
                raise MalformedMessage("a signed attribute must have exactly one value")
            value = values[0]
            tag = value.tag if value.class_ == der.UNIVERSAL else -1
            found[_dotted(fields[0].encoded)] = _Value(tag, value.contents)
        return found
    except MalformedMessage:
        raise
    except Exception as error:
        raise MalformedMessage(f"unreadable signed attributes: {_short(error)}") from None


def _dotted(oid_tlv: bytes) -> str:
    return _KNOWN_OIDS.get(oid_tlv) or core.ObjectIdentifier.load(oid_tlv).dotted


def _read_scep_attributes(attributes: dict[str, _Value]) -> ScepAttributes:
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


def _text(attributes: dict[str, _Value], oid: str) -> str:
    value = _optional_text(attributes, oid)
    if value is None:
        raise MalformedMessage(f"missing SCEP attribute {oid}")
    return value


def _optional_text(attributes: dict[str, _Value], oid: str) -> str | None:
    if oid not in attributes:
        return None
    value = attributes[oid]
    if value.tag not in _STRING_TAGS:
        raise MalformedMessage(f"SCEP attribute {oid} must be a string")
    text = value.contents.decode(_STRING_TAGS[value.tag])
    if not text or len(text) > 256:
        raise MalformedMessage(f"SCEP attribute {oid} has a bad length")
    return text


def _octets(attributes: dict[str, _Value], oid: str) -> bytes:
    if oid not in attributes:
        raise MalformedMessage(f"missing SCEP attribute {oid}")
    value = attributes[oid]
    if value.tag != 4:
        raise MalformedMessage(f"SCEP attribute {oid} must be an OCTET STRING")
    if not 8 <= len(value.contents) <= 64:
        raise MalformedMessage(f"SCEP nonce {oid} has a bad length")
    return value.contents


def _digest_name(signer_info: _SignerInfo, allow_legacy: bool) -> str:
    name = _algorithm_name(algos.DigestAlgorithmId, _algorithm_oid(signer_info.digest_algorithm))
    if name in HASHES or (allow_legacy and name in LEGACY_HASHES):
        return name
    raise MessageError(FailInfo.BAD_ALG, f"digest algorithm {name} is not accepted")


def _algorithm_oid(identifier: der.Element) -> bytes:
    """The encoded OID of an AlgorithmIdentifier."""
    return _universal(der.children(identifier.contents)[0], _OID, "algorithm").encoded


@lru_cache(maxsize=64)
def _algorithm_name(kind: type[core.ObjectIdentifier], oid_tlv: bytes) -> str:
    """asn1crypto's name for an algorithm OID of that kind (the dotted form when it has none)."""
    return kind.load(oid_tlv).native


def _certificates(signed_data: _SignedData) -> list[x509.Certificate]:
    found = []
    for choice in _choices(signed_data.certificates):
        try:
            found.append(x509.load_der_x509_certificate(choice.encoded))
        except ValueError:
            raise MessageError(FailInfo.BAD_MESSAGE_CHECK, "unreadable certificate in message") from None
    return found


def _choices(field: der.Element | None) -> list[der.Element]:
    """The plain choices (a Certificate, a CertificateList: SEQUENCEs) of a SignedData's certificates or crls;
    the tagged alternatives (attribute certificates, other formats) are passed over."""
    members = der.children(field.contents) if field is not None else []
    return [member for member in members if member.is_(der.UNIVERSAL, _SEQUENCE)]


def _find_signer(signer_info: _SignerInfo, certificates: list[x509.Certificate]) -> x509.Certificate:
    sid = signer_info.sid
    if sid.is_(der.CONTEXT, 0):  # [0] SubjectKeyIdentifier
        key_id = sid.contents
        found = [certificate for certificate in certificates if _subject_key_id(certificate) == key_id]
    else:
        issuer, serial = _issuer_and_serial(sid)
        found = [c for c in certificates if c.serial_number == serial and c.issuer.public_bytes() == issuer]
    if not found:
        raise MessageError(FailInfo.BAD_MESSAGE_CHECK, "the signer's certificate is not in the message")
    return _readable(found[0])


def issuer_and_serial_of(data: bytes) -> tuple[bytes, int]:
    """The issuer Name (encoded) and serial number of an encoded IssuerAndSerialNumber; ValueError if it is not one."""
    return _issuer_and_serial(der.read(data))


def _issuer_and_serial(element: der.Element) -> tuple[bytes, int]:
    fields = der.children(_universal(element, _SEQUENCE, "IssuerAndSerialNumber").contents)
    if len(fields) != 2:
        raise ValueError("an IssuerAndSerialNumber is a Name and an INTEGER")
    return _universal(fields[0], _SEQUENCE, "issuer").encoded, der.integer_value(fields[1])


def _readable(certificate: x509.Certificate) -> x509.Certificate:
    """Read now every field of the signer certificate the service uses (cryptography parses lazily), so that a
    damaged one is a badMessageCheck here rather than an unexpected error later."""
    try:
        _ = (certificate.subject, certificate.issuer, certificate.extensions, certificate.public_key())
        _ = (certificate.not_valid_before_utc, certificate.not_valid_after_utc)
    except Exception as error:
        raise MessageError(
            FailInfo.BAD_MESSAGE_CHECK, f"unreadable signer certificate: {_short(error)}"
        ) from None
    return certificate


def _subject_key_id(certificate: x509.Certificate) -> bytes:
    try:
        return certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(certificate.public_key()).digest


def _encapsulated_content(signed_data: _SignedData) -> bytes | None:
    fields = der.children(signed_data.encapsulated.contents)
    if not fields or fields[0].encoded != der.oid(OID_DATA):
        raise MessageError(FailInfo.BAD_MESSAGE_CHECK, "encapsulated content is not id-data")
    if len(fields) == 1:
        return None
    if len(fields) != 2 or not fields[1].is_(der.CONTEXT, 0):
        raise ValueError("eContent is an [0] OCTET STRING")
    return _octet_string(_universal(der.read(fields[1].contents), _OCTET_STRING, "eContent"))


def _octet_string(element: der.Element) -> bytes:
    """The bytes of an OCTET STRING (or an IMPLICIT one), primitive or constructed (BER chunks, as Go's pkcs7
    sends them)."""
    return _join_chunks(element.contents, depth=0) if element.constructed else element.contents


def _verify_signer_info(
    signer_info: _SignerInfo,
    attributes: dict[str, _Value],
    signer: x509.Certificate,
    digest_name: str,
    content: bytes | None,
) -> None:
    hash_class = hash_type(digest_name)
    expected = attributes.get(OID_MESSAGE_DIGEST)
    if expected is None or signer_info.signed_attrs is None:
        raise MessageError(FailInfo.BAD_MESSAGE_CHECK, "no messageDigest attribute")
    if expected.tag != 4 or not _same(expected.contents, _hash(hash_class, content or b"")):
        raise MessageError(FailInfo.BAD_MESSAGE_CHECK, "messageDigest does not match the content")
    signed_bytes = b"\x31" + signer_info.signed_attrs.encoded[1:]  # signed over as SET OF, sent as [0] IMPLICIT
    try:
        algorithm = algos.SignedDigestAlgorithm.load(signer_info.signature_algorithm.encoded)
        _verify(signer.public_key(), _octet_string(signer_info.signature), signed_bytes, algorithm, hash_class)
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


# --- envelopes -------------------------------------------------------------------------------------------


def read_envelope(
    data: bytes, recipient: x509.Certificate | Sequence[x509.Certificate], allow_legacy: bool = False
) -> Envelope:
    """Read an EnvelopedData addressed to us, refusing legacy algorithms by default.

    recipient is our certificate, or all of ours that carry the same key (the RA and its encryption-only twin);
    clients may encrypt to several (micromdm adds the CA beside the RA)."""
    try:
        enveloped = _content_info(data, OID_ENVELOPED_DATA)
        if enveloped is None:
            raise MessageError(FailInfo.BAD_REQUEST, "the message content is not an EnvelopedData")
        recipient_infos, encrypted_content_info = _enveloped_data(enveloped)
        ours = [recipient] if isinstance(recipient, x509.Certificate) else list(recipient)
        recipient_info = _key_trans_recipient(recipient_infos, ours)
        cipher, iv, ciphertext = _encrypted_content(encrypted_content_info)
        envelope = Envelope(
            cipher=cipher,
            transport=_key_transport(recipient_info.algorithm.encoded),
            encrypted_key=recipient_info.encrypted_key,
            iv=iv,
            ciphertext=ciphertext,
        )
    except MessageError:
        raise
    except Exception as error:
        raise MessageError(FailInfo.BAD_REQUEST, f"unreadable EnvelopedData: {_short(error)}") from None
    if envelope.cipher in LEGACY_CIPHERS and not allow_legacy:
        raise MessageError(FailInfo.BAD_ALG, "single DES is refused (enable SCEP_ALLOW_DES for legacy clients)")
    if not envelope.ciphertext:
        raise MessageError(FailInfo.BAD_REQUEST, "the EnvelopedData has no content")
    return envelope


def _enveloped_data(enveloped: der.Element) -> tuple[list[der.Element], der.Element]:
    """The recipientInfos and the encryptedContentInfo of an EnvelopedData (RFC 5652 section 6.1)."""
    fields = der.children(_universal(enveloped, _SEQUENCE, "EnvelopedData").contents)
    _universal(fields[0], _INTEGER, "EnvelopedData version")
    rest = fields[2:] if len(fields) > 1 and fields[1].is_(der.CONTEXT, 0) else fields[1:]  # originatorInfo
    if len(rest) == 3 and rest[2].is_(der.CONTEXT, 1):  # unprotectedAttrs
        rest = rest[:2]
    if len(rest) != 2:
        raise ValueError("EnvelopedData has unexpected fields")
    recipient_infos = der.children(_universal(rest[0], _SET, "recipientInfos").contents, limit=16)
    return recipient_infos, _universal(rest[1], _SEQUENCE, "encryptedContentInfo")


UNDECRYPTABLE = "could not decrypt the message"


def open_envelope(envelope: Envelope, recipient: KeyHandle) -> bytes:
    """Decrypt an EnvelopedData with the recipient's key (custody does the RSA part).

    Every way of failing (the custody refusing the blob for its padding, a vault error, a key of the wrong
    length, content that does not decrypt) gives the one same MessageError: a different answer for a bad
    padding than for a good one would be a Bleichenbacher decryption oracle.
    """
    try:
        content_key = recipient.unwrap_key(envelope.encrypted_key, envelope.transport)
    except CustodyError:
        content_key = b""
    try:
        if len(content_key) != _CIPHER_KEY_BYTES[envelope.cipher]:
            raise ValueError("content-encryption key of the wrong length")
        return _cbc_decrypt(envelope.cipher, content_key, envelope.iv, envelope.ciphertext)
    except ValueError:
        raise MessageError(FailInfo.BAD_MESSAGE_CHECK, UNDECRYPTABLE) from None


def seal_envelope(
    content: bytes,
    recipient: x509.Certificate,
    cipher: ContentCipher,
    transport: KeyTransport = KeyTransport.RSA_PKCS1V15,
) -> bytes:
    """Encrypt content to a recipient certificate as a CMS EnvelopedData (DER ContentInfo): RSA key transport,
    or ephemeral-static ECDH key agreement for an EC key (RFC 5753)."""
    public_key = envelope_recipient_key(recipient, cipher)
    content_key = os.urandom(_CIPHER_KEY_BYTES[cipher])
    iv = os.urandom(8 if cipher in (ContentCipher.DES, ContentCipher.DES3) else 16)
    ciphertext = _cbc_encrypt(cipher, content_key, iv, content)
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        version, recipient_info = 2, _key_agreement_recipient(public_key, recipient, content_key)
    else:
        encrypted_key = public_key.encrypt(content_key, rsa_padding(transport))
        version, recipient_info = 0, der.sequence(
            der.integer(0),
            issuer_and_serial_der(recipient),
            _key_transport_algorithm(transport),
            der.octet_string(encrypted_key),
        )
    encrypted_content_info = der.sequence(
        der.oid(OID_DATA),
        der.sequence(der.oid(_CIPHER_OIDS[cipher]), der.octet_string(iv)),
        der.context(0, ciphertext, constructed=False),
    )
    enveloped = der.sequence(der.integer(version), der.set_of([recipient_info]), encrypted_content_info)
    return der.sequence(der.oid(OID_ENVELOPED_DATA), der.context(0, enveloped))


def envelope_recipient_key(
    certificate: x509.Certificate, cipher: ContentCipher
) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    """The key a reply in this cipher can be enveloped to (RSA, or EC on a curve with a key-agreement scheme);
    else badAlg. AES key wrap takes keys of 16 bytes and more: no single DES content key for EC recipients."""
    public_key = certificate.public_key()
    if isinstance(public_key, rsa.RSAPublicKey):
        return public_key
    if isinstance(public_key, ec.EllipticCurvePublicKey) and public_key.curve.name in _AGREEMENT_HASH_BY_CURVE:
        if cipher in LEGACY_CIPHERS:
            raise MessageError(FailInfo.BAD_ALG, "an EC signer's reply cannot be encrypted with single DES")
        return public_key
    raise MessageError(
        FailInfo.BAD_ALG, "the signer certificate's key can receive no envelope (RSA, EC P-256/P-384/P-521 only)"
    )


def _key_agreement_recipient(
    public_key: ec.EllipticCurvePublicKey, recipient: x509.Certificate, content_key: bytes
) -> bytes:
    """KeyAgreeRecipientInfo (RFC 5652 section 6.2.2): ephemeral-static ECDH, X9.63 KDF, AES key wrap."""
    hash_name = _AGREEMENT_HASH_BY_CURVE[public_key.curve.name]
    wrap_oid = _KEY_WRAP_OIDS[_wrap_key_bytes(len(content_key))]
    ephemeral = ec.generate_private_key(public_key.curve)
    kek = _key_encryption_key(ephemeral.exchange(ec.ECDH(), public_key), hash_name, wrap_oid)
    point = ephemeral.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    originator_key = der.context(1, der.sequence(der.oid(OID_EC_PUBLIC_KEY)) + der.bit_string(point))
    recipient_encrypted_key = der.sequence(
        issuer_and_serial_der(recipient), der.octet_string(keywrap.aes_key_wrap(kek, content_key))
    )
    return der.context(
        1,
        der.integer(3)
        + der.context(0, originator_key)
        + der.sequence(der.oid(_AGREEMENT_OIDS[hash_name]), der.sequence(der.oid(wrap_oid)))
        + der.sequence(recipient_encrypted_key),
    )


def _wrap_key_bytes(content_key_bytes: int) -> int:
    """The AES key wrap at least as strong as the content cipher (RFC 5753 section 8), as OpenSSL chooses it."""
    return 16 if content_key_bytes <= 16 else 24 if content_key_bytes <= 24 else 32


def _key_encryption_key(shared_secret: bytes, hash_name: str, wrap_oid: str) -> bytes:
    """X9.63 KDF over the ECDH secret with ECC-CMS-SharedInfo (RFC 5753 section 7.2), no ukm."""
    size = {dotted: size for size, dotted in _KEY_WRAP_OIDS.items()}[wrap_oid]
    shared_info = der.sequence(
        der.sequence(der.oid(wrap_oid)), der.context(2, der.octet_string((size * 8).to_bytes(4, "big")))
    )
    return X963KDF(HASHES[hash_name](), size, shared_info).derive(shared_secret)


def open_key_agreement_envelope(envelope_der: bytes, private_key: ec.EllipticCurvePrivateKey) -> bytes:
    """Decrypt an EnvelopedData sent to our EC key (the client's side of `seal_envelope`)."""
    try:
        enveloped = cms.ContentInfo.load(envelope_der, strict=True)["content"]
        kari = next(r.chosen for r in enveloped["recipient_infos"] if r.name == "kari")
        algorithm = kari["key_encryption_algorithm"]
        hash_name = {dotted: name for name, dotted in _AGREEMENT_OIDS.items()}[algorithm["algorithm"].dotted]
        wrap_oid = cms.KeyEncryptionAlgorithm.load(algorithm["parameters"].dump())["algorithm"].dotted
        point = kari["originator"].chosen["public_key"].native
        ephemeral = ec.EllipticCurvePublicKey.from_encoded_point(private_key.curve, point)
        kek = _key_encryption_key(private_key.exchange(ec.ECDH(), ephemeral), hash_name, wrap_oid)
        content_key = keywrap.aes_key_unwrap(kek, kari["recipient_encrypted_keys"][0]["encrypted_key"].native)
        cipher, iv, ciphertext = _encrypted_content(der.read(enveloped["encrypted_content_info"].dump()))
        return _cbc_decrypt(cipher, content_key, iv, ciphertext)
    except Exception as error:
        raise MessageError(
            FailInfo.BAD_MESSAGE_CHECK, f"cannot open the key-agreement envelope: {_short(error)}"
        ) from None


@dataclass(frozen=True)
class _KeyTransRecipient:
    """A KeyTransRecipientInfo (RFC 5652 section 6.2.1)."""

    rid: der.Element
    algorithm: der.Element
    encrypted_key: bytes


def _key_trans_recipient(
    recipient_infos: list[der.Element], ours: Sequence[x509.Certificate]
) -> _KeyTransRecipient:
    """The key-transport RecipientInfo that names one of our certificates (issuer and serial, or key identifier).

    None naming ours means the request was encrypted to someone else's key (a CA certificate, an RA of another
    server, an RA this server no longer has): refused rather than guessed at."""
    # ktri is the one untagged RecipientInfo choice; kari, kekri, pwri and ori are [1] to [4]
    candidates = [_key_trans(info) for info in recipient_infos if info.is_(der.UNIVERSAL, _SEQUENCE)]
    if not candidates:
        raise MessageError(FailInfo.BAD_ALG, "no key-transport recipient (only RSA key transport is supported)")
    for candidate in candidates:
        if any(_identifies(candidate.rid, certificate) for certificate in ours):
            return candidate
    raise MessageError(
        FailInfo.BAD_MESSAGE_CHECK,
        "the request is encrypted to a certificate that is not ours: no RecipientInfo names this server's RA "
        "certificates (fetch GetCACert again and encrypt to the RA)",
    )


def _key_trans(info: der.Element) -> _KeyTransRecipient:
    fields = der.children(info.contents)
    if len(fields) != 4:
        raise ValueError("a KeyTransRecipientInfo has four fields")
    _universal(fields[0], _INTEGER, "KeyTransRecipientInfo version")
    algorithm = _universal(fields[2], _SEQUENCE, "keyEncryptionAlgorithm")
    return _KeyTransRecipient(fields[1], algorithm, _octet_string(_universal(fields[3], _OCTET_STRING, "encryptedKey")))


def _identifies(identifier: der.Element, certificate: x509.Certificate) -> bool:
    if identifier.is_(der.CONTEXT, 0):  # [0] SubjectKeyIdentifier
        return identifier.contents == _subject_key_id(certificate)
    issuer, serial = _issuer_and_serial(identifier)
    if serial != certificate.serial_number:
        return False
    ours = certificate.issuer.public_bytes()
    # The same DER is the same name; only a differently encoded one needs RFC 5280 name matching (stringprep
    # of every value, a sixth of an enrollment's CPU when it ran on every request).
    return issuer == ours or Asn1Name.load(issuer) == Asn1Name.load(ours)


def _encrypted_content(info: der.Element) -> tuple[ContentCipher, bytes, bytes]:
    """The cipher, IV and ciphertext of an EncryptedContentInfo (RFC 5652 section 6.1); the ciphertext, an
    [0] IMPLICIT OCTET STRING, may be constructed (BER) and is empty when absent."""
    fields = der.children(info.contents)
    if len(fields) not in (2, 3) or (len(fields) == 3 and not fields[2].is_(der.CONTEXT, 0)):
        raise ValueError("EncryptedContentInfo has unexpected fields")
    cipher, iv = _content_cipher(_universal(fields[1], _SEQUENCE, "contentEncryptionAlgorithm"))
    return cipher, iv, _octet_string(fields[2]) if len(fields) == 3 else b""


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


def _content_cipher(algorithm: der.Element) -> tuple[ContentCipher, bytes]:
    """The cipher and IV of a content-encryption AlgorithmIdentifier (CBC: the parameters are the IV)."""
    fields = der.children(algorithm.contents)
    name = _algorithm_name(algos.EncryptionAlgorithmId, _algorithm_oid(algorithm))
    try:
        cipher = ContentCipher(name)
    except ValueError:
        raise MessageError(FailInfo.BAD_ALG, f"content encryption {name} is not supported") from None
    if len(fields) != 2:
        raise ValueError("the content-encryption algorithm carries no IV")
    return cipher, _octet_string(_universal(fields[1], _OCTET_STRING, "IV"))


@lru_cache(maxsize=16)
def _key_transport(encoded_algorithm: bytes) -> KeyTransport:
    algorithm = cms.KeyEncryptionAlgorithm.load(encoded_algorithm, strict=True)
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


@lru_cache(maxsize=4)
def _key_transport_algorithm(transport: KeyTransport) -> bytes:
    if transport is KeyTransport.RSA_PKCS1V15:
        return cms.KeyEncryptionAlgorithm({"algorithm": "rsaes_pkcs1v15"}).dump()
    digest = "sha1" if transport is KeyTransport.RSA_OAEP_SHA1 else "sha256"
    return cms.KeyEncryptionAlgorithm(
        {
            "algorithm": "rsaes_oaep",
            "parameters": {
                "hash_algorithm": {"algorithm": digest},
                "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": digest}},
            },
        }
    ).dump()


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
    scep_attributes: Iterable[bytes],
    content: bytes | None,
    extra_certificates: Iterable[x509.Certificate] = (),
) -> bytes:
    """Build a SignedData (DER ContentInfo) over `content` with SCEP signed attributes, signed by custody."""
    hash_class = hash_type(digest_name)
    attributes = [
        der.attribute(OID_CONTENT_TYPE, der.oid(OID_DATA)),
        der.attribute(OID_SIGNING_TIME, der.utc_time(_now())),
        der.attribute(OID_MESSAGE_DIGEST, der.octet_string(_hash(hash_class, content or b""))),
        *scep_attributes,
    ]
    signed_attributes = der.set_of(attributes)
    signature = signer.sign_digest(_hash(hash_class, signed_attributes), digest_name)
    signer_cert = signer.certificate
    signer_info = der.sequence(
        der.integer(1),
        issuer_and_serial_der(signer_cert),
        der.digest_algorithm(digest_name),
        b"\xa0" + signed_attributes[1:],  # the same SET OF, sent as [0] IMPLICIT
        _signature_algorithm(signer_cert, digest_name),
        der.octet_string(signature),
    )
    encapsulated = der.oid(OID_DATA)
    if content is not None:
        encapsulated += der.context(0, der.octet_string(content))
    return _signed_data(
        [der.digest_algorithm(digest_name)], encapsulated, [signer_cert, *extra_certificates], [signer_info]
    )


def certs_only(certificates: Iterable[x509.Certificate]) -> bytes:
    """A degenerate certs-only SignedData (DER ContentInfo)."""
    return _signed_data([], der.oid(OID_DATA), certificates, [])


def _signed_data(
    digest_algorithms: list[bytes],
    encapsulated: bytes,
    certificates: Iterable[x509.Certificate],
    signer_infos: list[bytes],
) -> bytes:
    signed = der.sequence(
        der.integer(1),
        der.set_of(digest_algorithms),
        der.sequence(encapsulated),
        der.context(0, b"".join(sorted(_certificate_der(c) for c in certificates))),
        der.set_of(signer_infos),
    )
    return der.sequence(der.oid(OID_SIGNED_DATA), der.context(0, signed))


def crls_only(crls: Iterable[bytes]) -> bytes:
    """A degenerate SignedData carrying CRLs (DER ContentInfo): what a GetCRL reply holds (RFC 8894 3.3.4)."""
    signed = der.sequence(
        der.integer(1), der.set_of([]), der.sequence(der.oid(OID_DATA)), der.context(1, b"".join(crls)), der.set_of([])
    )
    return der.sequence(der.oid(OID_SIGNED_DATA), der.context(0, signed))


def read_certs_only(data: bytes) -> list[x509.Certificate]:
    """The certificates of a degenerate certs-only SignedData."""
    signed = _degenerate_signed_data(data)
    try:
        return [x509.load_der_x509_certificate(choice.encoded) for choice in _choices(signed.certificates)]
    except Exception as error:
        raise MalformedMessage(f"not a certs-only SignedData: {_short(error)}") from None


def read_crls_only(data: bytes) -> list[x509.CertificateRevocationList]:
    """The CRLs of a degenerate SignedData (a GetCRL reply)."""
    signed = _degenerate_signed_data(data)
    try:
        return [x509.load_der_x509_crl(choice.encoded) for choice in _choices(signed.crls)]
    except Exception as error:
        raise MalformedMessage(f"unreadable CRL in a SignedData: {_short(error)}") from None


def _degenerate_signed_data(data: bytes) -> _SignedData:
    try:
        signed = _signed_data_of(data)
    except Exception as error:
        raise MalformedMessage(f"not a degenerate SignedData: {_short(error)}") from None
    if signed is None:
        raise MalformedMessage("not a degenerate SignedData")
    return signed


def request_attributes(message_type: MessageType, transaction_id: str, sender_nonce: bytes) -> list[bytes]:
    return [
        der.attribute(OID_MESSAGE_TYPE, der.printable_string(str(int(message_type)))),
        der.attribute(OID_TRANSACTION_ID, der.printable_string(transaction_id)),
        der.attribute(OID_SENDER_NONCE, der.octet_string(sender_nonce)),
    ]


def cert_rep_attributes(
    status: PkiStatus,
    transaction_id: str,
    recipient_nonce: bytes,
    fail_info: FailInfo | None = None,
    fail_info_text: str | None = None,
) -> list[bytes]:
    attributes = [
        der.attribute(OID_MESSAGE_TYPE, der.printable_string(str(int(MessageType.CERT_REP)))),
        der.attribute(OID_PKI_STATUS, der.printable_string(str(int(status)))),
        der.attribute(OID_TRANSACTION_ID, der.printable_string(transaction_id)),
        der.attribute(OID_SENDER_NONCE, der.octet_string(os.urandom(16))),
        der.attribute(OID_RECIPIENT_NONCE, der.octet_string(recipient_nonce)),
    ]
    if status is PkiStatus.FAILURE:
        attributes.append(der.attribute(OID_FAIL_INFO, der.printable_string(str(int(fail_info or 0)))))
        if fail_info_text:
            attributes.append(der.attribute(OID_FAIL_INFO_TEXT, der.utf8_string(fail_info_text[:255])))
    return attributes


def cert_rep(
    signer: KeyHandle,
    digest_name: str,
    status: PkiStatus,
    transaction_id: str,
    recipient_nonce: bytes,
    content: bytes = b"",
    fail_info: FailInfo | None = None,
    fail_info_text: str | None = None,
) -> bytes:
    """A CertRep signed by signer (the RA): content is the sealed certs-only envelope of a SUCCESS.

    A PENDING or FAILURE carries an empty eContent rather than none: OpenSSL's PKCS7_verify (certmonger)
    refuses a detached CertRep.
    """
    attributes = cert_rep_attributes(status, transaction_id, recipient_nonce, fail_info, fail_info_text)
    return sign_message(signer, digest_name, attributes, content)


def issuer_and_serial_der(certificate: x509.Certificate) -> bytes:
    """IssuerAndSerialNumber of a certificate (the issuer Name exactly as the certificate encodes it)."""
    return der.sequence(certificate.issuer.public_bytes(), der.integer(certificate.serial_number))


def issuer_and_subject_der(issuer: x509.Name, subject: x509.Name) -> bytes:
    """The content of a CertPoll (RFC 8894 section 3.3.3)."""
    return der.sequence(issuer.public_bytes(), subject.public_bytes())


_ECDSA_SIGNATURE_OIDS = {
    "sha1": "1.2.840.10045.4.1",
    "sha256": "1.2.840.10045.4.3.2",
    "sha384": "1.2.840.10045.4.3.3",
    "sha512": "1.2.840.10045.4.3.4",
}


def _signature_algorithm(certificate: x509.Certificate, digest_name: str) -> bytes:
    if isinstance(certificate.public_key(), ec.EllipticCurvePublicKey):
        return der.sequence(der.oid(_ECDSA_SIGNATURE_OIDS[digest_name]))
    return der.sequence(der.oid(OID_RSA_ENCRYPTION), der.NULL)


def _certificate_der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(Encoding.DER)


def _hash(hash_class: type[hashes.HashAlgorithm], data: bytes) -> bytes:
    return hashlib.new(hash_class.name, data).digest()


def _same(left: bytes, right: bytes) -> bool:
    return hmac.compare_digest(left, right)


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def _short(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:120]
