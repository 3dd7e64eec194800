"""The project's own SCEP client: enrol, renew, poll and fetch certificates from any SCEP server.

Used by `scep enroll`, the tests and the benchmark. It speaks every algorithm the server does, so tests can
cover what the Debian clients do not (AES-192/256, 3DES, SHA-512, OAEP, GET and POST, CertPoll, GetCert, EC
device keys whose replies come in a key-agreement envelope).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID

from scep.core import message as msg
from scep.core.issuer import is_ca_certificate
from scep.core.protocol import ContentCipher, FailInfo, MessageType, PkiStatus
from scep.keys import KeyTransport
from scep.keys.local import LocalKey


class ScepClientError(Exception):
    """The server's answer could not be used (HTTP error, bad signature, nonce mismatch)."""


@dataclass(frozen=True)
class RequestOptions:
    cipher: ContentCipher = ContentCipher.AES128
    digest: str = "sha256"
    transport: KeyTransport = KeyTransport.RSA_PKCS1V15
    method: str = "POST"  # or "GET"


DEFAULT_OPTIONS = RequestOptions()


@dataclass
class Enrollment:
    """What a client needs to build a request and to read the answer."""

    key: PrivateKeyTypes
    csr: x509.CertificateSigningRequest
    transaction_id: str
    signer: LocalKey  # self-signed for PKCSReq, the old certificate for renewals
    message_type: MessageType = MessageType.PKCS_REQ
    sender_nonce: bytes = field(default_factory=lambda: os.urandom(16))


@dataclass(frozen=True)
class Result:
    status: PkiStatus
    fail_info: FailInfo | None = None
    fail_info_text: str | None = None
    certificate: x509.Certificate | None = None
    crl: x509.CertificateRevocationList | None = None  # what a GetCRL reply carries


EC_CURVES = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1, "P-521": ec.SECP521R1}


def new_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def new_device_key(spec: str) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    """A device key from `rsa:<bits>` or `ec:<curve>` (P-256, P-384, P-521)."""
    kind, _, parameter = spec.partition(":")
    if kind.lower() == "rsa" and parameter.isdigit():
        return new_key(int(parameter))
    if kind.lower() == "ec" and parameter.upper() in EC_CURVES:
        return ec.generate_private_key(EC_CURVES[parameter.upper()]())
    raise ValueError(f"key {spec!r}: expected rsa:<bits> or ec:P-256, ec:P-384, ec:P-521")


def make_csr(
    key: PrivateKeyTypes,
    common_name: str,
    challenge: str | None = None,
    dns_names: tuple[str, ...] = (),
    extensions: tuple[x509.ExtensionType, ...] = (),
) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    )
    if dns_names:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), False)
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    if challenge is not None:
        builder = builder.add_attribute(x509.oid.AttributeOID.CHALLENGE_PASSWORD, challenge.encode("utf-8"))
    return builder.sign(key, hashes.SHA256())


def transaction_id_for(public_key) -> str:
    """Apple-style transactionID: uppercase hex SHA-1 of the public key."""
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha1(spki).hexdigest().upper()


def self_signed(key: PrivateKeyTypes, subject: x509.Name) -> x509.Certificate:
    now = datetime.now(timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


def new_enrollment(
    key: PrivateKeyTypes,
    csr: x509.CertificateSigningRequest,
    renew_with: tuple[PrivateKeyTypes, x509.Certificate] | None = None,
    transaction_id: str | None = None,
) -> Enrollment:
    """A PKCSReq signed by a self-signed certificate, or a RenewalReq signed by an existing certificate."""
    if renew_with is None:
        signer = LocalKey(key, self_signed(key, csr.subject))
        kind = MessageType.PKCS_REQ
    else:
        signer = LocalKey(*renew_with)
        kind = MessageType.RENEWAL_REQ
    return Enrollment(key, csr, transaction_id or transaction_id_for(key.public_key()), signer, kind)


def build_request(
    enrollment: Enrollment,
    ra_certificate: x509.Certificate,
    options: RequestOptions,
    content: bytes | None = None,
    message_type: MessageType | None = None,
) -> bytes:
    """A PKIMessage for the enrollment (default content: the CSR), encrypted to the RA certificate."""
    body = content if content is not None else enrollment.csr.public_bytes(serialization.Encoding.DER)
    envelope = msg.seal_envelope(body, ra_certificate, options.cipher, options.transport)
    attributes = msg.request_attributes(
        message_type or enrollment.message_type, enrollment.transaction_id, enrollment.sender_nonce
    )
    return msg.sign_message(enrollment.signer, options.digest, attributes, envelope)


def read_reply(der: bytes, enrollment: Enrollment, ra_certificate: x509.Certificate) -> Result:
    """Verify a CertRep (signer, nonces, transaction) and decrypt the issued certificate."""
    try:
        reply = msg.parse_pki_message(der, allow_legacy=True)
    except (msg.MalformedMessage, msg.MessageError) as error:
        raise ScepClientError(f"unusable CertRep: {error}") from None
    if reply.message_type != MessageType.CERT_REP:
        raise ScepClientError(f"expected a CertRep, got messageType {reply.message_type}")
    if reply.signer_certificate != ra_certificate:
        raise ScepClientError("the CertRep is not signed by the RA certificate")
    if reply.transaction_id != enrollment.transaction_id:
        raise ScepClientError("the CertRep answers another transaction")
    if reply.recipient_nonce != enrollment.sender_nonce:
        raise ScepClientError("the CertRep recipientNonce does not echo our senderNonce")
    if reply.pki_status is not PkiStatus.SUCCESS:
        return Result(reply.pki_status or PkiStatus.FAILURE, reply.fail_info, reply.fail_info_text)
    if not reply.content:
        raise ScepClientError("a SUCCESS CertRep without content")
    inner = _open_reply_envelope(reply.content, enrollment.signer)
    certificates = msg.read_certs_only(inner)
    if certificates:
        return Result(PkiStatus.SUCCESS, certificate=certificates[0])
    crls = msg.read_crls_only(inner)
    if not crls:
        raise ScepClientError("the CertRep carries neither a certificate nor a CRL")
    return Result(PkiStatus.SUCCESS, crl=crls[0])


def _open_reply_envelope(envelope_der: bytes, signer: LocalKey) -> bytes:
    """The reply is enveloped to our signer certificate: key agreement for an EC key, key transport for RSA."""
    if isinstance(signer.private_key, ec.EllipticCurvePrivateKey):
        return msg.open_key_agreement_envelope(envelope_der, signer.private_key)
    envelope = msg.read_envelope(envelope_der, signer.certificate, allow_legacy=True)
    return msg.open_envelope(envelope, signer)


def split_ra_and_ca(certificates: list[x509.Certificate]) -> tuple[x509.Certificate, x509.Certificate]:
    """Tell the RA (not a CA, can encipher keys) from the CA in a GetCACert reply, whatever their order."""
    cas = [c for c in certificates if is_ca_certificate(c)]
    others = [c for c in certificates if not is_ca_certificate(c)]
    if not cas:
        raise ScepClientError("GetCACert carries no CA certificate")
    ca = cas[0]
    if others:
        ra = next((c for c in others if c.issuer == ca.subject), others[0])
        return ra, next((c for c in cas if c.subject == ra.issuer), ca)
    return ca, ca


class ScepClient:
    """HTTP side of SCEP against one server URL (http or https)."""

    def __init__(self, url: str, timeout: float = 30.0):
        self.url = urllib.parse.urlsplit(url)
        self.timeout = timeout

    def capabilities(self) -> list[str]:
        status, _, body = self._get({"operation": "GetCACaps"})
        return [line.strip() for line in body.decode("utf-8", "replace").splitlines() if line.strip()]

    def ca_certificates(self) -> tuple[x509.Certificate, x509.Certificate]:
        """GetCACert as (RA, CA); a server without an RA answers with its CA twice."""
        status, content_type, body = self._get({"operation": "GetCACert", "message": "ca"})
        if not content_type.startswith("application/x-x509-ca-ra-cert"):
            ca = x509.load_der_x509_certificate(body)
            return ca, ca
        return split_ra_and_ca(msg.read_certs_only(body))

    def next_ca_certificates(self, current_ca: x509.Certificate) -> list[x509.Certificate]:
        """GetNextCACert, checked to be signed by the current CA."""
        status, _, body = self._get({"operation": "GetNextCACert", "message": "ca"})
        signer, content = msg.read_signed_content(body)
        if signer != current_ca or content is None:
            raise ScepClientError("GetNextCACert is not signed by the current CA")
        return msg.read_certs_only(content)

    def pki_operation(self, request: bytes, method: str = "POST") -> bytes:
        if method == "GET":
            encoded = base64.b64encode(request).decode("ascii")
            status, content_type, body = self._get({"operation": "PKIOperation", "message": encoded})
        else:
            status, content_type, body = self._request(
                "POST",
                self._path({"operation": "PKIOperation"}),
                request,
                {"Content-Type": "application/x-pki-message"},
            )
        if content_type != "application/x-pki-message":
            raise ScepClientError(f"PKIOperation answered {status} {content_type}: {body[:200]!r}")
        return body

    def enroll(
        self, enrollment: Enrollment, ra: x509.Certificate, options: RequestOptions = DEFAULT_OPTIONS
    ) -> Result:
        reply = self.pki_operation(build_request(enrollment, ra, options), options.method)
        return read_reply(reply, enrollment, ra)

    def poll(
        self,
        enrollment: Enrollment,
        ra: x509.Certificate,
        ca: x509.Certificate,
        options: RequestOptions = DEFAULT_OPTIONS,
    ) -> Result:
        content = msg.issuer_and_subject_der(ca.subject, enrollment.csr.subject)
        enrollment.sender_nonce = os.urandom(16)
        request = build_request(enrollment, ra, options, content, MessageType.CERT_POLL)
        return read_reply(self.pki_operation(request, options.method), enrollment, ra)

    def get_cert(
        self,
        enrollment: Enrollment,
        ra: x509.Certificate,
        issued: x509.Certificate,
        options: RequestOptions = DEFAULT_OPTIONS,
    ) -> Result:
        enrollment.sender_nonce = os.urandom(16)
        content = msg.issuer_and_serial_der(issued)
        request = build_request(enrollment, ra, options, content, MessageType.GET_CERT)
        return read_reply(self.pki_operation(request, options.method), enrollment, ra)

    def _get(self, params: dict[str, str]) -> tuple[int, str, bytes]:
        status, content_type, body = self._request("GET", self._path(params), None, {})
        if status != 200:
            raise ScepClientError(f"{params.get('operation')} answered HTTP {status}: {body[:200]!r}")
        return status, content_type, body

    def _path(self, params: dict[str, str]) -> str:
        return f"{self.url.path or '/'}?{urllib.parse.urlencode(params)}"

    def _request(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, str, bytes]:
        connection_class = http.client.HTTPSConnection if self.url.scheme == "https" else http.client.HTTPConnection
        connection = connection_class(self.url.netloc, timeout=self.timeout)
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            content_type = (response.getheader("Content-Type") or "").split(";")[0].strip()
            return response.status, content_type, response.read()
        finally:
            connection.close()
