"""Local key custody: PEM files in the data directory (the embedded default).

Layout of the directory: `<slot>.pem` (certificate), `<slot>.key` (private key, mode 0600), `<slot>.chain.pem`
(certificates above a subordinate CA), `<slot>.pending.key` (a key waiting for its certificate), `retired/`
(earlier CA certificates, each with its key `ca-<serial hex>.key`, which still signs CRLs and OCSP answers for
what it issued) and `ra.encryption.pem` (the RA's encryption-only certificate over `ra.key`). Slots are `ca`,
`next-ca`, `ra` and `ocsp` (the delegated OCSP signer).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, utils
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from scep.keys import (
    CaKeys,
    CustodyError,
    KeyInfo,
    KeySpec,
    KeyTransport,
    PendingKey,
    SignaturePadding,
    Slot,
    encryption_twin,
    hash_type,
    rsa_decrypt,
)

RELOAD_CHECK_SECONDS = 2.0
_CURVES = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1, "P-521": ec.SECP521R1}


@dataclass(frozen=True)
class LocalKey:
    """A KeyHandle over an in-process private key."""

    private_key: PrivateKeyTypes
    certificate: x509.Certificate

    def sign_digest(
        self, digest: bytes, hash_name: str, padding: SignaturePadding = SignaturePadding.PKCS1V15
    ) -> bytes:
        return sign_digest_with(self.private_key, digest, hash_name, padding)

    def unwrap_key(self, wrapped_key: bytes, transport: KeyTransport) -> bytes:
        if not isinstance(self.private_key, rsa.RSAPrivateKey):
            raise CustodyError("only RSA keys unwrap key-transport blobs")
        try:
            return rsa_decrypt(self.private_key, wrapped_key, transport)
        except ValueError:
            raise CustodyError("the key-transport blob does not unwrap") from None


def sign_digest_with(key: PrivateKeyTypes, digest: bytes, hash_name: str, padding: SignaturePadding) -> bytes:
    hash_algorithm = hash_type(hash_name)()
    prehashed = utils.Prehashed(hash_algorithm)
    if isinstance(key, rsa.RSAPrivateKey):
        if padding is SignaturePadding.PSS:
            pss = asym_padding.PSS(asym_padding.MGF1(hash_algorithm), len(digest))
            return key.sign(digest, pss, prehashed)
        return key.sign(digest, asym_padding.PKCS1v15(), prehashed)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(digest, ec.ECDSA(prehashed))
    raise CustodyError(f"unsupported key type {type(key).__name__}")


def generate_private_key(spec: KeySpec) -> PrivateKeyTypes:
    if spec.kty.upper().startswith("RSA"):
        if spec.size not in (2048, 3072, 4096):
            raise ValueError("RSA key size must be 2048, 3072 or 4096")
        return rsa.generate_private_key(public_exponent=65537, key_size=spec.size)
    if spec.kty.upper().startswith("EC"):
        if spec.curve not in _CURVES:
            raise ValueError(f"EC curve must be one of {', '.join(_CURVES)}")
        return ec.generate_private_key(_CURVES[spec.curve]())
    raise ValueError("key type must be RSA or EC")


class LocalHome:
    """KeyHome over PEM files; safe for several worker processes reading the same directory."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._cached: CaKeys | None = None
        self._stamp: tuple = ()
        self._checked = 0.0

    def describe(self) -> str:
        return f"local PEM files in {self.directory}"

    def keys(self) -> CaKeys:
        now = time.monotonic()
        if self._cached is not None and now - self._checked < RELOAD_CHECK_SECONDS:
            return self._cached
        with self._lock:
            stamp = self._file_stamp()
            if self._cached is None or stamp != self._stamp:
                self._cached = self._load()
                self._stamp = stamp
            self._checked = now
            return self._cached

    def exists(self, slot: Slot) -> bool:
        return self._path(slot, ".pem").exists() and self._path(slot, ".key").exists()

    def begin(self, slot: Slot, spec: KeySpec, subject: x509.Name) -> PendingKey:
        if spec.hsm:
            raise CustodyError("local custody has no HSM: use Key Vault (KEY_VAULT_URL) for HSM-backed keys")
        key = generate_private_key(spec)
        self._ensure_directory()
        _write_private(self._path(slot, ".pending.key"), _key_pem(key))
        _write_public(self._path(slot, ".pending.csr"), _self_csr(key, subject))
        pending = self.pending(slot)
        assert pending is not None
        return pending

    def pending(self, slot: Slot) -> PendingKey | None:
        path = self._path(slot, ".pending.key")
        if not path.exists():
            return None
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        csr = self._path(slot, ".pending.csr").read_bytes()
        return PendingKey(slot=slot, public_key_der=_spki(key.public_key()), csr_der=csr, signer=_PendingSigner(key))

    def complete(self, slot: Slot, certificate: x509.Certificate, chain: list[x509.Certificate]) -> None:
        pending_path = self._path(slot, ".pending.key")
        key = serialization.load_pem_private_key(pending_path.read_bytes(), password=None)
        if _spki(key.public_key()) != _spki(certificate.public_key()):
            raise CustodyError("the certificate does not match the pending key")
        if slot is Slot.CA and self.exists(Slot.CA):
            self._retire(self._path(Slot.CA, ".pem"))
        _write_public(self._path(slot, ".pem"), certificate.public_bytes(serialization.Encoding.PEM))
        chain_path = self._path(slot, ".chain.pem")
        if chain:
            _write_public(chain_path, b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))
        elif chain_path.exists():
            chain_path.unlink()
        os.replace(pending_path, self._path(slot, ".key"))
        self._path(slot, ".pending.csr").unlink(missing_ok=True)
        self._invalidate()

    def promote(self) -> None:
        if not self.exists(Slot.NEXT_CA):
            raise CustodyError("there is no next CA to promote: run `scep ca rollover` first")
        self._retire(self._path(Slot.CA, ".pem"))
        for suffix in (".pem", ".key", ".chain.pem"):
            source = self._path(Slot.NEXT_CA, suffix)
            target = self._path(Slot.CA, suffix)
            if source.exists():
                os.replace(source, target)
            elif target.exists():
                target.unlink()
        self._invalidate()

    def inventory(self) -> list[KeyInfo]:
        found = []
        for slot in Slot:
            if self.exists(slot):
                handle = self.handle(slot)
                found.append(
                    KeyInfo(slot, handle.certificate, _key_type(handle.private_key), False, _version(handle))
                )
        for certificate in self._retired():
            found.append(KeyInfo(Slot.CA, certificate, _key_type(certificate.public_key()), False, "retired"))
        return found

    def _load(self) -> CaKeys:
        if not (self.exists(Slot.CA) and self.exists(Slot.RA)):
            raise CustodyError(f"no CA and RA in {self.directory}: run `scep ca init` (or `scep serve`)")
        next_ca = self.handle(Slot.NEXT_CA) if self.exists(Slot.NEXT_CA) else None
        ra = self.handle(Slot.RA)
        return CaKeys(
            ca=self.handle(Slot.CA),
            ra=ra,
            next_ca=next_ca,
            chain=tuple(self._chain(Slot.CA)),
            retired=tuple(c for c in self._retired() if c.not_valid_after_utc > _utcnow()),
            ra_encryption=encryption_twin(ra.certificate, self._ra_encryption()),
        )

    def ocsp_signer(self) -> LocalKey | None:
        return self.handle(Slot.OCSP) if self.exists(Slot.OCSP) else None

    def retired_handle(self, certificate: x509.Certificate) -> LocalKey:
        key_path = self.directory / "retired" / f"ca-{certificate.serial_number:x}.key"
        if not key_path.exists():
            raise CustodyError(f"the key of retired CA {certificate.subject.rfc4514_string()} is not in {key_path}")
        return LocalKey(serialization.load_pem_private_key(key_path.read_bytes(), password=None), certificate)

    def attach_ra_encryption(self, certificate: x509.Certificate) -> None:
        if encryption_twin(self.handle(Slot.RA).certificate, certificate) is None:
            raise CustodyError("the encryption certificate is not over the current RA's key")
        _write_public(self._ra_encryption_path(), certificate.public_bytes(serialization.Encoding.PEM))
        self._invalidate()

    def _ra_encryption(self) -> x509.Certificate | None:
        """The RA's encryption certificate; one left over from an earlier RA key is ignored by encryption_twin."""
        path = self._ra_encryption_path()
        return x509.load_pem_x509_certificate(path.read_bytes()) if path.exists() else None

    def _ra_encryption_path(self) -> Path:
        return self._path(Slot.RA, ".encryption.pem")

    def handle(self, slot: Slot) -> LocalKey:
        key = serialization.load_pem_private_key(self._path(slot, ".key").read_bytes(), password=None)
        certificate = x509.load_pem_x509_certificate(self._path(slot, ".pem").read_bytes())
        return LocalKey(key, certificate)

    def _chain(self, slot: Slot) -> list[x509.Certificate]:
        path = self._path(slot, ".chain.pem")
        return x509.load_pem_x509_certificates(path.read_bytes()) if path.exists() else []

    def _retired(self) -> list[x509.Certificate]:
        folder = self.directory / "retired"
        if not folder.is_dir():
            return []
        return [x509.load_pem_x509_certificate(p.read_bytes()) for p in sorted(folder.glob("*.pem"))]

    def _retire(self, certificate_path: Path) -> None:
        folder = self.directory / "retired"
        folder.mkdir(mode=0o700, exist_ok=True)
        certificate = x509.load_pem_x509_certificate(certificate_path.read_bytes())
        target = folder / f"ca-{certificate.serial_number:x}.pem"
        _write_public(target, certificate_path.read_bytes())
        key_path = certificate_path.with_suffix(".key")
        if key_path.exists():
            os.replace(key_path, target.with_suffix(".key"))

    def _path(self, slot: Slot, suffix: str) -> Path:
        return self.directory / f"{slot.value}{suffix}"

    def _ensure_directory(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _file_stamp(self) -> tuple:
        stamp = []
        for path in [*(self._path(slot, ".pem") for slot in Slot), self._ra_encryption_path()]:
            try:
                stat = path.stat()
                stamp.append((path.name, stat.st_mtime_ns, stat.st_ino))
            except FileNotFoundError:
                stamp.append((path.name, None, None))
        return tuple(stamp)

    def _invalidate(self) -> None:
        with self._lock:
            self._cached = None
            self._checked = 0.0


@dataclass(frozen=True)
class _PendingSigner:
    """Signs with a pending key (a self-signed root signs its own certificate before it has one)."""

    private_key: PrivateKeyTypes

    @property
    def certificate(self) -> x509.Certificate:
        raise CustodyError("a pending key has no certificate yet")

    def sign_digest(
        self, digest: bytes, hash_name: str, padding: SignaturePadding = SignaturePadding.PKCS1V15
    ) -> bytes:
        return sign_digest_with(self.private_key, digest, hash_name, padding)

    def unwrap_key(self, wrapped_key: bytes, transport: KeyTransport) -> bytes:
        raise CustodyError("a pending key does not unwrap")


def _self_csr(key: PrivateKeyTypes, subject: x509.Name) -> bytes:
    digest = hashes.SHA384() if isinstance(key, ec.EllipticCurvePrivateKey) else hashes.SHA256()
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    return builder.sign(key, digest).public_bytes(serialization.Encoding.DER)


def _key_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _write_private(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _write_public(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)


def _key_type(key) -> str:
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return f"RSA {key.key_size}"
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        return f"EC {key.curve.name}"
    return type(key).__name__


def _version(handle: LocalKey) -> str:
    return f"{handle.certificate.serial_number:x}"[:16]


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)
