"""Key Vault custody through the real Azure SDK clients, against the wire-level Entra and Key Vault emulators."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator

import pytest
import requests
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from scep.intune import SecretSource
from scep.keys import CustodyError, KeyHandle, KeySpec, KeyTransport, SignaturePadding, Slot
from scep.keys.azure_credentials import build_credential, needs_instance_discovery_disabled
from scep.keys.keyvault import KeyVaultHome
from scep.secrets import SecretError, SecretReader
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


def make_home(vault: KeyVaultEmulator, ca_name: str | None = None, **kwargs: object) -> KeyVaultHome:
    unique = uuid.uuid4().hex[:8]
    return KeyVaultHome(
        vault.url,
        ca_name=ca_name or f"ca-{unique}",
        ra_name=kwargs.pop("ra_name", None) or f"ra-{unique}",  # type: ignore[arg-type]
        credential=build_credential(MANAGED_IDENTITY),
        verify_challenge_resource=False,
        poll_interval=0.01,
        **kwargs,  # type: ignore[arg-type]
    )


# Certificates signed through a KeyHandle: build the TBS with a stand-in key of the same type, then sign
# its digest through custody and reassemble the certificate.

_STAND_IN = {
    "RSA": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "EC": ec.generate_private_key(ec.SECP256R1()),
}


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def certificate_signed_by(
    signer: KeyHandle,
    subject: x509.Name,
    public_key: object,
    issuer: x509.Certificate | None,
    ca: bool,
) -> x509.Certificate:
    signer_public = signer.certificate.public_key()
    kind = "RSA" if isinstance(signer_public, rsa.RSAPublicKey) else "EC"
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
    draft = builder.sign(_STAND_IN[kind], hashes.SHA256())
    signature = signer.sign_digest(hashlib.sha256(draft.tbs_certificate_bytes).digest(), "sha256")
    parsed = asn1_x509.Certificate.load(draft.public_bytes(serialization.Encoding.DER))
    assembled = asn1_x509.Certificate(
        {
            "tbs_certificate": parsed["tbs_certificate"],
            "signature_algorithm": parsed["signature_algorithm"],
            "signature_value": signature,
        }
    )
    return x509.load_der_x509_certificate(assembled.dump())


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
def test_ra_decrypts_every_key_transport(rsa_home: KeyVaultHome, transport: KeyTransport) -> None:
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
    assert ra.decrypt(public.encrypt(content_key, chosen), transport) == content_key


def test_undecryptable_blob_is_a_custody_error(rsa_home: KeyVaultHome) -> None:
    with pytest.raises(CustodyError):
        rsa_home.keys().ra.decrypt(os.urandom(256), KeyTransport.RSA_OAEP_SHA256)


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
    rsa_home.keys().ra.decrypt(public.encrypt(b"k" * 16, padding.PKCS1v15()), KeyTransport.RSA_PKCS1V15)

    vault.reset_counts()
    for _ in range(3):
        keys = rsa_home.keys()
        keys.ra.decrypt(public.encrypt(b"k" * 16, padding.PKCS1v15()), KeyTransport.RSA_PKCS1V15)
        keys.ca.sign_digest(hashlib.sha256(b"tbs").digest(), "sha256")
        rsa_home.keys().ra.sign_digest(hashlib.sha256(b"certrep").digest(), "sha256")
    assert vault.operation_count() == 9
    assert vault.operations["keys.decrypt"] == 3 and vault.operations["keys.sign"] == 6
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


def test_persistent_failure_becomes_custody_error(vault: KeyVaultEmulator) -> None:
    home = make_home(vault, retry_total=2, **FAST_RETRIES)
    init_ca_and_ra(home, KeySpec("RSA", 2048))
    keys = home.keys()
    vault.fail_transiently(100, status=503)
    with pytest.raises(CustodyError, match="sign"):
        keys.ca.sign_digest(hashlib.sha256(b"x").digest(), "sha256")
    vault.fail_transiently(0)
    vault.throttle(100, retry_after=0)
    public = keys.ra.certificate.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    with pytest.raises(CustodyError, match="decrypt"):
        keys.ra.decrypt(public.encrypt(b"k", padding.PKCS1v15()), KeyTransport.RSA_PKCS1V15)


def test_refused_identity_is_a_custody_error(vault: KeyVaultEmulator, entra: EntraEmulator) -> None:
    identity = str(uuid.uuid4())
    entra.register_managed_identity(identity, str(uuid.uuid4()))
    entra.refuse(identity)
    home = KeyVaultHome(
        vault.url,
        ca_name="refused-ca",
        ra_name="refused-ra",
        credential=build_credential(identity),
        verify_challenge_resource=False,
        **FAST_RETRIES,  # type: ignore[arg-type]
    )
    with pytest.raises(CustodyError):
        home.keys()


def test_challenge_resource_is_verified_unless_turned_off(vault: KeyVaultEmulator) -> None:
    strict = KeyVaultHome(vault.url, ca_name="strict-ca", credential=build_credential(MANAGED_IDENTITY))
    with pytest.raises(CustodyError):
        strict.keys()


# Secrets


def test_secret_reader_caches_and_refreshes_after_rotation(vault: KeyVaultEmulator) -> None:
    from azure.keyvault.secrets import SecretClient

    admin = SecretClient(vault.url, build_credential(MANAGED_IDENTITY), verify_challenge_resource=False)
    name = f"intune-secret-{uuid.uuid4().hex[:6]}"
    admin.set_secret(name, "first")
    reader = SecretReader(vault.url, build_credential(MANAGED_IDENTITY), verify_challenge_resource=False)
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
    assert needs_instance_discovery_disabled({"AZURE_AUTHORITY_HOST": entra.url})
    assert not needs_instance_discovery_disabled({"AZURE_AUTHORITY_HOST": "https://login.microsoftonline.com"})
    assert not needs_instance_discovery_disabled({})


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
