"""Custody of private keys: one small interface, implemented by local PEM files and Azure Key Vault.

Nothing outside the custody backends ever touches a private key. The SCEP core asks a `KeyHandle` to sign a
digest or to unwrap a key-transport blob, and reads the certificate that goes with the key.

A caller may give the key operations of one piece of work a shared time budget (`time_budget`); a backend that
retries (Key Vault) stops retrying at that deadline. The core sets it without knowing who retries.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric import rsa

# The digests sign_digest accepts by name; md5 only where a legacy client is explicitly allowed.
HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
LEGACY_HASHES: dict[str, type[hashes.HashAlgorithm]] = {"md5": hashes.MD5}


class KeyTransport(str, Enum):
    """How a content-encryption key was wrapped for us (RSA only)."""

    RSA_PKCS1V15 = "RSA1_5"
    RSA_OAEP_SHA1 = "RSA-OAEP"
    RSA_OAEP_SHA256 = "RSA-OAEP-256"


def hash_type(name: str) -> type[hashes.HashAlgorithm]:
    """The hash algorithm of a digest name, legacy ones included (KeyError for an unknown name)."""
    return HASHES.get(name) or LEGACY_HASHES[name]


def rsa_padding(transport: KeyTransport) -> asym_padding.AsymmetricPadding:
    """The RSA encryption padding of a key transport."""
    if transport is KeyTransport.RSA_PKCS1V15:
        return asym_padding.PKCS1v15()
    digest = hashes.SHA1() if transport is KeyTransport.RSA_OAEP_SHA1 else hashes.SHA256()
    return asym_padding.OAEP(asym_padding.MGF1(digest), digest, None)


def rsa_decrypt(private_key: rsa.RSAPrivateKey, ciphertext: bytes, transport: KeyTransport) -> bytes:
    """RSA key-transport decryption for in-process keys (local custody and the client)."""
    return private_key.decrypt(ciphertext, rsa_padding(transport))


class SignaturePadding(str, Enum):
    """RSA signature padding; ignored for EC keys."""

    PKCS1V15 = "pkcs1v15"
    PSS = "pss"


class CustodyError(Exception):
    """A custody backend could not perform an operation (unreachable, throttled past retries, refused)."""


class SecretNotFound(CustodyError):
    """A named secret does not exist in its vault: absent (for instance not created yet), not unreachable."""


class KeyOperationForbidden(CustodyError):
    """The key itself does not permit the operation (its key_ops), whatever the caller's permissions.

    allowed_operations reads the operations the key does permit (one more call to the backend), for diagnosis.
    """

    def __init__(self, message: str, operation: str, allowed_operations: Callable[[], list[str]]) -> None:
        super().__init__(message)
        self.operation = operation
        self.allowed_operations = allowed_operations


_deadline: ContextVar[float | None] = ContextVar("custody_deadline", default=None)


@contextmanager
def time_budget(seconds: float) -> Iterator[None]:
    """Give every key operation inside the block one shared deadline (time.monotonic based)."""
    token = _deadline.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _deadline.reset(token)


def current_deadline() -> float | None:
    """The deadline set by the innermost time_budget, or None outside any."""
    return _deadline.get()


class KeyHandle(Protocol):
    """One private key and the certificate that goes with it."""

    @property
    def certificate(self) -> x509.Certificate: ...

    def sign_digest(
        self, digest: bytes, hash_name: str, padding: SignaturePadding = SignaturePadding.PKCS1V15
    ) -> bytes:
        """Sign a precomputed digest; hash_name is 'sha1', 'sha256', 'sha384' or 'sha512'.

        Returns the signature as X.509 and CMS expect it: raw for RSA, DER (Ecdsa-Sig-Value) for ECDSA.
        Raises CustodyError when the backend fails.
        """
        ...

    def unwrap_key(self, wrapped_key: bytes, transport: KeyTransport) -> bytes:
        """Recover a content-encryption key from a key-transport blob (RSA keys only).

        Raises CustodyError whenever the key cannot be recovered, bad padding included; callers must treat every
        failure alike so that no answer tells a bad padding from a bad length (no decryption oracle).
        """
        ...


@dataclass(frozen=True)
class CaKeys:
    """The keys the SCEP service works with at one moment.

    ca: the issuing CA; ra: the RA that unwraps request keys and signs CertReps (issued by ca);
    next_ca: a rolled-over CA served by GetNextCACert, if any; chain: certificates above ca (empty for a root);
    retired: earlier CA certificates whose issued certificates may still renew;
    ra_encryption: a second certificate over the RA's key with keyEncipherment only, for clients that pick the
    request's recipient by key usage as NDES publishes it (None until `scep ca ra` has issued one).
    """

    ca: KeyHandle
    ra: KeyHandle
    next_ca: KeyHandle | None = None
    chain: tuple[x509.Certificate, ...] = ()
    retired: tuple[x509.Certificate, ...] = ()
    ra_encryption: x509.Certificate | None = None

    def ra_certificates(self) -> tuple[x509.Certificate, ...]:
        """Every certificate a request may be encrypted to: all of them carry the RA's key."""
        if self.ra_encryption is None:
            return (self.ra.certificate,)
        return (self.ra.certificate, self.ra_encryption)

    def trusted_issuers(self) -> list[x509.Certificate]:
        """CA certificates whose issued certificates this server accepts as renewal signers."""
        issuers = [self.ca.certificate, *self.retired]
        if self.next_ca is not None:
            issuers.append(self.next_ca.certificate)
        return issuers


def encryption_twin(ra: x509.Certificate, candidate: x509.Certificate | None) -> x509.Certificate | None:
    """candidate if it is an RA encryption certificate for ra (same key, same issuer), else None."""
    if candidate is None or candidate.issuer != ra.issuer or candidate.public_key() != ra.public_key():
        return None
    return candidate


class Custody(Protocol):
    """A home for the CA and RA keys (local files, Key Vault)."""

    def keys(self) -> CaKeys:
        """The current keys; cheap on the warm path (cached), refreshed when a new version appears."""
        ...

    def describe(self) -> str:
        """Where the keys live, for logs and `scep doctor` (no secrets)."""
        ...


class Slot(str, Enum):
    """Where a key sits in the CA's life: the current CA, a rolled-over next CA, the RA, the OCSP signer."""

    CA = "ca"
    NEXT_CA = "next-ca"
    RA = "ra"
    OCSP = "ocsp"


@dataclass(frozen=True)
class KeySpec:
    """What key to generate: kty 'RSA' (size 2048/3072/4096) or 'EC' (curve 'P-256'/'P-384'); hsm for Key Vault."""

    kty: str = "RSA"
    size: int = 2048
    curve: str = "P-256"
    hsm: bool = False


@dataclass(frozen=True)
class PendingKey:
    """A freshly generated key that has no certificate yet.

    signer signs with the new key (a self-signed root needs it); csr_der is the backend's CSR for that key
    (Key Vault makes one; the local backend builds one), which an external CA signs for a subordinate.
    """

    slot: Slot
    public_key_der: bytes
    csr_der: bytes
    signer: KeyHandle


@dataclass(frozen=True)
class KeyInfo:
    """One certificate and key as `scep ca show` reports it."""

    slot: Slot
    certificate: x509.Certificate
    key_type: str
    hardware: bool
    version: str


class KeyHome(Custody, Protocol):
    """Custody plus the CA lifecycle operations `scep ca` needs; implemented by every custody backend."""

    def exists(self, slot: Slot) -> bool: ...

    def handle(self, slot: Slot) -> KeyHandle:
        """The live key of a slot (the CA key is needed to issue the RA before CaKeys can be built)."""
        ...

    def begin(self, slot: Slot, spec: KeySpec, subject: x509.Name) -> PendingKey:
        """Generate a key for slot (a new version if the slot exists); it stays pending until complete()."""
        ...

    def pending(self, slot: Slot) -> PendingKey | None: ...

    def complete(self, slot: Slot, certificate: x509.Certificate, chain: list[x509.Certificate]) -> None:
        """Attach the certificate (and its chain above it) to the pending key of slot, making it live."""
        ...

    def promote(self) -> None:
        """Make the next CA the current one; the previous current CA becomes retired."""
        ...

    def attach_ra_encryption(self, certificate: x509.Certificate) -> None:
        """Keep an encryption-only certificate over the current RA's key beside the RA (replacing any earlier one)."""
        ...

    def ocsp_signer(self) -> KeyHandle | None:
        """The delegated OCSP signer (EKU id-kp-OCSPSigning, issued by the current CA), None until one is issued.

        Read from the backend at each call (the enrollment path never needs it; the OCSP responder caches it)."""
        ...

    def retired_handle(self, certificate: x509.Certificate) -> KeyHandle:
        """The key of a retired CA (one of keys().retired): it still signs CRLs and OCSP answers for the
        certificates it issued until they expire. CustodyError when that key is gone."""
        ...

    def inventory(self) -> list[KeyInfo]: ...
