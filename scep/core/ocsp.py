"""OCSP responder core (RFC 6960, profiled by RFC 5019): DER request in, DER response and HTTP headers out.

For whoever wires HTTP: build one `OcspResponder(store, lambda: home_authorities(home))` per process and answer
POST /api/ocsp (body: DER) and GET /api/ocsp/<base64 of the DER> with `responder.respond(der)` ->
OcspAnswer(der, status, headers). The responder reads the authorities (CA generations and signers) again every
`AUTHORITY_REFRESH` (5 minutes), so a new OCSP signer or a rollover is picked up without a restart.
`respond` never raises: garbage gets malformedRequest, a request about a CA that is not ours gets unauthorized,
a store or vault failure gets tryLater, anything unforeseen internalError (all unsigned, as RFC 6960 section
4.2.1 has them).

Answers (one CertID per request, the RFC 5019 profile; more than one is malformedRequest):
  good      the serial was issued by the CA generation the CertID names and is not revoked
  revoked   with its revocation time and reason (no reason for `unspecified`, as in the CRL)
  unknown   a serial that generation never issued, or a CertID whose issuer name hash is ours but whose key
            hash is not (or the reverse)
The CertID's hash algorithm may be SHA-1 (what clients send), SHA-256, SHA-384 or SHA-512; the response echoes it.

Signer: the delegated OCSP signer (Slot.OCSP: EKU id-kp-OCSPSigning, id-pkix-ocsp-nocheck, issued by the current
CA; its key in custody) for certificates of the CA that issued it; the CA generation's own key otherwise (the
next CA, retired CAs, or when no valid delegated signer exists), which RFC 6960 section 4.2.2.2 allows. The
response names its signer by key hash and carries the delegated certificate when there is one.

Caching and the vault budget. Responses without a nonce are pre-signed and kept in this process for `window`
(1 hour by default) with nextUpdate = thisUpdate + `validity` (4 hours): a certificate asked about at least once
an hour costs at most one signature per hour per instance, whatever the number of requests, and HTTP caches may
keep the answer until the window ends (max-age). Each request still reads the certificate's record from the
store (one point read), and the cache is keyed by what that record says: a revocation made by any instance
changes the key, so the very next request gets a freshly signed `revoked`, no invalidation message needed. A
request with a nonce gets its nonce echoed in a freshly signed, uncacheable response (one signature each), and so
does each distinct unknown serial: rate limiting those is the HTTP layer's job.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509 import ocsp

from scep.core import der
from scep.core.issuer import ca_id, draft, sign_through_custody, tbs_fields, throwaway_certificate
from scep.core.revocation import caching_headers, signing_generations
from scep.keys import CustodyError, KeyHandle, KeyHome
from scep.store import CertStatus, IssuedCertificate, RevocationReason, Store, StoreError

log = logging.getLogger("scep.core.ocsp")

DEFAULT_WINDOW = timedelta(hours=1)
DEFAULT_VALIDITY = timedelta(hours=4)
MAX_CACHED = 100_000
AUTHORITY_REFRESH = timedelta(minutes=5)
OCSP_CONTENT_TYPE = "application/ocsp-response"
OID_OCSP_BASIC = "1.3.6.1.5.5.7.48.1.1"
ENUMERATED = 0x0A
UNCACHED = {"Content-Type": OCSP_CONTENT_TYPE, "Cache-Control": "no-cache, no-store, max-age=0"}


@dataclass(frozen=True)
class Authority:
    """One CA generation and the key that signs OCSP answers about its certificates."""

    ca: KeyHandle
    signer: KeyHandle


@dataclass(frozen=True)
class OcspAnswer:
    der: bytes
    status: str  # "successful", "malformedRequest", "unauthorized", "tryLater", "internalError"
    headers: dict[str, str]


def authorities(
    generations: Sequence[KeyHandle], delegated: KeyHandle | None, now: datetime | None = None
) -> list[Authority]:
    """Pair each CA generation with its signer: the delegated one where it is valid and issued by it."""
    now = now or datetime.now(timezone.utc)
    return [Authority(ca, delegated if _delegated_by(delegated, ca, now) else ca) for ca in generations]


def home_authorities(home: KeyHome) -> list[Authority]:
    """Every CA generation in use with its signer, read from custody now."""
    return authorities(signing_generations(home), home.ocsp_signer())


def _delegated_by(signer: KeyHandle | None, ca: KeyHandle, now: datetime) -> bool:
    if signer is None:
        return False
    certificate = signer.certificate
    if not certificate.not_valid_before_utc <= now < certificate.not_valid_after_utc:
        return False
    try:
        certificate.verify_directly_issued_by(ca.certificate)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


@dataclass(frozen=True)
class _Question:
    name_hash: bytes
    key_hash: bytes
    serial: int
    algorithm: hashes.HashAlgorithm
    nonce: bytes | None


@dataclass(frozen=True)
class _Cached:
    der: bytes
    this_update: datetime
    next_update: datetime
    served_until: datetime


class OcspResponder:
    """Answers OCSP requests from the store; safe for many threads."""

    def __init__(
        self,
        store: Store,
        current_authorities: Callable[[], Sequence[Authority]],
        *,
        window: timedelta = DEFAULT_WINDOW,
        validity: timedelta = DEFAULT_VALIDITY,
        max_cached: int = MAX_CACHED,
        clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        if not timedelta(0) < window < validity:
            raise ValueError("the cache window must be positive and shorter than the validity")
        self._store = store
        self._authorities = current_authorities
        self._window = window
        self._validity = validity
        self._max_cached = max_cached
        self._clock = clock
        self._cache: OrderedDict[tuple, _Cached] = OrderedDict()
        self._lock = threading.Lock()
        self._known: Sequence[Authority] = ()
        self._known_until: datetime | None = None

    def respond(self, request_der: bytes) -> OcspAnswer:
        question = _read_request(request_der)
        if question is None:
            return _unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
        try:
            return self._answer(question)
        except (StoreError, CustodyError) as error:
            log.warning("OCSP request for serial %x deferred: %s", question.serial, error)
            return _unsuccessful(ocsp.OCSPResponseStatus.TRY_LATER)
        except Exception:  # an OCSP client must get an OCSPResponse whatever went wrong (RFC 6960 4.2.1)
            log.exception("OCSP request for serial %x failed", question.serial)
            return _unsuccessful(ocsp.OCSPResponseStatus.INTERNAL_ERROR)

    def _answer(self, question: _Question) -> OcspAnswer:
        now = self._clock()
        match = self._match(question)
        if match is None:
            return _unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED)
        authority, exact = match
        record = self._store.certificate_by_serial(question.serial) if exact else None
        if record is not None and record.issuer_sha256 != ca_id(authority.ca.certificate):
            record = None
        if question.nonce is not None:
            signed = self._sign(authority, question, record, now)
            return OcspAnswer(signed.der, "successful", dict(UNCACHED))
        signed = self._cached_or_signed(authority, question, record, now)
        expires = min(signed.next_update, signed.served_until)
        etag = f'"{hashlib.sha256(signed.der).hexdigest()[:32]}"'
        return OcspAnswer(
            signed.der, "successful", caching_headers(OCSP_CONTENT_TYPE, etag, signed.this_update, expires, now)
        )

    def _match(self, question: _Question) -> tuple[Authority, bool] | None:
        """The authority the CertID names, and whether both its hashes match (False: one of the two only)."""
        partial = None
        for authority in self._current_authorities():
            name_hash, key_hash = _issuer_hashes(authority.ca.certificate, question.algorithm)
            if (name_hash, key_hash) == (question.name_hash, question.key_hash):
                return authority, True
            if partial is None and (name_hash == question.name_hash or key_hash == question.key_hash):
                partial = authority
        return None if partial is None else (partial, False)

    def _current_authorities(self) -> Sequence[Authority]:
        now = self._clock()
        with self._lock:
            if self._known_until is not None and now < self._known_until:
                return self._known
        fresh = tuple(self._authorities())
        with self._lock:
            self._known, self._known_until = fresh, now + AUTHORITY_REFRESH
        return fresh

    def _cached_or_signed(
        self, authority: Authority, question: _Question, record: IssuedCertificate | None, now: datetime
    ) -> _Cached:
        key = (
            question.name_hash,
            question.key_hash,
            question.serial,
            question.algorithm.name,
            None if record is None else (record.status is CertStatus.REVOKED, record.revoked_at),
        )
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and now < cached.served_until:
                self._cache.move_to_end(key)
                return cached
        signed = self._sign(authority, question, record, now)
        with self._lock:
            self._cache[key] = signed
            self._cache.move_to_end(key)
            while len(self._cache) > self._max_cached:
                self._cache.popitem(last=False)
        return signed

    def _sign(
        self, authority: Authority, question: _Question, record: IssuedCertificate | None, now: datetime
    ) -> _Cached:
        this_update = now.replace(microsecond=0)
        next_update = this_update + self._validity
        status, revoked_at, reason = _status_of(record)
        builder = ocsp.OCSPResponseBuilder().add_response_by_hash(
            question.name_hash,
            question.key_hash,
            question.serial,
            question.algorithm,
            status,
            this_update,
            next_update,
            revoked_at,
            reason,
        )
        signer = authority.signer
        builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, throwaway_certificate())
        if question.nonce is not None:
            builder = builder.add_extension(x509.OCSPNonce(question.nonce), critical=False)
        delegated = signer.certificate != authority.ca.certificate
        certificates = der.context(0, der.sequence(signer.certificate.public_bytes(Encoding.DER))) if delegated else b""
        fields = tbs_fields(draft(builder).tbs_response_bytes)
        fields[0] = _responder_id(signer.certificate)  # ResponseData: responderID first (version is the default)
        basic = sign_through_custody(der.sequence(*fields), signer, algorithm_field=None, trailer=certificates)
        response_bytes = der.sequence(der.oid(OID_OCSP_BASIC), der.octet_string(basic))
        response = der.sequence(der.tlv(ENUMERATED, b"\x00"), der.context(0, response_bytes))
        return _Cached(response, this_update, next_update, now + self._window)


def _read_request(request_der: bytes) -> _Question | None:
    """The one CertID (and nonce) of a request, or None when the request is not one we can read."""
    try:
        request = ocsp.load_der_ocsp_request(request_der)
        nonce = None
        for extension in request.extensions:
            if isinstance(extension.value, x509.OCSPNonce):
                nonce = extension.value.nonce
        return _Question(
            request.issuer_name_hash, request.issuer_key_hash, request.serial_number, request.hash_algorithm, nonce
        )
    # cryptography raises NotImplementedError for a request of several CertIDs, which RFC 5019 clients never send
    except (ValueError, TypeError, UnsupportedAlgorithm, NotImplementedError):
        return None


def _issuer_hashes(ca: x509.Certificate, algorithm: hashes.HashAlgorithm) -> tuple[bytes, bytes]:
    """RFC 6960 CertID hashes: of the issuer's DER-encoded name, and of its public key's BIT STRING contents."""
    name_hash = hashes.Hash(algorithm)
    name_hash.update(ca.subject.public_bytes())
    return name_hash.finalize(), _key_hash(ca, algorithm)


def _key_hash(certificate: x509.Certificate, algorithm: hashes.HashAlgorithm) -> bytes:
    key = certificate.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    key_bits = der.contents(der.elements(der.contents(key))[1])[1:]  # SPKI's BIT STRING, without unused bits
    digest = hashes.Hash(algorithm)
    digest.update(key_bits)
    return digest.finalize()


def _responder_id(signer: x509.Certificate) -> bytes:
    """ResponderID byKey: [2] EXPLICIT the SHA-1 of the signer's public key (RFC 6960 section 4.2.1)."""
    return der.context(2, der.octet_string(_key_hash(signer, hashes.SHA1())))


def _status_of(
    record: IssuedCertificate | None,
) -> tuple[ocsp.OCSPCertStatus, datetime | None, x509.ReasonFlags | None]:
    if record is None:
        return ocsp.OCSPCertStatus.UNKNOWN, None, None
    if record.status is not CertStatus.REVOKED or record.revoked_at is None:
        return ocsp.OCSPCertStatus.GOOD, None, None
    reason = record.revocation_reason
    flag = None if reason in (None, RevocationReason.UNSPECIFIED) else x509.ReasonFlags(reason.value)
    return ocsp.OCSPCertStatus.REVOKED, record.revoked_at, flag


def _unsuccessful(status: ocsp.OCSPResponseStatus) -> OcspAnswer:
    body = ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(Encoding.DER)
    return OcspAnswer(body, _STATUS_NAMES[status], dict(UNCACHED))


_STATUS_NAMES = {
    ocsp.OCSPResponseStatus.MALFORMED_REQUEST: "malformedRequest",
    ocsp.OCSPResponseStatus.INTERNAL_ERROR: "internalError",
    ocsp.OCSPResponseStatus.TRY_LATER: "tryLater",
    ocsp.OCSPResponseStatus.UNAUTHORIZED: "unauthorized",
}
