"""What a certificate says: the issuance profile, extensions, serials, validity; TBSCertificate -> signed.

Certificates are assembled with `cryptography`'s builder, and the signature comes from a `KeyHandle`, so the
CA key never has to be in this process: the builder signs with a throwaway Ed25519 key, the TBSCertificate is
given the CA's signature algorithm, and custody signs its digest. `sign_through_custody` is that step for any
signed DER structure (certificates here, CRLs and OCSP responses in scep.core.revocation and scep.core.ocsp):
one key operation per structure.

Where to check revocation: with `Profile.public_base_url` set (e.g. "http://pki.example.com"; plain HTTP is
what RFC 5280 section 4.2.1.13 and RFC 5019 expect, and avoids TLS to check TLS), every device certificate
names, for the CA generation that issued it (`ca_id`: the lower-case hex SHA-256 of the CA certificate's DER,
the same value the store records as issuer_sha256):
  CRL Distribution Point   <base>/api/crl/<ca_id>.crl   the latest CRL, DER
  AIA caIssuers            <base>/api/ca/<ca_id>.der    the issuing CA certificate, DER
  AIA OCSP                 <base>/api/ocsp              the OCSP responder (POST, or GET <base>/api/ocsp/<base64>)
None (the default) leaves the three out.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import lru_cache

from asn1crypto import algos
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier

from scep.core import der
from scep.core.der import fingerprint as fingerprint  # where the HTTP layer and tools look for it
from scep.core.protocol import FailInfo
from scep.keys import KeyHandle, SignaturePadding

BACKDATE = timedelta(minutes=5)
SERIAL_BITS = 128
DEFAULT_MIN_RSA_BITS = 2048

OID_IPSEC_IKE = ObjectIdentifier("1.3.6.1.5.5.7.3.17")
OID_SMARTCARD_LOGON = ObjectIdentifier("1.3.6.1.4.1.311.20.2.2")
EKU_NAMES = {
    "clientAuth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "serverAuth": ExtendedKeyUsageOID.SERVER_AUTH,
    "emailProtection": ExtendedKeyUsageOID.EMAIL_PROTECTION,
    "codeSigning": ExtendedKeyUsageOID.CODE_SIGNING,
    "ipsecIKE": OID_IPSEC_IKE,
    "smartcardLogon": OID_SMARTCARD_LOGON,
}
DEFAULT_EKU_NAMES = ("clientAuth", "serverAuth", "emailProtection", "ipsecIKE", "smartcardLogon")
DEFAULT_ALLOWED_EKUS = frozenset(EKU_NAMES[name] for name in DEFAULT_EKU_NAMES)
ALLOWED_EC_CURVES = frozenset({"secp256r1", "secp384r1", "secp521r1"})
DEVICE_KEY_USAGES = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
)


class PolicyError(Exception):
    """The request asks for something the profile does not allow."""

    def __init__(self, fail_info: FailInfo, reason: str):
        super().__init__(reason)
        self.fail_info = fail_info
        self.reason = reason


@dataclass(frozen=True)
class Profile:
    validity_days: int = 365
    min_rsa_bits: int = DEFAULT_MIN_RSA_BITS
    max_rsa_bits: int = 8192
    allowed_ekus: frozenset = field(default_factory=lambda: DEFAULT_ALLOWED_EKUS)
    backdate: timedelta = BACKDATE
    public_base_url: str | None = None  # where CRLs, CA certificates and OCSP are served; None: not named


@lru_cache(maxsize=16)
def ca_id(ca: x509.Certificate) -> str:
    """The identifier of a CA generation in URLs and in the store: lower-case hex SHA-256 of its DER."""
    return fingerprint(ca).lower()


def crl_url(base_url: str, ca: x509.Certificate) -> str:
    return f"{base_url.rstrip('/')}/api/crl/{ca_id(ca)}.crl"


def ca_certificate_url(base_url: str, ca: x509.Certificate) -> str:
    return f"{base_url.rstrip('/')}/api/ca/{ca_id(ca)}.der"


def ocsp_url(base_url: str) -> str:
    return f"{base_url.rstrip('/')}/api/ocsp"


@lru_cache(maxsize=16)
def revocation_pointers(base_url: str, ca: x509.Certificate) -> tuple[x509.ExtensionType, ...]:
    """CRL Distribution Points and Authority Information Access (OCSP, caIssuers) for a certificate of ca (the
    same for every certificate of that CA, so built once)."""
    uri = x509.UniformResourceIdentifier
    distribution = x509.DistributionPoint([uri(crl_url(base_url, ca))], None, None, None)
    access = [
        x509.AccessDescription(x509.AuthorityInformationAccessOID.OCSP, uri(ocsp_url(base_url))),
        x509.AccessDescription(x509.AuthorityInformationAccessOID.CA_ISSUERS, uri(ca_certificate_url(base_url, ca))),
    ]
    return x509.CRLDistributionPoints([distribution]), x509.AuthorityInformationAccess(access)


def random_serial() -> int:
    """A positive 128-bit random serial number (never zero)."""
    return secrets.randbits(SERIAL_BITS) or 1


def check_request_key(csr: x509.CertificateSigningRequest, profile: Profile) -> None:
    key = csr.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < profile.min_rsa_bits:
            raise PolicyError(
                FailInfo.BAD_ALG,
                f"a {key.key_size}-bit RSA key is below this CA's minimum of {profile.min_rsa_bits} bits "
                "(SCEP_MIN_RSA_KEY_BITS)",
            )
        if key.key_size > profile.max_rsa_bits:
            raise PolicyError(FailInfo.BAD_ALG, f"RSA keys above {profile.max_rsa_bits} bits are refused")
        if key.public_numbers().e < 65537 or key.public_numbers().e % 2 == 0:
            raise PolicyError(FailInfo.BAD_ALG, "the RSA public exponent is not acceptable")
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ALLOWED_EC_CURVES:
            raise PolicyError(FailInfo.BAD_ALG, f"EC curve {key.curve.name} is not accepted")
    else:
        raise PolicyError(FailInfo.BAD_ALG, "only RSA and EC keys are accepted")


def device_certificate(
    csr: x509.CertificateSigningRequest,
    ca: KeyHandle,
    profile: Profile,
    serial: int,
    now: datetime | None = None,
) -> x509.Certificate:
    """Issue an end-entity certificate for a CSR under the profile; raises PolicyError when it may not."""
    check_request_key(csr, profile)
    requested = _requested_extensions(csr)
    san = requested.get(x509.SubjectAlternativeName)
    if len(csr.subject) == 0 and san is None:
        raise PolicyError(FailInfo.BAD_REQUEST, "the request has neither a subject nor a subjectAltName")
    _refuse_ca_requests(requested)
    ca_certificate = ca.certificate
    now = now or datetime.now(timezone.utc)
    not_after = min(now + timedelta(days=profile.validity_days), ca_certificate.not_valid_after_utc)
    if not_after <= now:
        raise PolicyError(FailInfo.BAD_TIME, "the CA certificate has expired")
    builder = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(ca_certificate.subject)
        .public_key(csr.public_key())
        .serial_number(serial)
        .not_valid_before(now - profile.backdate)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(csr, requested.get(x509.KeyUsage)), critical=True)
        .add_extension(_extended_key_usage(requested.get(x509.ExtendedKeyUsage), profile), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False)
        .add_extension(authority_key_id(ca_certificate), critical=False)
    )
    if san is not None:
        builder = builder.add_extension(san, critical=len(csr.subject) == 0)
    if profile.public_base_url:
        for pointer in revocation_pointers(profile.public_base_url, ca_certificate):
            builder = builder.add_extension(pointer, critical=False)
    return sign_certificate(builder, ca)


def ca_certificate(
    subject: x509.Name,
    public_key,
    signer: KeyHandle,
    issuer: x509.Certificate | None,
    days: int,
    path_length: int | None = None,
) -> x509.Certificate:
    """A CA certificate: self-signed root when issuer is None, else signed by issuer's key (signer)."""
    now = datetime.now(timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(public_key)
        .serial_number(random_serial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_usage(key_cert_sign=True, crl_sign=True, digital_signature=True), critical=True)
        .add_extension(ski, critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(authority_key_id(issuer), critical=False)
    return sign_certificate(builder, signer, public_key if issuer is None else issuer.public_key())


def ra_certificate(subject: x509.Name, public_key, ca: KeyHandle, days: int) -> x509.Certificate:
    """The RA certificate: digitalSignature + keyEncipherment, issued by the CA, never a CA itself."""
    builder = _service_certificate(subject, public_key, ca.certificate, days).add_extension(
        _usage(digital_signature=True, key_encipherment=True), critical=True
    )
    return sign_certificate(builder, ca)


def ocsp_signer_certificate(subject: x509.Name, public_key, ca: KeyHandle, days: int) -> x509.Certificate:
    """A delegated OCSP responder (RFC 6960 section 4.2.2.2): digitalSignature, EKU id-kp-OCSPSigning, and
    id-pkix-ocsp-nocheck, so clients do not ask about the responder's own status (section 4.2.2.2.1)."""
    builder = (
        _service_certificate(subject, public_key, ca.certificate, days)
        .add_extension(_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
        .add_extension(x509.OCSPNoCheck(), critical=False)
    )
    return sign_certificate(builder, ca)


def _service_certificate(subject: x509.Name, public_key, ca_cert: x509.Certificate, days: int):
    """The common part of the CA's own end-entity certificates (RA, OCSP signer), ending with the CA."""
    now = datetime.now(timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(random_serial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(authority_key_id(ca_cert), critical=False)
    )


def sign_certificate(builder: x509.CertificateBuilder, signer: KeyHandle, signer_public_key=None) -> x509.Certificate:
    """Sign a certificate through custody: TBSCertificate -> digest -> KeyHandle.sign_digest -> Certificate."""
    tbs = draft(builder).tbs_certificate_bytes
    field_index = 2 if der.contents(tbs)[:1] == b"\xa0" else 1  # after version (if any) and serialNumber
    signed = sign_through_custody(tbs, signer, signer_public_key, algorithm_field=field_index)
    return x509.load_der_x509_certificate(signed)


def draft(builder):
    """What a cryptography builder makes when it signs with a throwaway Ed25519 key: only its to-be-signed part
    is used, re-signed through custody by sign_through_custody."""
    return builder.sign(_throwaway_key(), None)


def tbs_fields(tbs: bytes) -> list[bytes]:
    """The encoded fields of a DER SEQUENCE."""
    return der.elements(der.contents(tbs))


def sign_through_custody(
    tbs: bytes,
    signer: KeyHandle,
    signer_public_key=None,
    *,
    algorithm_field: int | None,
    trailer: bytes = b"",
) -> bytes:
    """SEQUENCE { tbs, AlgorithmIdentifier, BIT STRING signature, trailer }, signed by one custody operation.

    algorithm_field: the index of tbs's own copy of the signature AlgorithmIdentifier (TBSCertificate,
    TBSCertList), replaced by the signer's; None when tbs carries none (OCSP ResponseData). trailer: what follows
    the signature (the certificates of a BasicOCSPResponse)."""
    public_key = signer_public_key or signer.certificate.public_key()
    hash_name, algorithm_der = _signature_algorithm(public_key)
    if algorithm_field is not None:
        fields = tbs_fields(tbs)
        fields[algorithm_field] = algorithm_der
        tbs = der.sequence(*fields)
    digest = hashlib.new(hash_name, tbs).digest()
    signature = signer.sign_digest(digest, hash_name, SignaturePadding.PKCS1V15)
    return der.sequence(tbs, algorithm_der, der.bit_string(signature), trailer)


def is_ca_certificate(certificate: x509.Certificate) -> bool:
    try:
        return certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


@lru_cache(maxsize=1)
def _throwaway_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@lru_cache(maxsize=1)
def throwaway_certificate() -> x509.Certificate:
    """A certificate over the throwaway key, for builders that insist on a certificate matching the key they sign
    with (OCSP's responder_id); the caller replaces what it names before custody signs."""
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "draft")])
    now = datetime.now(timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(_throwaway_key().public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
    )
    return draft(builder)


def _signature_algorithm(public_key) -> tuple[str, bytes]:
    if isinstance(public_key, rsa.RSAPublicKey):
        hash_name = "sha256" if public_key.key_size <= 3072 else "sha384"
        return hash_name, _algorithm_der(f"{hash_name}_rsa")
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        hash_name = {"secp256r1": "sha256", "secp384r1": "sha384"}.get(public_key.curve.name, "sha512")
        return hash_name, _algorithm_der(f"{hash_name}_ecdsa")
    raise ValueError("CA keys are RSA or EC")


@lru_cache(maxsize=16)
def _algorithm_der(name: str) -> bytes:
    # RSA algorithm identifiers carry NULL parameters; ECDSA ones carry none (RFC 4055, RFC 5758).
    value = {"algorithm": name, "parameters": None} if name.endswith("_rsa") else {"algorithm": name}
    return algos.SignedDigestAlgorithm(value).dump()


def _requested_extensions(csr: x509.CertificateSigningRequest) -> dict[type, x509.ExtensionType]:
    try:
        return {type(ext.value): ext.value for ext in csr.extensions}
    except (ValueError, x509.DuplicateExtension) as error:
        raise PolicyError(FailInfo.BAD_REQUEST, f"unreadable extension request: {error}") from None


def _refuse_ca_requests(requested: dict[type, x509.ExtensionType]) -> None:
    constraints = requested.get(x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        raise PolicyError(FailInfo.BAD_REQUEST, "a device certificate cannot be a CA (basicConstraints CA:true)")
    usage = requested.get(x509.KeyUsage)
    if usage is not None and (usage.key_cert_sign or usage.crl_sign):
        raise PolicyError(FailInfo.BAD_REQUEST, "keyCertSign and cRLSign are never issued to devices")


def _key_usage(csr: x509.CertificateSigningRequest, requested: x509.KeyUsage | None) -> x509.KeyUsage:
    is_rsa = isinstance(csr.public_key(), rsa.RSAPublicKey)
    if requested is None:
        return _usage(digital_signature=True, key_encipherment=is_rsa, key_agreement=not is_rsa)
    wanted = {name: getattr(requested, name) for name in DEVICE_KEY_USAGES}
    if not is_rsa and (wanted["key_encipherment"] or wanted["data_encipherment"]):
        raise PolicyError(FailInfo.BAD_REQUEST, "EC keys cannot be used for key or data encipherment")
    if not any(wanted.values()):
        raise PolicyError(FailInfo.BAD_REQUEST, "the requested key usage is empty")
    return _usage(**wanted)


def _extended_key_usage(requested: x509.ExtendedKeyUsage | None, profile: Profile) -> x509.ExtendedKeyUsage:
    if requested is None:
        return x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    refused = [oid.dotted_string for oid in requested if oid not in profile.allowed_ekus]
    if refused:
        raise PolicyError(FailInfo.BAD_REQUEST, f"extended key usage not allowed: {', '.join(refused)}")
    return requested


@lru_cache(maxsize=16)
def authority_key_id(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())


def _usage(**flags: bool) -> x509.KeyUsage:
    names = (*DEVICE_KEY_USAGES, "key_cert_sign", "crl_sign")
    return x509.KeyUsage(**{name: flags.get(name, False) for name in names}, encipher_only=False, decipher_only=False)
