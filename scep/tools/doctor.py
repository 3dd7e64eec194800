"""`scep doctor`: check the settings and every backend, and say exactly what to fix."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from scep import config
from scep.core.issuer import fingerprint, is_ca_certificate
from scep.findings import Finding, Status
from scep.keys import CaKeys, CustodyError, KeyOperationForbidden, KeyTransport
from scep.store import StoreError

EXPIRY_WARNING = timedelta(days=30)


def run_doctor() -> Iterator[Finding]:
    try:
        settings = config.load_settings()
    except config.ConfigError as error:
        yield Finding(Status.FAIL, str(error), "settings")
        return
    modes = ",".join(sorted(settings.modes))
    yield Finding(Status.OK, f"challenge mode {modes}, store {settings.store_kind}", "settings")
    yield from _check_custody(settings)
    yield from _check_store(settings)
    if "intune" in settings.modes:
        yield from _check_intune(settings)


def _check_custody(settings: config.Settings) -> Iterator[Finding]:
    home = config.build_key_home(settings)
    try:
        keys = home.keys()
    except CustodyError as error:
        hint = "run `scep ca init`" if "init" not in str(error) else ""
        yield Finding(Status.FAIL, f"keys ({home.describe()}): {error} {hint}".rstrip())
        return
    yield Finding(Status.OK, home.describe(), "keys")
    yield from _check_certificates(keys)
    yield from _check_key_operations(keys)


def _check_certificates(keys: CaKeys) -> Iterator[Finding]:
    now = datetime.now(timezone.utc)
    for role, certificate in (("CA", keys.ca.certificate), ("RA", keys.ra.certificate)):
        remaining = certificate.not_valid_after_utc - now
        if remaining <= timedelta(0):
            yield Finding(Status.FAIL, f"{role} certificate expired on {certificate.not_valid_after_utc:%Y-%m-%d}")
        elif remaining < EXPIRY_WARNING:
            action = "`scep ca ra renew`" if role == "RA" else "`scep ca rollover`, then `scep ca promote`"
            yield Finding(Status.FAIL, f"{role} certificate expires in {remaining.days} days: run {action}")
        else:
            until = f"{certificate.not_valid_after_utc:%Y-%m-%d}"
            yield Finding(
                Status.OK,
                f"{role} {certificate.subject.rfc4514_string()} valid until {until} "
                f"(SHA-256 {fingerprint(certificate)[:16]}…)",
            )
    ca, ra = keys.ca.certificate, keys.ra.certificate
    if not is_ca_certificate(ca):
        yield Finding(Status.FAIL, "the CA certificate lacks basicConstraints CA:true: re-run `scep ca init --force`")
    if _issued_by(ra, ca):
        yield Finding(Status.OK, "RA is issued by the current CA")
    else:
        yield Finding(Status.FAIL, "the RA was not issued by the current CA: run `scep ca ra issue`")
    if keys.chain:
        chained = _issued_by(ca, keys.chain[0]) and all(map(_issued_by, keys.chain, keys.chain[1:]))
        yield Finding.of(
            chained,
            f"subordinate CA chain of {len(keys.chain)} certificate(s) "
            + ("verifies" if chained else "does not verify: re-run `scep ca import` with the right chain"),
        )
    usage = ra.extensions.get_extension_for_class(x509.KeyUsage).value
    if not (usage.digital_signature and usage.key_encipherment):
        yield Finding(Status.FAIL, "the RA lacks digitalSignature + keyEncipherment: run `scep ca ra issue`")


def _issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(issuer)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


# What each key operation needs in the certificate's key usage (Key Vault grants key_ops from it), and the command
# that issues a certificate with it.
_OPERATION_NEEDS = {"sign": "digitalSignature", "unwrapKey": "keyEncipherment"}
_REISSUE = {"CA": "`scep ca rollover`, then `scep ca promote`", "RA": "`scep ca ra renew`"}


def _check_key_operations(keys: CaKeys) -> Iterator[Finding]:
    """One sign with the CA key, one sign and one unwrapKey with the RA key prove reachability and permissions."""
    digest = hashlib.sha256(b"scep doctor").digest()
    for role, handle in (("CA", keys.ca), ("RA", keys.ra)):
        try:
            handle.sign_digest(digest, "sha256")
            yield Finding(Status.OK, f"{role} key signs")
        except CustodyError as error:
            yield _refusal(role, "sign", error)
    public_key = keys.ra.certificate.public_key()
    if not isinstance(public_key, rsa.RSAPublicKey):
        yield Finding(Status.FAIL, "the RA key is not RSA: SCEP key transport needs RSA; run `scep ca ra issue`")
        return
    secret = os.urandom(16)
    try:
        recovered = keys.ra.unwrap_key(public_key.encrypt(secret, padding.PKCS1v15()), KeyTransport.RSA_PKCS1V15)
        ok = recovered == secret
        text = "decrypts request keys (unwrapKey)" if ok else "unwraps wrongly: the RA certificate and key differ"
        yield Finding.of(ok, f"RA key {text}")
    except CustodyError as error:
        yield _refusal("RA", "unwrapKey", error)


def _refusal(role: str, operation: str, error: CustodyError) -> Finding:
    """Why a key operation failed: the key's own key_ops (its certificate's key usage), or the caller's rights."""
    if not isinstance(error, KeyOperationForbidden):
        return Finding(
            Status.FAIL, f"{role} key cannot {operation} ({error}): grant the identity {operation} on keys "
            "(Key Vault Crypto User)"
        )
    try:
        allowed = ", ".join(error.allowed_operations()) or "no operation"
    except CustodyError as lookup:
        allowed = f"other operations (reading its key_ops failed: {lookup})"
    return Finding(
        Status.FAIL,
        f"{role} key allows {allowed} only; {operation} needs {_OPERATION_NEEDS[operation]} in the "
        f"{role} certificate's key usage: run {_REISSUE[role]}",
    )


def _check_store(settings: config.Settings) -> Iterator[Finding]:
    try:
        store = config.build_store(settings)
        store.ping()
        yield Finding(Status.OK, store.describe(), "store")
    except StoreError as error:
        yield Finding(Status.FAIL, f"store unreachable: {error}")


def _check_intune(settings: config.Settings) -> Iterator[Finding]:
    from scep.azure.intune.check import run_check

    report = run_check(config.build_intune_client(settings))
    yield from (replace(line, step=f"intune: {line.step}") for line in report.lines)
