"""Key custody in Azure Key Vault: the CA and the RA each live in a Key Vault *certificate* whose key is
generated inside the vault and never exported.

Layout in the vault:
  certificate <ca_name>   versions of the CA; the tag scep-role says what each version is:
                          current (the issuing CA; the newest such version wins), next (rolled over,
                          served by GetNextCACert), retired (an earlier CA), pending (waiting for its
                          certificate), bootstrap (a short-lived helper version, see begin()).
  certificate <ra_name>   versions of the RA, tagged the same way (current is the live RA).
  certificate <ocsp_name> versions of the delegated OCSP signer (digitalSignature; EKU OCSPSigning), tagged
                          the same way; optional (without it the CA key signs OCSP answers).
  secret <ca_name>-chain-<version>
                          the PEM certificates above that CA version (subordinate CA only). Key Vault
                          stores a merged chain inside the certificate's own secret, but GET certificate
                          returns only the leaf, so the chain is kept next to it.
  secret <ra_name>-encryption-<version>
                          the RA version's encryption-only certificate (PEM, keyEncipherment only, over the
                          same key: unwrapKey works for it); the RA version's tag scep-encryption says it exists.

Warm path: certificates and CryptographyClients are cached per process, CryptographyClients are built
from the key id and the public key in the certificate (no key GET), so an enrollment costs exactly the
key operations it needs (unwrapKey, sign the certificate, sign the CertRep). Every `refresh_interval`
seconds, keys() lists the versions of both certificates (two cheap calls) to notice a rollover, a
promote or a new RA made by another instance.

Key operations: the RA key unwraps with unwrapKey, which the RA certificate's keyEncipherment key usage
grants (Key Vault maps keyEncipherment to wrapKey/unwrapKey and dataEncipherment to encrypt/decrypt, so
`decrypt` is refused). sign and unwrapKey are retried here, not by azure-core: azure-core's RetryPolicy
retries a POST only on 500/503/504 or when Retry-After is present, and never after a connection error,
while Key Vault's 429 on key operations carries no Retry-After. Both are safe to repeat; the retries stop
at the deadline of the caller's time budget (scep.keys.time_budget), see docs/keyvault.md.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from scep.azure import telemetry
from scep.azure.errors import describe, first_line, translated
from scep.keys import (
    CaKeys,
    CustodyError,
    KeyInfo,
    KeyOperationForbidden,
    KeySpec,
    KeyTransport,
    PendingKey,
    SignaturePadding,
    Slot,
    current_deadline,
    encryption_twin,
)

if TYPE_CHECKING:
    from scep.azure.vault_clients import KeyVaultClients

log = logging.getLogger(__name__)

TAG_ROLE = "scep-role"
TAG_SLOT = "scep-slot"
TAG_CHAIN = "scep-chain"
TAG_SIGNER = "scep-signer"
TAG_ENCRYPTION = "scep-encryption"
ROLE_CURRENT = "current"
ROLE_NEXT = "next"
ROLE_RETIRED = "retired"
ROLE_PENDING = "pending"
ROLE_BOOTSTRAP = "bootstrap"
ROLE_SUPERSEDED = "superseded"
CHAIN_IN_SECRET = "secret"
CHAIN_NONE = "none"

DEFAULT_REFRESH_SECONDS = 300.0
_HASH_SIZES = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}
# curve -> (Key Vault algorithm, digest bytes it takes, bytes of r and of s in its raw signature): ES512 takes a
# SHA-512 digest (64 bytes) and answers r||s of 66 bytes each (P-521 coordinates).
_EC_ALGORITHMS = {
    "secp256r1": ("ES256", 32, 32),
    "secp384r1": ("ES384", 48, 48),
    "secp521r1": ("ES512", 64, 66),
}
_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}

# Retries of key operations (sign, unwrapKey): which answers are worth another try, and how long to wait.
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
DEFAULT_BUDGET_SECONDS = 20.0  # when the caller set no time budget (CLI, doctor)
FIRST_BACKOFF_SECONDS = 0.05
MAX_BACKOFF_SECONDS = 2.0
LAST_ATTEMPT_SECONDS = 0.1  # no retry starts with less time than this left

T = TypeVar("T")


def _vault_call(what: str, call: Callable[[], T]) -> T:
    """Run one Key Vault call; whatever still fails after the SDK's retries becomes a CustodyError."""
    with translated(lambda detail: CustodyError(f"Key Vault {what} failed ({detail})")):
        return call()


def _custody_error(what: str, error: Exception) -> CustodyError:
    return CustodyError(f"Key Vault {what} failed ({describe(error)})")


def _inner_error_code(error: Any) -> str:
    """Key Vault's error.innererror.code (KeyOperationForbidden, KeyDisabled, ForbiddenByRbac...), if any."""
    try:
        return str(error.response.json()["error"]["innererror"]["code"])
    except Exception:  # no response, no JSON, or no innererror
        return ""


def _retry_after(error: Any) -> float | None:
    try:
        return max(0.0, float(error.response.headers["Retry-After"]))
    except Exception:  # absent (Key Vault's usual 429) or an HTTP date
        return None


def _backoff(attempt: int) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(max, first * 2^attempt)]."""
    return random.uniform(0.0, min(MAX_BACKOFF_SECONDS, FIRST_BACKOFF_SECONDS * 2**attempt))


def _public_jwk(key_id: str, certificate: x509.Certificate) -> dict[str, Any]:
    """The public half of the key as a JsonWebKey, so the SDK needs no key GET before sign/unwrapKey."""
    public = certificate.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        numbers = public.public_numbers()
        return {
            "kid": key_id,
            "kty": "RSA",
            "key_ops": ["sign", "verify", "decrypt", "encrypt", "unwrapKey", "wrapKey"],
            "n": numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big"),
            "e": numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big"),
        }
    if isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name in _CURVE_NAMES:
        numbers = public.public_numbers()
        size = (public.curve.key_size + 7) // 8
        return {
            "kid": key_id,
            "kty": "EC",
            "key_ops": ["sign", "verify"],
            "crv": _CURVE_NAMES[public.curve.name],
            "x": numbers.x.to_bytes(size, "big"),
            "y": numbers.y.to_bytes(size, "big"),
        }
    raise CustodyError(f"unsupported key type in certificate for {key_id}")


def _ec_digest_for(digest: bytes, size: int) -> bytes:
    """Fit a digest to the curve's ESxxx input size without changing the ECDSA result.

    ECDSA uses the leftmost curve-size bits of the hash (truncation), and a shorter hash as an integer
    is unchanged by leading zero bytes, so Key Vault's fixed-size ES256/ES384/ES512 inputs can carry
    any hash.
    """
    if len(digest) >= size:
        return digest[:size]
    return bytes(size - len(digest)) + digest


class KeyVaultKeyHandle:
    """One Key Vault key (the key of one certificate version) and its certificate.

    key_operations reads the key's key_ops from the vault (a key GET), to explain a KeyOperationForbidden.
    """

    def __init__(
        self,
        certificate: x509.Certificate,
        key_id: str,
        crypto_client: Any,
        version: str,
        key_operations: Callable[[], list[str]],
        timeouts: tuple[float, float] = (10.0, 30.0),
    ) -> None:
        self._certificate = certificate
        self.key_id = key_id
        self.version = version
        self._crypto = crypto_client
        self._key_operations = key_operations
        self._timeouts = timeouts

    @property
    def certificate(self) -> x509.Certificate:
        return self._certificate

    def sign_digest(
        self, digest: bytes, hash_name: str, padding: SignaturePadding = SignaturePadding.PKCS1V15
    ) -> bytes:
        expected = _HASH_SIZES.get(hash_name)
        if expected is None or len(digest) != expected:
            raise CustodyError(f"digest does not match hash {hash_name!r}")
        public = self._certificate.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            return self._sign_rsa(digest, hash_name, padding)
        if isinstance(public, ec.EllipticCurvePublicKey):
            return self._sign_ec(digest, public.curve.name)
        raise CustodyError("unsupported key type")

    def _sign_rsa(self, digest: bytes, hash_name: str, padding: SignaturePadding) -> bytes:
        if hash_name == "sha1":
            raise CustodyError("Key Vault signs SHA-256, SHA-384 or SHA-512 digests with RSA keys, not SHA-1")
        prefix = "PS" if padding == SignaturePadding.PSS else "RS"
        from azure.keyvault.keys.crypto import SignatureAlgorithm

        algorithm = SignatureAlgorithm(f"{prefix}{hash_name.removeprefix('sha')}")
        result = self._key_operation("sign", lambda **options: self._crypto.sign(algorithm, digest, **options))
        return bytes(result.signature)

    def _sign_ec(self, digest: bytes, curve_name: str) -> bytes:
        if curve_name not in _EC_ALGORITHMS:
            raise CustodyError(f"unsupported curve {curve_name}")
        from azure.keyvault.keys.crypto import SignatureAlgorithm

        name, digest_size, size = _EC_ALGORITHMS[curve_name]
        algorithm = SignatureAlgorithm(name)
        fitted = _ec_digest_for(digest, digest_size)
        result = self._key_operation("sign", lambda **options: self._crypto.sign(algorithm, fitted, **options))
        raw = bytes(result.signature)
        if len(raw) != 2 * size:
            raise CustodyError(f"Key Vault returned a {len(raw)}-byte ECDSA signature, expected {2 * size}")
        return encode_dss_signature(int.from_bytes(raw[:size], "big"), int.from_bytes(raw[size:], "big"))

    def unwrap_key(self, wrapped_key: bytes, transport: KeyTransport) -> bytes:
        if not isinstance(self._certificate.public_key(), rsa.RSAPublicKey):
            raise CustodyError("only RSA keys unwrap key-transport blobs")
        from azure.keyvault.keys.crypto import KeyWrapAlgorithm

        algorithm = KeyWrapAlgorithm(KeyTransport(transport).value)
        try:
            result = self._key_operation(
                "unwrapKey", lambda **options: self._crypto.unwrap_key(algorithm, wrapped_key, **options)
            )
        except CustodyError as error:
            # A blob Key Vault cannot unwrap gets its 400 BadParameter, which the caller reports like any bad
            # blob; anything else (refused, throttled, unreachable) is not the sender's doing: say so.
            if "(HTTP 400)" not in str(error):
                log.warning("RA key could not unwrap: %s", error)
            raise
        return bytes(result.key)

    def _key_operation(self, what: str, call: Callable[..., T]) -> T:
        """One sign or unwrapKey, repeated on 429, 5xx and connection failures until the time budget runs out.

        Both operations are safe to repeat (a signature or an unwrapped key sent twice changes nothing).
        """
        from azure.core.exceptions import AzureError, HttpResponseError, ServiceRequestError, ServiceResponseError

        deadline = current_deadline() or time.monotonic() + DEFAULT_BUDGET_SECONDS
        attempt = 0
        while True:
            remaining = max(LAST_ATTEMPT_SECONDS, deadline - time.monotonic())
            connect, read = (min(limit, remaining) for limit in self._timeouts)
            try:
                with telemetry.keyvault_call(what):
                    return call(connection_timeout=connect, read_timeout=read)
            except HttpResponseError as error:
                if error.status_code == 403 and _inner_error_code(error) == "KeyOperationForbidden":
                    raise KeyOperationForbidden(
                        f"Key Vault {what} failed: the key does not permit {what}", what, self._key_operations
                    ) from error
                if error.status_code == 429:
                    telemetry.KEYVAULT_THROTTLED.add(1)
                if error.status_code not in RETRYABLE_STATUS:
                    raise _custody_error(what, error) from error
                failure: Exception = error
                delay = _retry_after(error)
            except (ServiceRequestError, ServiceResponseError) as error:
                failure, delay = error, None
            except (AzureError, ValueError) as error:
                raise _custody_error(what, error) from error
            left = deadline - time.monotonic() - LAST_ATTEMPT_SECONDS
            if left <= 0:
                raise _custody_error(f"{what} ({attempt + 1} attempts)", failure) from failure
            log.debug("Key Vault %s: attempt %d failed (%s), retrying", what, attempt + 1, first_line(failure))
            telemetry.KEYVAULT_RETRIES.add(1)
            time.sleep(min(left, _backoff(attempt) if delay is None else delay))
            attempt += 1


@dataclass(frozen=True)
class _Version:
    """What listing a certificate's versions tells about one version."""

    name: str
    version: str
    role: str
    slot: str
    enabled: bool
    created: float
    expires: float | None
    tags: dict[str, str]

    def fingerprint(self) -> tuple[Any, ...]:
        return (self.name, self.version, self.enabled, tuple(sorted(self.tags.items())))


def _newest(versions: Iterable[_Version], role: str, slot: str | None = None) -> _Version | None:
    matching = [
        item for item in versions if item.role == role and item.enabled and (slot is None or item.slot == slot)
    ]
    return max(matching, key=lambda item: item.created, default=None)


class KeyVaultHome:
    """KeyHome backed by Azure Key Vault certificates with non-exportable keys."""

    def __init__(
        self,
        clients: KeyVaultClients,
        ca_name: str = "scep-ca",
        ra_name: str = "scep-ra",
        *,
        ocsp_name: str = "scep-ocsp",  # the delegated OCSP signer's certificate (SCEP_OCSP_CERT_NAME)
        refresh_interval: float = DEFAULT_REFRESH_SECONDS,
        poll_interval: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clients = clients
        self.vault_url = clients.vault_url
        self.ca_name = ca_name
        self.ra_name = ra_name
        self.ocsp_name = ocsp_name
        self.refresh_interval = refresh_interval
        self.poll_interval = poll_interval
        self._clock = clock
        self._handles: dict[tuple[str, str], KeyVaultKeyHandle] = {}
        self._cached: CaKeys | None = None
        self._fingerprint: tuple[Any, ...] = ()
        self._next_check = 0.0
        self._lock = threading.Lock()

    # Clients (built by the vault's one client builder, on first use)

    @property
    def _certificates(self) -> Any:
        return self._clients.certificates()

    @property
    def _secrets(self) -> Any:
        return self._clients.secrets()

    @property
    def _keys(self) -> Any:
        return self._clients.keys()

    def _key_handle(self, certificate: x509.Certificate, key_id: str, version: str) -> KeyVaultKeyHandle:
        from azure.keyvault.keys import KeyVaultKey

        key = KeyVaultKey(key_id=key_id, jwk=_public_jwk(key_id, certificate))
        # the handle retries key operations itself, within the caller's time budget
        crypto = self._clients.cryptography(key, retry_total=0)
        return KeyVaultKeyHandle(
            certificate, key_id, crypto, version, lambda: self._key_operations_of(key_id), self._clients.timeouts
        )

    def _key_operations_of(self, key_id: str) -> list[str]:
        """The key_ops Key Vault holds for a key (what its certificate's key usage granted)."""
        name, version = key_id.rstrip("/").split("/")[-2:]
        key = _vault_call(f"get key {name}", lambda: self._keys.get_key(name, version))
        return [str(getattr(operation, "value", operation)) for operation in key.key_operations or []]

    # Custody

    def describe(self) -> str:
        return f"Azure Key Vault {self.vault_url} (CA certificate '{self.ca_name}', RA certificate '{self.ra_name}')"

    def keys(self) -> CaKeys:
        cached = self._cached
        if cached is not None and self._clock() < self._next_check:
            return cached
        if cached is not None and not self._lock.acquire(blocking=False):
            return cached  # another thread is refreshing; keep serving what we have
        if cached is None:
            self._lock.acquire()
        try:
            return self._refresh()
        finally:
            self._lock.release()

    def invalidate(self) -> None:
        """Forget the cached view so the next keys() reads the vault again."""
        with self._lock:
            self._cached = None
            self._fingerprint = ()

    def _refresh(self) -> CaKeys:
        cached = self._cached
        try:
            versions = self._list_versions(self.ca_name) + self._list_versions(self.ra_name)
        except CustodyError:
            if cached is None:
                raise
            log.warning("Key Vault refresh check failed; serving the cached CA and RA", exc_info=True)
            self._next_check = self._clock() + min(self.refresh_interval, 30.0)
            return cached
        fingerprint = tuple(sorted(item.fingerprint() for item in versions))
        if cached is None or fingerprint != self._fingerprint:
            cached = self._build(versions)
            self._cached = cached
            self._fingerprint = fingerprint
        self._next_check = self._clock() + self.refresh_interval
        return cached

    def _build(self, versions: list[_Version]) -> CaKeys:
        ca_versions = [item for item in versions if item.name == self.ca_name]
        ra_versions = [item for item in versions if item.name == self.ra_name]
        current = _newest(ca_versions, ROLE_CURRENT)
        ra = _newest(ra_versions, ROLE_CURRENT)
        if current is None:
            raise CustodyError(
                f"Key Vault certificate '{self.ca_name}' has no current CA version; run `scep ca init`"
            )
        if ra is None:
            raise CustodyError(
                f"Key Vault certificate '{self.ra_name}' has no current RA version; run `scep ca ra issue`"
            )
        next_ca = _newest(ca_versions, ROLE_NEXT)
        now = time.time()
        retired = [
            self._handle(item).certificate
            for item in sorted(ca_versions, key=lambda entry: entry.created, reverse=True)
            if item.role == ROLE_RETIRED and (item.expires is None or item.expires > now)
        ]
        return CaKeys(
            ca=self._handle(current),
            ra=self._handle(ra),
            next_ca=self._handle(next_ca) if next_ca is not None else None,
            chain=tuple(self._chain(current)),
            retired=tuple(retired),
            ra_encryption=self._ra_encryption(ra),
        )

    # The delegated OCSP signer and the keys of retired CAs (they sign CRLs and OCSP answers)

    def _ocsp_versions(self) -> list[_Version]:
        return self._list_versions(self.ocsp_name)

    def ocsp_signer(self) -> KeyVaultKeyHandle | None:
        """Read from the vault now (one listing); the OCSP responder caches what it gets."""
        current = _newest(self._ocsp_versions(), ROLE_CURRENT)
        return None if current is None else self._handle(current)

    def retired_handle(self, certificate: x509.Certificate) -> KeyVaultKeyHandle:
        for item in self._list_versions(self.ca_name):
            if item.role == ROLE_RETIRED and item.enabled and self._handle(item).certificate == certificate:
                return self._handle(item)
        raise CustodyError(f"Key Vault certificate '{self.ca_name}' has no retired version for that CA certificate")

    def _handle(self, item: _Version) -> KeyVaultKeyHandle:
        cache_key = (item.name, item.version)
        handle = self._handles.get(cache_key)
        if handle is None:
            bundle = _vault_call(
                f"get certificate {item.name}",
                lambda: self._certificates.get_certificate_version(item.name, item.version),
            )
            if not bundle.cer or not bundle.key_id:
                raise CustodyError(f"Key Vault certificate {item.name}/{item.version} has no certificate yet")
            certificate = x509.load_der_x509_certificate(bytes(bundle.cer))
            handle = self._key_handle(certificate, bundle.key_id, item.version)
            self._handles[cache_key] = handle
        return handle

    def _chain(self, item: _Version) -> list[x509.Certificate]:
        if item.tags.get(TAG_CHAIN) != CHAIN_IN_SECRET:
            return []
        return self._pem_secret(self._chain_secret_name(item.name, item.version))

    def _pem_secret(self, name: str) -> list[x509.Certificate]:
        secret = _vault_call(f"get secret {name}", lambda: self._secrets.get_secret(name))
        return x509.load_pem_x509_certificates(str(secret.value).encode("ascii"))

    @staticmethod
    def _chain_secret_name(certificate_name: str, version: str) -> str:
        return f"{certificate_name}-chain-{version}"

    # The RA's encryption-only certificate (a secret beside the RA version, like a CA's chain)

    def _ra_encryption(self, ra: _Version) -> x509.Certificate | None:
        if ra.tags.get(TAG_ENCRYPTION) != CHAIN_IN_SECRET:
            return None  # an RA issued before encryption certificates existed: served without one
        stored = self._pem_secret(self._encryption_secret_name(ra))
        return encryption_twin(self._handle(ra).certificate, stored[0] if stored else None)

    @staticmethod
    def _encryption_secret_name(ra: _Version) -> str:
        return f"{ra.name}-encryption-{ra.version}"

    def attach_ra_encryption(self, certificate: x509.Certificate) -> None:
        ra = _newest(self._list_versions(self.ra_name), ROLE_CURRENT)
        if ra is None or encryption_twin(self._handle(ra).certificate, certificate) is None:
            raise CustodyError("the encryption certificate is not over the current RA's key")
        name = self._encryption_secret_name(ra)
        pem = certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")
        _vault_call(
            f"store {name}", lambda: self._secrets.set_secret(name, pem, content_type="application/x-pem-file")
        )
        self._set_tags(ra, {**ra.tags, TAG_ENCRYPTION: CHAIN_IN_SECRET})
        self.invalidate()

    def _list_versions(self, name: str) -> list[_Version]:
        from azure.core.exceptions import ResourceNotFoundError

        def fetch() -> list[_Version]:
            try:
                listed = list(self._certificates.list_properties_of_certificate_versions(name))
            except ResourceNotFoundError:
                return []
            return [self._version_of(name, item) for item in listed if item.version]

        return _vault_call(f"list versions of {name}", fetch)

    @staticmethod
    def _version_of(name: str, properties: Any) -> _Version:
        tags = dict(properties.tags or {})
        created = properties.created_on.timestamp() if properties.created_on else 0.0
        expires = properties.expires_on.timestamp() if properties.expires_on else None
        return _Version(
            name=name,
            version=properties.version,
            role=tags.get(TAG_ROLE, ""),
            slot=tags.get(TAG_SLOT, ""),
            enabled=bool(properties.enabled),
            created=created,
            expires=expires,
            tags=tags,
        )

    # Lifecycle (KeyHome)

    def _name_for(self, slot: Slot) -> str:
        return {Slot.RA: self.ra_name, Slot.OCSP: self.ocsp_name}.get(slot, self.ca_name)

    @staticmethod
    def _live_role(slot: Slot) -> str:
        return ROLE_NEXT if slot == Slot.NEXT_CA else ROLE_CURRENT

    def exists(self, slot: Slot) -> bool:
        versions = self._list_versions(self._name_for(slot))
        return _newest(versions, self._live_role(slot)) is not None

    def handle(self, slot: Slot) -> KeyVaultKeyHandle:
        """The live key of slot, read from the vault now (the CLI needs the CA before an RA exists)."""
        name = self._name_for(slot)
        live = _newest(self._list_versions(name), self._live_role(slot))
        if live is None:
            raise CustodyError(f"Key Vault certificate '{name}' has no {slot.value} version")
        return self._handle(live)

    def begin(self, slot: Slot, spec: KeySpec, subject: x509.Name) -> PendingKey:
        """Create a new key version for slot and its CSR.

        Key Vault makes the CSR of an "Unknown"-issuer certificate, but the key of a certificate that is
        still pending is not reliably usable for signing, and a self-signed root must sign its own
        certificate before the merge. So the key is first born in a short-lived "Self" version (tagged
        bootstrap, disabled once the real certificate is merged), and the pending version reuses that key:
        the signer signs with the bootstrap version's key id, which holds the same key material.
        """
        name = self._name_for(slot)
        self._cancel_stale_pending(name)
        bootstrap = self._create_bootstrap(name, slot, spec, subject)
        operation = self._create_pending(name, slot, spec, subject, bootstrap.properties.version)
        return self._pending_key(slot, bytes(operation.csr), bootstrap)

    def _cancel_stale_pending(self, name: str) -> None:
        operation = self._get_operation(name)
        if operation is not None and (operation.status or "").lower() == "inprogress":
            _vault_call(
                f"cancel pending {name}", lambda: self._certificates.delete_certificate_operation(name)
            )

    def _policy(self, spec: KeySpec, subject: x509.Name, issuer: str, slot: Slot, reuse_key: bool) -> Any:
        from azure.keyvault.certificates import CertificateContentType, CertificatePolicy, KeyUsageType

        kty = spec.kty.upper()
        if kty not in ("RSA", "EC"):
            raise CustodyError(f"unsupported key type {spec.kty!r}")
        if slot == Slot.RA and kty != "RSA":
            raise CustodyError("the RA key must be RSA: it unwraps the keys of requests")
        usages = {
            Slot.RA: [KeyUsageType.digital_signature, KeyUsageType.key_encipherment],
            Slot.OCSP: [KeyUsageType.digital_signature],
        }.get(slot, [KeyUsageType.digital_signature, KeyUsageType.key_cert_sign, KeyUsageType.crl_sign])
        return CertificatePolicy(
            issuer_name=issuer,
            subject=subject.rfc4514_string(),
            exportable=False,
            key_type=f"{kty}-HSM" if spec.hsm else kty,
            key_size=spec.size if kty == "RSA" else None,
            key_curve_name=spec.curve if kty == "EC" else None,
            reuse_key=reuse_key,
            key_usage=usages,
            content_type=CertificateContentType.pem,
            validity_in_months=1 if issuer == "Self" else 12,
        )

    def _create_bootstrap(self, name: str, slot: Slot, spec: KeySpec, subject: x509.Name) -> Any:
        policy = self._policy(spec, subject, "Self", slot, reuse_key=False)
        tags = {TAG_ROLE: ROLE_BOOTSTRAP, TAG_SLOT: slot.value}

        def create() -> Any:
            poller = self._certificates.begin_create_certificate(
                name, policy, tags=tags, _polling_interval=self.poll_interval
            )
            return poller.result()

        created = _vault_call(f"create key for {name}", create)
        if not getattr(created, "key_id", None):
            status = getattr(created, "status", "unknown")
            raise CustodyError(f"Key Vault did not complete the key for {name} (status {status})")
        return created

    def _create_pending(
        self, name: str, slot: Slot, spec: KeySpec, subject: x509.Name, bootstrap_version: str
    ) -> Any:
        policy = self._policy(spec, subject, "Unknown", slot, reuse_key=True)
        tags = {TAG_ROLE: ROLE_PENDING, TAG_SLOT: slot.value, TAG_SIGNER: bootstrap_version}

        def create() -> Any:
            poller = self._certificates.begin_create_certificate(name, policy, tags=tags)
            return poller.result()

        operation = _vault_call(f"create CSR for {name}", create)
        if not getattr(operation, "csr", None):
            raise CustodyError(f"Key Vault returned no CSR for {name}")
        return operation

    def _pending_key(self, slot: Slot, csr_der: bytes, bootstrap: Any) -> PendingKey:
        certificate = x509.load_der_x509_certificate(bytes(bootstrap.cer))
        signer = self._key_handle(certificate, bootstrap.key_id, bootstrap.properties.version)
        csr = x509.load_der_x509_csr(csr_der)
        public_key_der = csr.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if public_key_der != certificate.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise CustodyError("Key Vault's CSR does not carry the bootstrap key")
        return PendingKey(slot=slot, public_key_der=public_key_der, csr_der=csr_der, signer=signer)

    def _get_operation(self, name: str) -> Any:
        from azure.core.exceptions import ResourceNotFoundError

        def fetch() -> Any:
            try:
                return self._certificates.get_certificate_operation(name)
            except ResourceNotFoundError:
                return None

        return _vault_call(f"get pending {name}", fetch)

    def _pending_version(self, slot: Slot) -> tuple[Any, _Version] | None:
        name = self._name_for(slot)
        operation = self._get_operation(name)
        if operation is None or (operation.status or "").lower() != "inprogress" or not operation.csr:
            return None
        versions = self._list_versions(name)
        pending = max(
            (item for item in versions if item.role == ROLE_PENDING),
            key=lambda item: item.created,
            default=None,
        )
        if pending is None or pending.slot != slot.value:
            return None
        return operation, pending

    def pending(self, slot: Slot) -> PendingKey | None:
        found = self._pending_version(slot)
        if found is None:
            return None
        operation, version = found
        name = self._name_for(slot)
        bootstrap_version = version.tags.get(TAG_SIGNER, "")
        bootstrap = _vault_call(
            f"get certificate {name}", lambda: self._certificates.get_certificate_version(name, bootstrap_version)
        )
        return self._pending_key(slot, bytes(operation.csr), bootstrap)

    def complete(self, slot: Slot, certificate: x509.Certificate, chain: list[x509.Certificate]) -> None:
        found = self._pending_version(slot)
        if found is None:
            raise CustodyError(f"no pending key for {slot.value}; run begin first")
        _, pending = found
        name = self._name_for(slot)
        if chain:
            pem = "".join(item.public_bytes(serialization.Encoding.PEM).decode("ascii") for item in chain)
            secret_name = self._chain_secret_name(name, pending.version)
            _vault_call(
                f"store chain {secret_name}",
                lambda: self._secrets.set_secret(secret_name, pem, content_type="application/x-pem-file"),
            )
        previous = self._list_versions(name)
        tags = {
            TAG_ROLE: self._live_role(slot),
            TAG_SLOT: slot.value,
            TAG_CHAIN: CHAIN_IN_SECRET if chain else CHAIN_NONE,
        }
        der_chain = [item.public_bytes(serialization.Encoding.DER) for item in [certificate, *chain]]
        _vault_call(
            f"merge certificate {name}",
            lambda: self._certificates.merge_certificate(name, der_chain, tags=tags, enabled=True),
        )
        self._retag_replaced(name, slot, previous, pending.version)
        self._retire_bootstrap(name, pending.tags.get(TAG_SIGNER, ""))
        self.invalidate()

    def _retag_replaced(self, name: str, slot: Slot, previous: list[_Version], new_version: str) -> None:
        """A new live version replaces the old one: a current CA becomes retired, anything else superseded."""
        live = self._live_role(slot)
        for item in previous:
            if item.version == new_version or item.role != live:
                continue
            role = ROLE_RETIRED if slot == Slot.CA else ROLE_SUPERSEDED
            self._set_role(item, role)

    def _retire_bootstrap(self, name: str, version: str) -> None:
        if not version:
            return
        _vault_call(
            f"disable bootstrap version of {name}",
            lambda: self._certificates.update_certificate_properties(
                name, version, enabled=False, tags={TAG_ROLE: ROLE_SUPERSEDED}
            ),
        )

    def _set_role(self, item: _Version, role: str) -> None:
        self._set_tags(item, {**item.tags, TAG_ROLE: role})

    def _set_tags(self, item: _Version, tags: dict[str, str]) -> None:
        _vault_call(
            f"tag {item.name}/{item.version}",
            lambda: self._certificates.update_certificate_properties(item.name, item.version, tags=tags),
        )

    def promote(self) -> None:
        versions = self._list_versions(self.ca_name)
        next_ca = _newest(versions, ROLE_NEXT)
        if next_ca is None:
            raise CustodyError(f"Key Vault certificate '{self.ca_name}' has no next CA to promote")
        # Tag the new current first: while both are tagged current, the newer one already wins.
        self._set_role(next_ca, ROLE_CURRENT)
        for item in versions:
            if item.role == ROLE_CURRENT and item.version != next_ca.version:
                self._set_role(item, ROLE_RETIRED)
        self.invalidate()

    def inventory(self) -> list[KeyInfo]:
        """The live keys: current CA, next CA (if any), the current RA and OCSP signer (retired CAs are in
        keys().retired)."""
        ca_versions = self._list_versions(self.ca_name)
        ra_versions = self._list_versions(self.ra_name)
        wanted = [
            (Slot.CA, _newest(ca_versions, ROLE_CURRENT)),
            (Slot.NEXT_CA, _newest(ca_versions, ROLE_NEXT)),
            (Slot.RA, _newest(ra_versions, ROLE_CURRENT)),
            (Slot.OCSP, _newest(self._ocsp_versions(), ROLE_CURRENT)),
        ]
        return [self._key_info(slot, item) for slot, item in wanted if item is not None]

    def _key_info(self, slot: Slot, item: _Version) -> KeyInfo:
        handle = self._handle(item)
        key_name = handle.key_id.rstrip("/").split("/")[-2]
        key = _vault_call(f"get key {key_name}", lambda: self._keys.get_key(key_name, item.version))
        kty = str(getattr(key.key_type, "value", key.key_type) or "")
        public = handle.certificate.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            description = f"RSA {public.key_size}"
        elif isinstance(public, ec.EllipticCurvePublicKey):
            description = f"EC {_CURVE_NAMES.get(public.curve.name, public.curve.name)}"
        else:
            description = kty
        return KeyInfo(
            slot=slot,
            certificate=handle.certificate,
            key_type=description,
            hardware=kty.upper().endswith("-HSM"),
            version=item.version,
        )
