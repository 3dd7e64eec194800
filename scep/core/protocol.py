"""SCEP protocol constants (RFC 8894 section 3.2.1)."""

from __future__ import annotations

from enum import Enum, IntEnum


class MessageType(IntEnum):
    CERT_REP = 3
    RENEWAL_REQ = 17
    PKCS_REQ = 19
    CERT_POLL = 20
    GET_CERT = 21
    GET_CRL = 22


class PkiStatus(IntEnum):
    SUCCESS = 0
    FAILURE = 2
    PENDING = 3


class FailInfo(IntEnum):
    BAD_ALG = 0
    BAD_MESSAGE_CHECK = 1
    BAD_REQUEST = 2
    BAD_TIME = 3
    BAD_CERT_ID = 4


class ContentCipher(str, Enum):
    """Content-encryption algorithms, named as asn1crypto names them."""

    AES128 = "aes128_cbc"
    AES192 = "aes192_cbc"
    AES256 = "aes256_cbc"
    DES3 = "tripledes_3key"
    DES = "des"  # legacy: only with SCEP_ALLOW_DES=true


# SHA-384 is not an RFC 8894 keyword, but strongSwan 5.9 reads the list one position off and only accepts AES,
# SHA-256 and Renewal when it sees SHA-384; the server supports SHA-384 anyway.
CAPABILITIES_BASE = (
    "POSTPKIOperation",
    "SHA-1",
    "SHA-256",
    "SHA-384",
    "SHA-512",
    "AES",
    "DES3",
    "Renewal",
    "SCEPStandard",
)
