"""Revocation over HTTP: the CRL, the CA certificate and the OCSP responder at the URLs issued certificates name
(scep.core.issuer.revocation_pointers), registered in web.ROUTES:

    GET  api/crl/<ca id>.crl          the latest stored CRL of that CA generation (application/pkix-crl)
    GET  api/ca/<ca id>.der           that CA certificate, DER (application/pkix-cert)
    POST api/ocsp                     a DER OCSPRequest (application/ocsp-request -> application/ocsp-response)
    GET  api/ocsp/<base64 of the DER> the same request URL-encoded in the path (RFC 6960 appendix A.1)

OCSP answers always come back as an OCSPResponse with HTTP 200, malformedRequest included (RFC 6960 section 2.3);
only a body larger than MAX_OCSP_REQUEST_BYTES gets 413. Requests that force a signature (a nonce, an unknown
serial, a first question) draw from a per-process SignatureBudget; past it they get tryLater, never a vault call.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING
from urllib.parse import unquote

from cryptography.hazmat.primitives.serialization import Encoding

from scep.core.issuer import ca_id
from scep.core.ocsp import Authority, OcspAnswer, OcspResponder, home_authorities
from scep.core.revocation import crl_headers
from scep.keys import CustodyError, KeyHandle, KeyHome, KeyTransport, SignaturePadding
from scep.store import Store, StoreError

if TYPE_CHECKING:
    from scep.http.web import Backend, HttpReply, Request

MAX_OCSP_REQUEST_BYTES = 16 * 1024  # one CertID with a nonce is ~100 bytes; a signed request with its chain a few KiB
CA_CERTIFICATE_MAX_AGE = 24 * 3600
CONTENT_CRL = "application/pkix-crl"
CONTENT_CERTIFICATE = "application/pkix-cert"
_CA_FILE = re.compile(r"([0-9a-f]{64})\.(crl|der)")


class SignatureBudget:
    """A token bucket of `per_minute` signatures (refilled continuously, at most a minute's worth saved up)."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = per_minute / 60.0
        self._capacity = float(per_minute)
        self._tokens = float(per_minute)
        self._clock = clock
        self._last = clock()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = self._clock()
            self._tokens = min(self._capacity, self._tokens + (now - self._last) * self._rate)
            self._last = now
            if self._tokens < 1:
                return False
            self._tokens -= 1
            return True


@dataclass(frozen=True)
class BudgetedKey:
    """A KeyHandle that signs only while the budget lasts; past it CustodyError, which the responder answers with
    tryLater (RFC 6960 section 2.3), so a flood of nonces or made-up serials never reaches the vault."""

    key: KeyHandle
    budget: SignatureBudget

    @property
    def certificate(self):
        return self.key.certificate

    def sign_digest(
        self, digest: bytes, hash_name: str, padding: SignaturePadding = SignaturePadding.PKCS1V15
    ) -> bytes:
        if not self.budget.take():
            raise CustodyError("OCSP signature budget spent (SCEP_OCSP_SIGNATURES_PER_MINUTE); try later")
        return self.key.sign_digest(digest, hash_name, padding)

    def unwrap_key(self, wrapped_key: bytes, transport: KeyTransport) -> bytes:
        raise CustodyError("an OCSP signer unwraps nothing")


def budgeted(authorities: Sequence[Authority], budget: SignatureBudget) -> list[Authority]:
    return [Authority(authority.ca, BudgetedKey(authority.signer, budget)) for authority in authorities]


def build_responder(store: Store, home: KeyHome, window: timedelta, signatures_per_minute: int) -> OcspResponder:
    """The process's OCSP responder: answers cached for `window`, fresh signatures bounded per minute."""
    budget = SignatureBudget(signatures_per_minute)
    return OcspResponder(store, lambda: budgeted(home_authorities(home), budget), window=window)


def _ca_file(request: Request, kind: str) -> str | None:
    """The CA id named by the last path segment `<ca id>.<kind>`, or None."""
    match = _CA_FILE.fullmatch(request.path.rstrip("/").rsplit("/", 1)[-1].lower())
    return match.group(1) if match and match.group(2) == kind else None


def crl(backend: Backend, request: Request) -> HttpReply:
    from scep.http.web import HttpReply, text

    identifier = _ca_file(request, "crl")
    if identifier is None:
        return text(404, "no such CRL: the path is /api/crl/<lower-case SHA-256 of the CA certificate>.crl")
    try:
        stored = backend.service().store.latest_crl(identifier)
    except StoreError:
        return text(503, "the CRL store is temporarily unavailable")
    if stored is None:
        return text(404, "no CRL is published for this CA")
    headers = crl_headers(stored)
    content_type = headers.pop("Content-Type")
    if request.headers.get("If-None-Match") == headers["ETag"]:
        return HttpReply(304, b"", content_type, headers)
    return HttpReply(200, stored.der, content_type, headers)


def ca_certificate(backend: Backend, request: Request) -> HttpReply:
    from scep.http.web import HttpReply, text

    identifier = _ca_file(request, "der")
    try:
        issuers = backend.service().custody.keys().trusted_issuers()
    except CustodyError:
        return text(503, "the CA is temporarily unavailable")
    for certificate in issuers:
        if identifier is not None and ca_id(certificate) == identifier:
            headers = {"Cache-Control": f"public, max-age={CA_CERTIFICATE_MAX_AGE}"}
            return HttpReply(200, certificate.public_bytes(Encoding.DER), CONTENT_CERTIFICATE, headers)
    return text(404, "no such CA certificate: the path is /api/ca/<lower-case SHA-256 of the CA certificate>.der")


def ocsp_post(backend: Backend, request: Request) -> HttpReply:
    if request.method.upper() == "GET":
        return _answer(backend.ocsp().respond(b""))  # GET without a request: malformedRequest
    from scep.http.web import too_large

    if len(request.body) > MAX_OCSP_REQUEST_BYTES:
        return too_large(MAX_OCSP_REQUEST_BYTES)
    return _answer(backend.ocsp().respond(request.body))


def ocsp_get(backend: Backend, request: Request) -> HttpReply:
    from scep.http.web import decode_message_param, too_large

    encoded = unquote(request.path.split("/ocsp/", 1)[-1] if "/ocsp/" in request.path else "")
    if len(encoded) > MAX_OCSP_REQUEST_BYTES * 4 // 3 + 4:
        return too_large(MAX_OCSP_REQUEST_BYTES)
    return _answer(backend.ocsp().respond(decode_message_param(encoded) or b""))


def _answer(answer: OcspAnswer) -> HttpReply:
    from scep.http.web import HttpReply

    headers = dict(answer.headers)
    return HttpReply(200, answer.der, headers.pop("Content-Type"), headers)
