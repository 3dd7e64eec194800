"""A minimal DER writer for the structures the server builds on every enrollment.

asn1crypto parses every message; building CertReps with it cost more CPU than the three RSA operations of an
enrollment together (its generic tree dumping), so the hot path writes its few fixed shapes with these helpers.
Object identifiers and algorithm identifiers still come from asn1crypto, encoded once and cached.

Reading is the mirror image: the request path walks its few fixed shapes (SignedData, EnvelopedData) element by
element with `read` and `children`, asn1crypto's parser finding each element's boundaries (DER, and BER's
indefinite lengths, which some clients send), instead of building asn1crypto's typed tree, which cost more than
half of what reading a request cost.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import datetime
from functools import lru_cache
from typing import NamedTuple

from asn1crypto import algos, core
from asn1crypto import parser as asn1_parser
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

SEQUENCE = 0x30
SET = 0x31
INTEGER = 0x02
BIT_STRING = 0x03
OCTET_STRING = 0x04
NULL = b"\x05\x00"
PRINTABLE_STRING = 0x13
UTF8_STRING = 0x0C
UTC_TIME = 0x17

UNIVERSAL = 0
CONTEXT = 2


def length(size: int) -> bytes:
    if size < 0x80:
        return bytes([size])
    encoded = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(encoded)]) + encoded


def tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + length(len(content)) + content


def sequence(*parts: bytes) -> bytes:
    return tlv(SEQUENCE, b"".join(parts))


def set_of(parts: Iterable[bytes]) -> bytes:
    """A DER SET OF: elements sorted by their encodings (X.690 11.6)."""
    return tlv(SET, b"".join(sorted(parts)))


def context(number: int, content: bytes, constructed: bool = True) -> bytes:
    """A context-specific tag [number] around content (EXPLICIT, or IMPLICIT when content is the inner value)."""
    return tlv((0xA0 if constructed else 0x80) | number, content)


def integer(value: int) -> bytes:
    size = value.bit_length() // 8 + 1  # room for the sign bit
    return tlv(INTEGER, value.to_bytes(size, "big", signed=True))


def octet_string(value: bytes) -> bytes:
    return tlv(OCTET_STRING, value)


def bit_string(value: bytes) -> bytes:
    """A BIT STRING of whole octets (no unused bits), such as a public key."""
    return tlv(BIT_STRING, b"\x00" + value)


def printable_string(value: str) -> bytes:
    return tlv(PRINTABLE_STRING, value.encode("ascii"))


def utf8_string(value: str) -> bytes:
    return tlv(UTF8_STRING, value.encode("utf-8"))


def utc_time(moment: datetime) -> bytes:
    return tlv(UTC_TIME, moment.strftime("%y%m%d%H%M%SZ").encode("ascii"))


@lru_cache(maxsize=64)
def oid(dotted_or_name: str) -> bytes:
    return core.ObjectIdentifier(dotted_or_name).dump()


@lru_cache(maxsize=32)
def digest_algorithm(name: str) -> bytes:
    """AlgorithmIdentifier of a digest, parameters absent (RFC 5754)."""
    return algos.DigestAlgorithm({"algorithm": name}).dump()


def attribute(attribute_oid: str, value: bytes) -> bytes:
    """A CMS Attribute with one (already encoded) value."""
    return sequence(oid(attribute_oid), tlv(SET, value))


def contents(element: bytes) -> bytes:
    """The content octets of one encoded element (what follows its tag and length)."""
    return asn1_parser.parse(element)[4]


class Element(NamedTuple):
    """One decoded element: its tag, its content octets and its whole encoding."""

    class_: int  # UNIVERSAL, 1 application, CONTEXT, 3 private
    constructed: bool
    tag: int
    contents: bytes
    encoded: bytes

    def is_(self, class_: int, tag: int) -> bool:
        return self.class_ == class_ and self.tag == tag


def read(data: bytes) -> Element:
    """The one element data holds; raises ValueError when it is not exactly one element."""
    class_, method, tag, _, body, _ = asn1_parser.parse(data, strict=True)
    return Element(class_, method == 1, tag, body, data)


def children(content: bytes, limit: int = 64) -> list[Element]:
    """The elements that follow one another in content; ValueError beyond `limit` of them (every structure read
    this way has a handful, and each step copies what is left)."""
    found = []
    offset = 0
    while offset < len(content):
        if len(found) == limit:
            raise ValueError(f"more than {limit} elements")
        class_, method, tag, header, body, trailer = asn1_parser.parse(content[offset:])
        size = len(header) + len(body) + len(trailer)
        found.append(Element(class_, method == 1, tag, body, content[offset : offset + size]))
        offset += size
    return found


def elements(content: bytes) -> list[bytes]:
    """The encoded elements (tag, length and content each) that follow one another in content."""
    return [child.encoded for child in children(content, limit=len(content))]


def integer_value(element: Element) -> int:
    """The value of an INTEGER element; ValueError when it is not one."""
    if not element.is_(UNIVERSAL, INTEGER) or element.constructed or not element.contents:
        raise ValueError("INTEGER expected")
    return int.from_bytes(element.contents, "big", signed=True)


def fingerprint(certificate: x509.Certificate, algorithm: str = "sha256") -> str:
    """Upper-case hex digest of the certificate's DER; with "sha1", the thumbprint Windows and Intune show."""
    return hashlib.new(algorithm, certificate.public_bytes(Encoding.DER)).hexdigest().upper()
