"""The CA lifecycle, one implementation for every custody backend: init, subordinate, RA, OCSP signer, rollover,
promote.

The delegated OCSP signer (`issue_ocsp_signer`) is optional: without one (or once it has expired) the OCSP
responder signs with the CA key itself, which RFC 6960 section 4.2.2.2 allows. It is short-lived (90 days by
default) because it carries id-pkix-ocsp-nocheck and so cannot itself be revoked; promote issues a new one under
the new CA when one existed.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from scep.core.issuer import (
    ca_certificate,
    is_ca_certificate,
    ocsp_signer_certificate,
    ra_certificate,
    sign_certificate,
)
from scep.keys import CustodyError, KeyHandle, KeyHome, KeySpec, Slot

log = logging.getLogger("scep.core.ca")

DEFAULT_CA_SUBJECT = "CN=SCEP Root CA,O=scep-intune-ca"
DEFAULT_RA_SUBJECT = "CN=SCEP RA,O=scep-intune-ca"
DEFAULT_OCSP_SUBJECT = "CN=SCEP OCSP Responder,O=scep-intune-ca"
DEFAULT_OCSP_DAYS = 90
RA_MIN_RSA_BITS = 2048
ENCRYPTION_SERIAL_ATTEMPTS = 16
SERIAL_MAX_BITS = 159  # 20 octets with the sign bit clear (RFC 5280 section 4.1.2.2)
ENCRYPTION_ONLY = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=True,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


class LifecycleError(Exception):
    """The operation would be unsafe or is out of order; the message says what to do."""


@dataclass(frozen=True)
class CaOptions:
    subject: str = DEFAULT_CA_SUBJECT
    days: int = 3650
    spec: KeySpec = KeySpec()


def parse_subject(subject: str) -> x509.Name:
    try:
        name = x509.Name.from_rfc4514_string(subject)
    except ValueError as error:
        raise LifecycleError(f"not a distinguished name: {subject!r} ({error})") from None
    if len(name) == 0:
        raise LifecycleError("the subject must not be empty")
    return name


def init_root(home: KeyHome, options: CaOptions, force: bool = False) -> x509.Certificate:
    """A self-signed root whose key the backend generates (and, for Key Vault, never exports)."""
    if home.exists(Slot.CA) and not force:
        raise LifecycleError("a CA already exists: pass --force to replace it (devices must then trust the new CA)")
    certificate = _self_signed(home, Slot.CA, options)
    issue_ra(home)
    issue_ocsp_signer(home)
    return certificate


def init_subordinate(home: KeyHome, options: CaOptions, force: bool = False) -> bytes:
    """Generate the CA key and return a CSR (DER) for an enterprise root to sign; `import_signed` finishes."""
    if home.exists(Slot.CA) and not force:
        raise LifecycleError("a CA already exists: pass --force to replace it")
    pending = home.begin(Slot.CA, options.spec, parse_subject(options.subject))
    return pending.csr_der


def import_signed(home: KeyHome, certificate: x509.Certificate, chain: list[x509.Certificate]) -> None:
    """Attach an externally signed CA certificate (and its chain up to the root) to the pending CA key."""
    slot = Slot.CA if home.pending(Slot.CA) is not None else Slot.NEXT_CA
    if home.pending(slot) is None:
        raise LifecycleError(
            "no pending CA key: run `scep ca init --subordinate` (or `scep ca rollover --subordinate`) first"
        )
    if not is_ca_certificate(certificate):
        raise LifecycleError("the imported certificate is not a CA certificate (basicConstraints CA:true)")
    home.complete(slot, certificate, chain)
    if slot is Slot.CA:
        issue_ra(home)
        issue_ocsp_signer(home)


def issue_ra(home: KeyHome, subject: str = DEFAULT_RA_SUBJECT, days: int = 730) -> x509.Certificate:
    """Issue (or renew, with a new key) the RA certificate under the current CA, and its encryption certificate."""
    certificate, ca = _issue_under_ca(home, Slot.RA, ra_spec, subject, days, ra_certificate)
    _attach_encryption(home, certificate, ca)
    return certificate


def issue_ocsp_signer(
    home: KeyHome, subject: str = DEFAULT_OCSP_SUBJECT, days: int = DEFAULT_OCSP_DAYS
) -> x509.Certificate:
    """Issue (or renew, with a new key) the delegated OCSP signer under the current CA."""
    return _issue_under_ca(home, Slot.OCSP, signer_spec, subject, days, ocsp_signer_certificate)[0]


def _issue_under_ca(
    home: KeyHome,
    slot: Slot,
    spec_for: Callable[[x509.Certificate, KeyHome], KeySpec],
    subject: str,
    days: int,
    build: Callable[[x509.Name, Any, KeyHandle, int], x509.Certificate],
) -> tuple[x509.Certificate, KeyHandle]:
    """A new key in slot and its certificate, issued by the current CA; (certificate, the CA's handle)."""
    if not home.exists(Slot.CA):
        raise LifecycleError("there is no CA: run `scep ca init` first")
    ca = home.handle(Slot.CA)
    name = parse_subject(subject)
    pending = home.begin(slot, spec_for(ca.certificate, home), name)
    certificate = build(name, serialization.load_der_public_key(pending.public_key_der), ca, days)
    home.complete(slot, certificate, [])
    return certificate, ca


def signer_spec(ca: x509.Certificate, home: KeyHome) -> KeySpec:
    """The OCSP signer's key: the CA's kind and size (or curve), in an HSM when the CA key is."""
    public_key = ca.public_key()
    hardware = any(info.hardware for info in home.inventory() if info.slot is Slot.CA)
    if isinstance(public_key, rsa.RSAPublicKey):
        return KeySpec(kty="RSA", size=max(public_key.key_size, RA_MIN_RSA_BITS), hsm=hardware)
    curve = {"secp384r1": "P-384"}.get(public_key.curve.name, "P-256")
    return KeySpec(kty="EC", curve=curve, hsm=hardware)


def ra_encryption_certificate(ra: x509.Certificate, ca: KeyHandle) -> x509.Certificate:
    """The RA's twin with keyEncipherment only: same subject, key, validity and extensions, its own serial.

    Clients written for Microsoft NDES encrypt to the certificate with keyEncipherment and without
    digitalSignature; Apple needs the RA itself to carry both, so the RA cannot be that certificate.
    GetCACert's certificates are a DER SET OF, sorted by encoding, and clients that take the first non-CA
    certificate as the RA must keep finding the signing RA. So the twin's serial is random and 20 octets long
    (RFC 5280's maximum; the RA's has at most 17): a longer encoding sorts later. Only an ECDSA signature shorter
    by more than the serial's lead can undo that; the twin is then signed again (a new serial and signature)."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(ra.subject)
        .issuer_name(ra.issuer)
        .public_key(ra.public_key())
        .not_valid_before(ra.not_valid_before_utc)
        .not_valid_after(ra.not_valid_after_utc)
    )
    for extension in ra.extensions:
        value = ENCRYPTION_ONLY if isinstance(extension.value, x509.KeyUsage) else extension.value
        builder = builder.add_extension(value, extension.critical)
    ra_der = ra.public_bytes(serialization.Encoding.DER)
    for _ in range(ENCRYPTION_SERIAL_ATTEMPTS):
        certificate = sign_certificate(builder.serial_number(_twenty_octet_serial()), ca)
        if certificate.public_bytes(serialization.Encoding.DER) > ra_der:
            return certificate
    raise LifecycleError("could not find a serial number that orders the encryption certificate after the RA")


def _twenty_octet_serial() -> int:
    """A positive random serial whose DER INTEGER takes exactly 20 octets (159 bits, the top one set)."""
    return secrets.randbits(SERIAL_MAX_BITS - 1) | (1 << (SERIAL_MAX_BITS - 1))


def _attach_encryption(home: KeyHome, ra: x509.Certificate, ca: KeyHandle) -> None:
    """Issue and store the RA's encryption certificate; the RA works without it, so a failure only warns."""
    try:
        home.attach_ra_encryption(ra_encryption_certificate(ra, ca))
    except (CustodyError, LifecycleError) as error:
        log.warning(
            "the RA is issued, but its encryption-only certificate could not be stored (%s): clients that pick "
            "the RA by key usage (written for NDES) are refused until `scep ca ra renew` stores one (in Key "
            "Vault this needs Key Vault Secrets Officer)",
            error,
        )


def ra_spec(ca: x509.Certificate, home: KeyHome) -> KeySpec:
    """The RA is as strong as the CA: RSA (SCEP key transport needs it) of the CA's size, at least 2048 bits,
    in an HSM when the CA key is."""
    public_key = ca.public_key()
    size = public_key.key_size if isinstance(public_key, rsa.RSAPublicKey) else RA_MIN_RSA_BITS
    hardware = any(info.hardware for info in home.inventory() if info.slot is Slot.CA)
    return KeySpec(kty="RSA", size=max(size, RA_MIN_RSA_BITS), hsm=hardware)


def rollover(home: KeyHome, options: CaOptions) -> x509.Certificate:
    """Create the next CA (served by GetNextCACert) beside the current one."""
    _require_current(home)
    return _self_signed(home, Slot.NEXT_CA, options)


def rollover_subordinate(home: KeyHome, options: CaOptions) -> bytes:
    """Generate the next CA's key and return its CSR (DER) for the enterprise root; `import_signed` finishes."""
    _require_current(home)
    return home.begin(Slot.NEXT_CA, options.spec, parse_subject(options.subject)).csr_der


def _require_current(home: KeyHome) -> None:
    if not home.exists(Slot.CA):
        raise LifecycleError("there is no CA to roll over: run `scep ca init` first")


def promote(home: KeyHome) -> x509.Certificate:
    """Make the next CA current and issue a new RA under it."""
    if not home.exists(Slot.NEXT_CA):
        raise LifecycleError("there is no next CA: run `scep ca rollover` first")
    had_ocsp_signer = home.exists(Slot.OCSP)
    home.promote()
    issue_ra(home)
    if had_ocsp_signer:
        issue_ocsp_signer(home)
    return home.keys().ca.certificate


def _self_signed(home: KeyHome, slot: Slot, options: CaOptions) -> x509.Certificate:
    subject = parse_subject(options.subject)
    pending = home.begin(slot, options.spec, subject)
    public_key = serialization.load_der_public_key(pending.public_key_der)
    certificate = ca_certificate(subject, public_key, pending.signer, None, options.days)
    home.complete(slot, certificate, [])
    return certificate
