"""Key Vault custody through the real Azure SDK clients, against the wire-level Entra and Key Vault emulators."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from scep.azure.identity import build_credential, needs_instance_discovery_disabled
from scep.azure.intune.credential import SecretSource
from scep.azure.keyvault import KeyVaultHome
from scep.azure.vault_clients import KeyVaultClients, VaultPipeline
from scep.azure.vault_secrets import SecretError, SecretReader
from scep.core.issuer import sign_certificate
from scep.keys import (
    CustodyError,
    KeyHandle,
    KeyOperationForbidden,
    KeySpec,
    KeyTransport,
    SignaturePadding,
    Slot,
    time_budget,
)
from scep.tools import doctor
from tests.emulators.entra import DEFAULT_TENANT, EntraEmulator, TokenError, b64url_decode, b64url_encode
from tests.emulators.keyvault import VAULT_RESOURCE, KeyVaultEmulator

MANAGED_IDENTITY = "5b0c3a52-61d4-4c8e-9a55-3f1b0f5e7a01"
PRINCIPAL = "0f6f2f4e-1c1e-4f25-8a3e-2d7a4b9c6e10"
FAST_RETRIES = {"retry_backoff_factor": 0.01, "retry_backoff_max": 0.05}

_AZURE_VARIABLES = (
    "AZURE_CLIENT_ID",
    "AZURE_TENANT_ID",
    "AZURE_CLIENT_SECRET",
    "AZURE_CLIENT_CERTIFICATE_PATH",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_USERNAME",
    "AZURE_PASSWORD",
    "MSI_ENDPOINT",
    "MSI_SECRET",
    "IMDS_ENDPOINT",
    "IDENTITY_SERVER_THUMBPRINT",
    "AZURE_TOKEN_CREDENTIALS",
)


@pytest.fixture(scope="module")
def entra() -> Iterator[EntraEmulator]:
    with EntraEmulator() as emulator:
        emulator.register_managed_identity(MANAGED_IDENTITY, PRINCIPAL)
        yield emulator


@pytest.fixture(scope="module")
def vault(entra: EntraEmulator) -> Iterator[KeyVaultEmulator]:
    with KeyVaultEmulator(entra) as emulator:
        yield emulator


@pytest.fixture(scope="module", autouse=True)
def azure_environment(entra: EntraEmulator) -> Iterator[None]:
    """azure-identity talks to the Entra emulator only (App Service style managed identity)."""
    with pytest.MonkeyPatch.context() as patch:
        for name in _AZURE_VARIABLES:
            patch.delenv(name, raising=False)
        for name, value in {**entra.client_environment(), **entra.managed_identity_environment()}.items():
            patch.setenv(name, value)
        yield


@pytest.fixture(autouse=True)
def no_leftover_faults(vault: KeyVaultEmulator) -> Iterator[None]:
    yield
    vault.throttle(0)
    vault.fail_transiently(0)


def vault_clients(
    vault: KeyVaultEmulator, identity: str = MANAGED_IDENTITY, verify: bool = False, **pipeline: object
) -> KeyVaultClients:
    settings = VaultPipeline(verify_challenge_resource=verify, **pipeline)  # type: ignore[arg-type]
    return KeyVaultClients(vault.url, build_credential(identity), settings)


def make_home(vault: KeyVaultEmulator, ca_name: str | None = None, **kwargs: object) -> KeyVaultHome:
    unique = uuid.uuid4().hex[:8]
    pipeline = {name: kwargs.pop(name) for name in ("retry_total", *FAST_RETRIES) if name in kwargs}
    return KeyVaultHome(
        vault_clients(vault, **pipeline),
        ca_name=ca_name or f"ca-{unique}",
        ra_name=kwargs.pop("ra_name", None) or f"ra-{unique}",  # type: ignore[arg-type]
        poll_interval=0.01,
        **kwargs,  # type: ignore[arg-type]
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def certificate_signed_by(
    signer: KeyHandle,
    subject: x509.Name,
    public_key: object,
    issuer: x509.Certificate | None,
    ca: bool,
) -> x509.Certificate:
    """A certificate signed through a KeyHandle, as the product signs them (issuer.sign_certificate)."""
    signer_public = signer.certificate.public_key()
    now = datetime.datetime.now(datetime.timezone.utc)
    issuer_public = signer_public if issuer is None else issuer.public_key()
    usage = dict.fromkeys(
        (
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
            "encipher_only",
            "decipher_only",
        ),
        False,
    )
    usage.update(digital_signature=True, key_cert_sign=ca, crl_sign=ca, key_encipherment=not ca)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if issuer is None else issuer.subject)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(**usage), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)  # type: ignore[arg-type]
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public), critical=False)  # type: ignore[arg-type]
    )
    return sign_certificate(builder, signer)


def public_key_of(csr_der: bytes) -> object:
    return x509.load_der_x509_csr(csr_der).public_key()


def init_root(home: KeyVaultHome, spec: KeySpec, slot: Slot = Slot.CA, name: str = "Test Root CA") -> x509.Certificate:
    pending = home.begin(slot, spec, _name(name))
    certificate = certificate_signed_by(pending.signer, _name(name), public_key_of(pending.csr_der), None, ca=True)
    home.complete(slot, certificate, [])
    return certificate


def issue_ra(home: KeyVaultHome, ca_signer: KeyHandle, ca_certificate: x509.Certificate) -> x509.Certificate:
    pending = home.begin(Slot.RA, KeySpec("RSA", 2048), _name("Test RA"))
    certificate = certificate_signed_by(
        ca_signer, _name("Test RA"), public_key_of(pending.csr_der), ca_certificate, ca=False
    )
    home.complete(Slot.RA, certificate, [])
    return certificate


def init_ca_and_ra(home: KeyVaultHome, spec: KeySpec) -> None:
    ca_certificate = init_root(home, spec)
    issue_ra(home, home.handle(Slot.CA), ca_certificate)


@pytest.fixture(scope="module")
def rsa_home(vault: KeyVaultEmulator) -> KeyVaultHome:
    home = make_home(vault)
    init_ca_and_ra(home, KeySpec("RSA", 2048))
    return home


def wrapped_for(handle: KeyHandle, content_key: bytes) -> bytes:
    """content_key encrypted (RSA1_5) to the handle's certificate."""
    public = handle.certificate.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    return public.encrypt(content_key, padding.PKCS1v15())


def verify_rsa(
    certificate: x509.Certificate, signature: bytes, message: bytes, chosen: object, hash_algorithm: object
) -> None:
    public = certificate.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    public.verify(signature, message, chosen, hash_algorithm)  # type: ignore[arg-type]


# Signing and decrypting


@pytest.mark.parametrize("hash_name", ["sha256", "sha384", "sha512"])
def test_rsa_pkcs1v15_signatures_verify(rsa_home: KeyVaultHome, hash_name: str) -> None:
    algorithm = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512()}[hash_name]
    message = b"to be signed by the CA"
    digest = hashlib.new(hash_name, message).digest()
    ca = rsa_home.keys().ca
    signature = ca.sign_digest(digest, hash_name, SignaturePadding.PKCS1V15)
    verify_rsa(ca.certificate, signature, message, padding.PKCS1v15(), algorithm)


@pytest.mark.parametrize("hash_name", ["sha256", "sha384", "sha512"])
def test_rsa_pss_signatures_verify(rsa_home: KeyVaultHome, hash_name: str) -> None:
    algorithm = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512()}[hash_name]
    message = b"CertRep content"
    ra = rsa_home.keys().ra
    signature = ra.sign_digest(hashlib.new(hash_name, message).digest(), hash_name, SignaturePadding.PSS)
    pss = padding.PSS(mgf=padding.MGF1(algorithm), salt_length=algorithm.digest_size)
    verify_rsa(ra.certificate, signature, message, pss, algorithm)


def test_rsa_refuses_sha1_and_mismatched_digests(rsa_home: KeyVaultHome) -> None:
    ca = rsa_home.keys().ca
    with pytest.raises(CustodyError, match="SHA-1"):
        ca.sign_digest(hashlib.sha1(b"x").digest(), "sha1")
    with pytest.raises(CustodyError, match="digest"):
        ca.sign_digest(hashlib.sha256(b"x").digest(), "sha384")


@pytest.mark.parametrize(
    ("curve", "hash_name", "hash_algorithm"),
    [
        ("P-256", "sha256", hashes.SHA256()),
        ("P-384", "sha384", hashes.SHA384()),
        ("P-256", "sha384", hashes.SHA384()),  # longer hash: truncated as ECDSA itself does
        ("P-384", "sha256", hashes.SHA256()),  # shorter hash: left-padded, same integer
        ("P-521", "sha512", hashes.SHA512()),  # ES512 takes a 64-byte digest, answers r||s of 66 bytes each
        ("P-521", "sha256", hashes.SHA256()),
    ],
)
def test_ec_signatures_come_back_der_encoded_and_verify(
    vault: KeyVaultEmulator, curve: str, hash_name: str, hash_algorithm: hashes.HashAlgorithm
) -> None:
    home = make_home(vault)
    pending = home.begin(Slot.CA, KeySpec("EC", curve=curve), _name(f"EC {curve}"))
    message = b"an EC-signed certificate body"
    signature = pending.signer.sign_digest(hashlib.new(hash_name, message).digest(), hash_name)
    public = public_key_of(pending.csr_der)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert signature[0] == 0x30  # DER Ecdsa-Sig-Value, not raw r||s
    public.verify(signature, message, ec.ECDSA(hash_algorithm))


def test_ec_root_and_rsa_ra_work_end_to_end(vault: KeyVaultEmulator) -> None:
    home = make_home(vault)
    init_ca_and_ra(home, KeySpec("EC", curve="P-384"))
    keys = home.keys()
    keys.ca.certificate.verify_directly_issued_by(keys.ca.certificate)
    keys.ra.certificate.verify_directly_issued_by(keys.ca.certificate)
    assert isinstance(keys.ca.certificate.public_key(), ec.EllipticCurvePublicKey)


@pytest.mark.parametrize("transport", list(KeyTransport))
def test_ra_unwraps_every_key_transport_with_unwrapkey(rsa_home: KeyVaultHome, transport: KeyTransport) -> None:
    ra = rsa_home.keys().ra
    public = ra.certificate.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    chosen = {
        KeyTransport.RSA_PKCS1V15: padding.PKCS1v15(),
        KeyTransport.RSA_OAEP_SHA1: padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None),
        KeyTransport.RSA_OAEP_SHA256: padding.OAEP(
            mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None
        ),
    }[transport]
    content_key = os.urandom(32)
    assert ra.unwrap_key(public.encrypt(content_key, chosen), transport) == content_key


def test_undecryptable_blob_is_a_custody_error(rsa_home: KeyVaultHome) -> None:
    with pytest.raises(CustodyError):
        rsa_home.keys().ra.unwrap_key(os.urandom(256), KeyTransport.RSA_OAEP_SHA256)


def test_key_material_never_leaves_the_vault(rsa_home: KeyVaultHome, vault: KeyVaultEmulator) -> None:
    from azure.keyvault.keys import KeyClient

    client = KeyClient(vault.url, build_credential(MANAGED_IDENTITY), verify_challenge_resource=False)
    key = client.get_key(rsa_home.ca_name)
    assert key.key.n and key.key.d is None and key.key.p is None
    created = vault.certificate_versions(rsa_home.ca_name)[-1].policy
    assert created["key_props"]["exportable"] is False


# Lifecycle


def test_lifecycle_begin_complete_rollover_promote_inventory(vault: KeyVaultEmulator) -> None:
    home = make_home(vault)
    assert not home.exists(Slot.CA)
    init_ca_and_ra(home, KeySpec("RSA", 2048))
    assert home.exists(Slot.CA) and home.exists(Slot.RA) and not home.exists(Slot.NEXT_CA)
    first = home.keys()
    assert first.next_ca is None and first.chain == () and first.retired == ()

    inventory = {info.slot: info for info in home.inventory()}
    assert set(inventory) == {Slot.CA, Slot.RA}
    assert inventory[Slot.CA].key_type == "RSA 2048" and not inventory[Slot.CA].hardware

    pending = home.begin(Slot.NEXT_CA, KeySpec("EC", curve="P-256", hsm=True), _name("Test Root CA G2"))
    assert home.pending(Slot.NEXT_CA) is not None and home.pending(Slot.CA) is None
    reread = home.pending(Slot.NEXT_CA)
    assert reread is not None and reread.csr_der == pending.csr_der
    next_certificate = certificate_signed_by(
        pending.signer, _name("Test Root CA G2"), public_key_of(pending.csr_der), None, ca=True
    )
    home.complete(Slot.NEXT_CA, next_certificate, [])
    assert home.pending(Slot.NEXT_CA) is None

    rolled = home.keys()
    assert rolled.ca.certificate == first.ca.certificate
    assert rolled.next_ca is not None and rolled.next_ca.certificate == next_certificate
    assert next_certificate in rolled.trusted_issuers()
    inventory = {info.slot: info for info in home.inventory()}
    assert inventory[Slot.NEXT_CA].hardware and inventory[Slot.NEXT_CA].key_type == "EC P-256"

    home.promote()
    promoted = home.keys()
    assert promoted.ca.certificate == next_certificate
    assert promoted.next_ca is None
    assert promoted.retired == (first.ca.certificate,)
    assert not home.exists(Slot.NEXT_CA)
    message = b"signed by the promoted CA"
    signature = promoted.ca.sign_digest(hashlib.sha256(message).digest(), "sha256")
    next_public = next_certificate.public_key()
    assert isinstance(next_public, ec.EllipticCurvePublicKey)
    next_public.verify(signature, message, ec.ECDSA(hashes.SHA256()))


def test_bootstrap_versions_are_disabled_after_merge(vault: KeyVaultEmulator) -> None:
    home = make_home(vault)
    init_root(home, KeySpec("RSA", 2048))
    versions = vault.certificate_versions(home.ca_name)
    assert [item.issuer_name for item in versions] == ["Self", "Unknown"]
    assert not versions[0].enabled and versions[1].enabled
    assert versions[1].tags["scep-role"] == "current"


def test_subordinate_ca_keeps_its_chain(vault: KeyVaultEmulator) -> None:
    home = make_home(vault)
    root_key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    root = (
        x509.CertificateBuilder()
        .subject_name(_name("Enterprise Root"))
        .issuer_name(_name("Enterprise Root"))
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(root_key, hashes.SHA384())
    )
    pending = home.begin(Slot.CA, KeySpec("RSA", 3072), _name("Issuing CA"))
    csr = x509.load_der_x509_csr(pending.csr_der)
    assert csr.is_signature_valid and csr.subject == _name("Issuing CA")
    subordinate = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(root.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1825))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root_key, hashes.SHA384())
    )
    home.complete(Slot.CA, subordinate, [root])
    issue_ra(home, home.handle(Slot.CA), subordinate)
    keys = home.keys()
    assert keys.ca.certificate == subordinate
    assert keys.chain == (root,)
    keys.ra.certificate.verify_directly_issued_by(subordinate)


def test_merge_with_a_foreign_key_is_refused(vault: KeyVaultEmulator) -> None:
    home = make_home(vault)
    home.begin(Slot.CA, KeySpec("RSA", 2048), _name("Mismatch"))
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.timezone.utc)
    foreign = (
        x509.CertificateBuilder()
        .subject_name(_name("Mismatch"))
        .issuer_name(_name("Mismatch"))
        .public_key(stranger.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(stranger, hashes.SHA256())
    )
    with pytest.raises(CustodyError, match="merge"):
        home.complete(Slot.CA, foreign, [])
    assert home.pending(Slot.CA) is not None


def test_missing_ca_is_a_clear_custody_error(vault: KeyVaultEmulator) -> None:
    with pytest.raises(CustodyError, match="scep ca init"):
        make_home(vault).keys()


def test_ra_must_be_rsa(vault: KeyVaultEmulator) -> None:
    with pytest.raises(CustodyError, match="RSA"):
        make_home(vault).begin(Slot.RA, KeySpec("EC"), _name("EC RA"))


# Budget, refresh, retries


def test_warm_enrollment_costs_three_key_vault_operations(rsa_home: KeyVaultHome, vault: KeyVaultEmulator) -> None:
    keys = rsa_home.keys()
    public = keys.ra.certificate.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    rsa_home.keys().ra.unwrap_key(public.encrypt(b"k" * 16, padding.PKCS1v15()), KeyTransport.RSA_PKCS1V15)

    vault.reset_counts()
    for _ in range(3):
        keys = rsa_home.keys()
        keys.ra.unwrap_key(public.encrypt(b"k" * 16, padding.PKCS1v15()), KeyTransport.RSA_PKCS1V15)
        keys.ca.sign_digest(hashlib.sha256(b"tbs").digest(), "sha256")
        rsa_home.keys().ra.sign_digest(hashlib.sha256(b"certrep").digest(), "sha256")
    assert vault.operation_count() == 9
    assert vault.operations["keys.unwrapkey"] == 3 and vault.operations["keys.sign"] == 6
    assert vault.operations["challenge"] == 0 and vault.operations["keys.get"] == 0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_refresh_notices_rollover_and_promote_by_another_instance(vault: KeyVaultEmulator) -> None:
    clock = FakeClock()
    serving = make_home(vault, refresh_interval=300, clock=clock)
    init_ca_and_ra(serving, KeySpec("RSA", 2048))
    before = serving.keys()
    other = make_home(vault, ca_name=serving.ca_name, ra_name=serving.ra_name)
    next_certificate = init_root(other, KeySpec("RSA", 2048), slot=Slot.NEXT_CA, name="Test Root CA G2")

    vault.reset_counts()
    assert serving.keys().next_ca is None  # within the refresh interval: the cached view, no vault call
    assert vault.operation_count() == 0
    clock.now += 301
    rolled = serving.keys()
    assert rolled.next_ca is not None and rolled.next_ca.certificate == next_certificate
    assert vault.operation_count("certificates.versions") == 2

    other.promote()
    clock.now += 301
    promoted = serving.keys()
    assert promoted.ca.certificate == next_certificate
    assert promoted.retired == (before.ca.certificate,)


def test_refresh_failure_keeps_serving_cached_keys(vault: KeyVaultEmulator) -> None:
    clock = FakeClock()
    home = make_home(vault, refresh_interval=300, retry_total=1, clock=clock, **FAST_RETRIES)
    init_ca_and_ra(home, KeySpec("RSA", 2048))
    before = home.keys()
    clock.now += 301
    vault.fail_transiently(10)
    assert home.keys() is before


def test_throttling_is_retried_honouring_retry_after(rsa_home: KeyVaultHome, vault: KeyVaultEmulator) -> None:
    ca = rsa_home.keys().ca
    vault.reset_counts()
    vault.throttle(1, retry_after=1)
    started = time.monotonic()
    signature = ca.sign_digest(hashlib.sha256(b"throttled").digest(), "sha256")
    assert time.monotonic() - started >= 0.9
    verify_rsa(ca.certificate, signature, b"throttled", padding.PKCS1v15(), hashes.SHA256())
    assert vault.operations["throttled"] == 1 and vault.operations["keys.sign"] == 1


def test_transient_server_errors_are_retried(vault: KeyVaultEmulator) -> None:
    home = make_home(vault, **FAST_RETRIES)
    init_ca_and_ra(home, KeySpec("RSA", 2048))
    ra = home.keys().ra
    vault.reset_counts()
    vault.fail_transiently(2, status=503)
    ra.sign_digest(hashlib.sha256(b"retry me").digest(), "sha256")
    assert vault.operations["faulted"] == 2 and vault.operations["keys.sign"] == 1


def test_persistent_failure_becomes_custody_error_at_the_time_budget(
    rsa_home: KeyVaultHome, vault: KeyVaultEmulator
) -> None:
    keys = rsa_home.keys()
    vault.fail_transiently(10**6, status=503)
    started = time.monotonic()
    with time_budget(1.0), pytest.raises(CustodyError, match="sign"):
        keys.ca.sign_digest(hashlib.sha256(b"x").digest(), "sha256")
    assert 0.5 < time.monotonic() - started < 3.0
    assert vault.operations["faulted"] > 2  # retried, with backoff, until the budget ran out
    vault.fail_transiently(0)
    vault.throttle(10**6)
    with time_budget(1.0), pytest.raises(CustodyError, match="unwrapKey"):
        keys.ra.unwrap_key(wrapped_for(keys.ra, b"k" * 16), KeyTransport.RSA_PKCS1V15)


def test_throttled_key_operations_without_retry_after_are_retried(
    rsa_home: KeyVaultHome, vault: KeyVaultEmulator
) -> None:
    """azure-core never retries a POST answered 429 without Retry-After, which is how Key Vault throttles."""
    keys = rsa_home.keys()
    vault.reset_counts()
    vault.throttle(2)
    keys.ca.sign_digest(hashlib.sha256(b"throttled").digest(), "sha256")
    vault.throttle(2)
    assert keys.ra.unwrap_key(wrapped_for(keys.ra, b"k" * 16), KeyTransport.RSA_PKCS1V15) == b"k" * 16
    assert vault.operations["throttled"] == 4
    assert vault.operations["keys.sign"] == 1 and vault.operations["keys.unwrapkey"] == 1


def test_key_operations_ride_out_a_vault_restart(rsa_home: KeyVaultHome, vault: KeyVaultEmulator) -> None:
    """A connection refused (vault down) is retried too; azure-core never retries a POST after one."""
    keys = rsa_home.keys()
    port = vault.port
    vault.stop()
    restart = threading.Timer(0.7, vault.start)
    restart.start()
    try:
        signature = keys.ca.sign_digest(hashlib.sha256(b"outage").digest(), "sha256")
    finally:
        restart.join()
    assert vault.port == port
    verify_rsa(keys.ca.certificate, signature, b"outage", padding.PKCS1v15(), hashes.SHA256())


def test_refused_identity_is_a_custody_error(vault: KeyVaultEmulator, entra: EntraEmulator) -> None:
    identity = str(uuid.uuid4())
    entra.register_managed_identity(identity, str(uuid.uuid4()))
    entra.refuse(identity)
    home = KeyVaultHome(vault_clients(vault, identity, **FAST_RETRIES), ca_name="refused-ca", ra_name="refused-ra")
    with pytest.raises(CustodyError):
        home.keys()


def test_challenge_resource_is_verified_unless_turned_off(vault: KeyVaultEmulator) -> None:
    strict = KeyVaultHome(vault_clients(vault, verify=True), ca_name="strict-ca")
    with pytest.raises(CustodyError):
        strict.keys()


# Secrets


def test_secret_reader_caches_and_refreshes_after_rotation(vault: KeyVaultEmulator) -> None:
    from azure.keyvault.secrets import SecretClient

    admin = SecretClient(vault.url, build_credential(MANAGED_IDENTITY), verify_challenge_resource=False)
    name = f"intune-secret-{uuid.uuid4().hex[:6]}"
    admin.set_secret(name, "first")
    reader = SecretReader(vault_clients(vault))
    assert reader.get(name) == "first"
    admin.set_secret(name, "second")
    vault.reset_counts()
    assert reader.get(name) == "first"
    assert vault.operation_count("secrets.get") == 0
    assert reader.refresh(name) == "second"
    assert reader.get(name) == "second"
    source = SecretSource.from_key_vault(reader, name)  # how the Intune credential sees a rotated secret
    admin.set_secret(name, "third")
    assert (source.current(), source.refresh(), source.current()) == ("second", "third", "third")
    with pytest.raises(SecretError, match="could not be read"):
        reader.get("no-such-secret")


# Entra emulator and credential construction


def test_instance_discovery_is_disabled_for_the_emulator(entra: EntraEmulator) -> None:
    assert needs_instance_discovery_disabled(entra.url)
    assert not needs_instance_discovery_disabled("https://login.microsoftonline.com")
    assert not needs_instance_discovery_disabled(None)


def test_verify_token_rejects_wrong_audience_expired_and_revoked(entra: EntraEmulator) -> None:
    token = entra.issue_token(DEFAULT_TENANT, VAULT_RESOURCE, "app", "oid", [])
    assert entra.verify_token(token, VAULT_RESOURCE + "/")["oid"] == "oid"
    with pytest.raises(TokenError, match="audience"):
        entra.verify_token(token, "https://management.azure.com")
    header, claims, signature = token.split(".")
    forged_claims = {**json.loads(b64url_decode(claims)), "roles": ["Administrator"]}
    forged = f"{header}.{b64url_encode(json.dumps(forged_claims).encode())}.{signature}"
    with pytest.raises(TokenError, match="signature"):
        entra.verify_token(forged, VAULT_RESOURCE)
    lifetime = entra.token_lifetime_seconds
    entra.token_lifetime_seconds = -1
    try:
        expired = entra.issue_token(DEFAULT_TENANT, VAULT_RESOURCE, "app", "oid", [])
    finally:
        entra.token_lifetime_seconds = lifetime
    with pytest.raises(TokenError, match="expired"):
        entra.verify_token(expired, VAULT_RESOURCE)


def test_vault_challenge_names_the_tenant_and_resource(vault: KeyVaultEmulator, entra: EntraEmulator) -> None:
    response = requests.get(f"{vault.url}/keys/anything?api-version=7.6", verify=vault.ca_bundle_path, timeout=10)
    assert response.status_code == 401
    challenge = response.headers["WWW-Authenticate"]
    assert f'authorization="{entra.url}/{DEFAULT_TENANT}"' in challenge
    assert f'resource="{VAULT_RESOURCE}"' in challenge
    forged = requests.get(
        f"{vault.url}/keys/anything?api-version=7.6",
        headers={"Authorization": "Bearer not.a.token"},
        verify=vault.ca_bundle_path,
        timeout=10,
    )
    assert forged.status_code == 401


def test_managed_identity_endpoint_requires_the_identity_header(entra: EntraEmulator) -> None:
    url = f"{entra.url}/msi/token"
    params = {"api-version": "2019-08-01", "resource": VAULT_RESOURCE, "client_id": MANAGED_IDENTITY}
    refused = requests.get(url, params=params, headers={"X-IDENTITY-HEADER": "guess"}, verify=entra.ca_bundle_path)
    assert refused.status_code == 401
    granted = requests.get(
        url, params=params, headers={"X-IDENTITY-HEADER": entra.identity_header}, verify=entra.ca_bundle_path
    )
    assert granted.status_code == 200
    assert entra.verify_token(granted.json()["access_token"], VAULT_RESOURCE)["oid"] == PRINCIPAL


# Key Vault's rules, as the emulator enforces them


def _crypto_client(vault: KeyVaultEmulator, key_id: str):
    from azure.keyvault.keys.crypto import CryptographyClient

    return CryptographyClient(key_id, build_credential(MANAGED_IDENTITY), verify_challenge_resource=False)


def _error_body(error: Exception) -> dict:
    return error.response.json()["error"]  # type: ignore[attr-defined]


def test_ra_key_refuses_decrypt_and_allows_unwrapkey_per_its_key_usage(
    rsa_home: KeyVaultHome, vault: KeyVaultEmulator
) -> None:
    """keyEncipherment grants wrapKey/unwrapKey, not decrypt ("X509 to Key Vault usage mapping")."""
    from azure.core.exceptions import HttpResponseError
    from azure.keyvault.keys.crypto import EncryptionAlgorithm

    ra = rsa_home.keys().ra
    public = ra.certificate.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    client = _crypto_client(vault, ra.key_id)
    with pytest.raises(HttpResponseError) as refused:
        client.decrypt(EncryptionAlgorithm.rsa1_5, public.encrypt(b"k" * 16, padding.PKCS1v15()))
    assert refused.value.status_code == 403
    assert _error_body(refused.value) == {
        "code": "Forbidden",
        "message": "Operation decrypt is not permitted on this key.",
        "innererror": {"code": "KeyOperationForbidden"},
    }
    assert rsa_home._key_operations_of(ra.key_id) == ["sign", "verify", "wrapKey", "unwrapKey"]


def test_ca_key_unwrap_is_key_operation_forbidden_with_its_key_ops(rsa_home: KeyVaultHome) -> None:
    ca = rsa_home.keys().ca
    public = ca.certificate.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    with pytest.raises(KeyOperationForbidden) as refused:
        ca.unwrap_key(public.encrypt(b"k" * 16, padding.PKCS1v15()), KeyTransport.RSA_PKCS1V15)
    assert refused.value.operation == "unwrapKey"
    assert refused.value.allowed_operations() == ["sign", "verify"]


@pytest.mark.parametrize(("algorithm", "size"), [("RS256", 31), ("RS384", 32), ("RS512", 66), ("PS256", 48)])
def test_sign_takes_exactly_the_digest_size_of_its_algorithm(
    rsa_home: KeyVaultHome, vault: KeyVaultEmulator, algorithm: str, size: int
) -> None:
    from azure.core.exceptions import HttpResponseError
    from azure.keyvault.keys.crypto import SignatureAlgorithm

    client = _crypto_client(vault, rsa_home.keys().ca.key_id)
    with pytest.raises(HttpResponseError) as refused:
        client.sign(SignatureAlgorithm(algorithm), b"d" * size)
    assert refused.value.status_code == 400
    expected = {"RS256": 32, "RS384": 48, "RS512": 64, "PS256": 32}[algorithm]
    assert _error_body(refused.value) == {
        "code": "BadParameter",
        "message": f"Invalid length of 'value': {size} bytes. {algorithm} requires {expected} bytes, encoded with "
        "base64url.",
    }


def test_es512_takes_a_64_byte_digest_not_66(vault: KeyVaultEmulator) -> None:
    from azure.core.exceptions import HttpResponseError
    from azure.keyvault.keys.crypto import SignatureAlgorithm

    home = make_home(vault)
    pending = home.begin(Slot.CA, KeySpec("EC", curve="P-521"), _name("EC P-521"))
    client = _crypto_client(vault, pending.signer.key_id)  # type: ignore[attr-defined]
    assert len(client.sign(SignatureAlgorithm.es512, b"d" * 64).signature) == 132
    with pytest.raises(HttpResponseError, match="ES512 requires 64 bytes"):
        client.sign(SignatureAlgorithm.es512, b"d" * 66)


def test_keys_of_pending_and_disabled_versions_refuse_private_key_operations(vault: KeyVaultEmulator) -> None:
    """A pending certificate's key is disabled until the merge; a disabled key refuses sign (403 KeyDisabled)."""
    from azure.core.exceptions import HttpResponseError
    from azure.keyvault.keys import KeyClient
    from azure.keyvault.keys.crypto import SignatureAlgorithm

    home = make_home(vault)
    pending = home.begin(Slot.CA, KeySpec("RSA", 2048), _name("Pending CA"))
    keys = KeyClient(vault.url, build_credential(MANAGED_IDENTITY), verify_challenge_resource=False)
    pending_version = vault.certificate_versions(home.ca_name)[-1].version
    pending_key = keys.get_key(home.ca_name, pending_version)
    assert pending_key.properties.enabled is False
    digest = hashlib.sha256(b"tbs").digest()
    with pytest.raises(HttpResponseError) as refused:
        _crypto_client(vault, pending_key.id).sign(SignatureAlgorithm.rs256, digest)
    assert refused.value.status_code == 403
    assert _error_body(refused.value)["innererror"] == {"code": "KeyDisabled"}

    bootstrap_key_id = pending.signer.key_id  # type: ignore[attr-defined]
    certificate = certificate_signed_by(pending.signer, _name("Pending CA"), public_key_of(pending.csr_der), None, True)
    home.complete(Slot.CA, certificate, [])  # the merged version is live; the bootstrap version is disabled
    with pytest.raises(HttpResponseError, match="not allowed on a disabled key"):
        _crypto_client(vault, bootstrap_key_id).sign(SignatureAlgorithm.rs256, digest)
    assert home.handle(Slot.CA).sign_digest(digest, "sha256")


def test_unknown_api_version_is_refused(vault: KeyVaultEmulator) -> None:
    answer = requests.get(f"{vault.url}/keys/any?api-version=1999-01-01", verify=vault.ca_bundle_path, timeout=10)
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "BadParameter" and "1999-01-01" in answer.json()["error"]["message"]


def test_undecryptable_rsa1_5_blob_gets_key_vaults_answer(rsa_home: KeyVaultHome, vault: KeyVaultEmulator) -> None:
    from azure.core.exceptions import HttpResponseError
    from azure.keyvault.keys.crypto import KeyWrapAlgorithm

    client = _crypto_client(vault, rsa_home.keys().ra.key_id)
    with pytest.raises(HttpResponseError) as refused:
        client.unwrap_key(KeyWrapAlgorithm.rsa1_5, _badly_padded(rsa_home.keys().ra.certificate))
    assert refused.value.status_code == 400
    assert _error_body(refused.value) == {
        "code": "BadParameter",
        "message": "Unable to decrypt specified value with this key.",
    }


# scep doctor: the key's own operations, or RBAC


def test_doctor_names_the_key_usage_when_key_ops_forbid_unwrap(rsa_home: KeyVaultHome) -> None:
    keys = rsa_home.keys()
    wrong_ra = dataclasses.replace(keys, ra=keys.ca)  # a key whose certificate has no keyEncipherment
    findings = list(doctor._check_key_operations(wrong_ra))
    refused = [finding.message for finding in findings if not finding.ok]
    assert refused == [
        "RA key allows sign, verify only; unwrapKey needs keyEncipherment in the RA certificate's key usage: "
        "run `scep ca ra renew`"
    ]


def test_doctor_keeps_the_rbac_message_for_an_rbac_denial(vault: KeyVaultEmulator, entra: EntraEmulator) -> None:
    identity, principal = str(uuid.uuid4()), str(uuid.uuid4())
    entra.register_managed_identity(identity, principal)
    home = make_home(vault)
    init_ca_and_ra(home, KeySpec("RSA", 2048))
    denied = KeyVaultHome(vault_clients(vault, identity), ca_name=home.ca_name, ra_name=home.ra_name)
    keys = denied.keys()
    vault.forbid(principal)
    with time_budget(2.0):
        findings = list(doctor._check_key_operations(keys))
    assert [finding.ok for finding in findings] == [False, False, False]
    assert all("Key Vault Crypto User" in finding.message and "HTTP 403" in finding.message for finding in findings)


# No decryption oracle: every blob that does not give a content key gets the same signed FAILURE, on both backends


def _badly_padded(recipient: x509.Certificate) -> bytes:
    """A blob that is not a PKCS#1 v1.5 encryption block under the recipient's key."""
    public = recipient.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    modulus = public.public_numbers().n
    size = (modulus.bit_length() + 7) // 8
    return pow(int.from_bytes(b"\x00\x01" + b"\xff" * (size - 2), "big"), public.public_numbers().e, modulus).to_bytes(
        size, "big"
    )


def _undecryptable_blobs(recipient: x509.Certificate) -> dict[str, bytes]:
    public = recipient.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    return {
        "bad PKCS#1 padding": _badly_padded(recipient),
        "well padded, wrong key length": public.encrypt(b"k" * 5, padding.PKCS1v15()),
        "well padded, right length, wrong key": public.encrypt(os.urandom(16), padding.PKCS1v15()),
        "malformed blob": b"\x01\x02\x03",
    }


def _request_with_wrapped_key(enrollment, ra: x509.Certificate, wrapped_key: bytes) -> bytes:
    from asn1crypto import cms

    from scep.core import message as msg
    from scep.tools.client import DEFAULT_OPTIONS

    envelope = msg.seal_envelope(enrollment.csr.public_bytes(serialization.Encoding.DER), ra, DEFAULT_OPTIONS.cipher)
    info = cms.ContentInfo.load(envelope)
    info["content"]["recipient_infos"][0].chosen["encrypted_key"] = wrapped_key
    attributes = msg.request_attributes(enrollment.message_type, enrollment.transaction_id, enrollment.sender_nonce)
    return msg.sign_message(enrollment.signer, "sha256", attributes, info.dump(force=True))


def _replies_to_undecryptable_blobs(service, ra: x509.Certificate, caplog) -> dict[str, tuple]:
    from scep.tools.client import make_csr, new_enrollment, read_reply

    replies = {}
    for case, blob in _undecryptable_blobs(ra).items():
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        enrollment = new_enrollment(key, make_csr(key, "oracle", "challenge"))
        caplog.clear()
        reply = read_reply(service.pki_operation(_request_with_wrapped_key(enrollment, ra, blob)).der, enrollment, ra)
        logged = [(record.levelname, record.getMessage().split(": ", 1)[-1]) for record in caplog.records
                  if record.name == "scep.core.service"]
        replies[case] = (reply.status, reply.fail_info, reply.fail_info_text, logged)
    return replies


def test_undecryptable_blobs_get_one_same_failure_on_both_backends(
    rsa_home: KeyVaultHome, make_service, tmp_path, caplog
) -> None:
    from scep.challenge.static import StaticValidator
    from scep.core.protocol import FailInfo, PkiStatus
    from scep.core.service import ScepService, ServiceOptions
    from scep.store.sqlite import SqliteStore

    caplog.set_level(logging.DEBUG)
    services = {
        "local": make_service(),
        "Key Vault": ScepService(rsa_home, SqliteStore(tmp_path / "kv.db"), StaticValidator("c"), ServiceOptions()),
    }
    expected = (
        PkiStatus.FAILURE,
        FailInfo.BAD_MESSAGE_CHECK,
        "could not decrypt the message",
        [("INFO", "could not decrypt the message")],
    )
    for name, service in services.items():
        replies = _replies_to_undecryptable_blobs(service, service.custody.keys().ra.certificate, caplog)
        assert replies == dict.fromkeys(replies, expected), name
