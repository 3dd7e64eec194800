"""SCEP over HTTP: operation and message parsing, content types, status codes (framework-free).

`functions.py` adapts Azure Functions requests to `handle_scep`; nothing here knows Azure Functions.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import serialization

from scep import __version__
from scep.core.issuer import fingerprint
from scep.core.maintenance import Expiry, ExpiryState, expiry_of
from scep.core.message import MalformedMessage
from scep.core.service import ScepService
from scep.keys import CustodyError
from scep.store import StoreError

log = logging.getLogger("scep.http.web")

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024
CONTENT_PKI_MESSAGE = "application/x-pki-message"
CONTENT_CA_RA = "application/x-x509-ca-ra-cert"
CONTENT_NEXT_CA = "application/x-x509-next-ca-cert"
CONTENT_TEXT = "text/plain; charset=utf-8"
_BASE64_JUNK = re.compile(rb"[\s]")


@dataclass(frozen=True)
class HttpReply:
    status: int
    body: bytes
    content_type: str = CONTENT_TEXT  # the whole Content-Type header, parameters included
    headers: dict[str, str] = field(default_factory=dict)


def text(status: int, message: str) -> HttpReply:
    return HttpReply(status, (message + "\n").encode("utf-8"))


def handle_scep(
    service: ScepService,
    method: str,
    params: Mapping[str, str],
    body: bytes,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> HttpReply:
    """One SCEP HTTP request -> reply. Never raises: bad input gets a 4xx, backend trouble a 503."""
    operation = _param(params, "operation")
    if operation is None:
        return text(400, "missing operation parameter")
    try:
        return _dispatch(service, method.upper(), operation, params, body, max_message_bytes)
    except MalformedMessage as error:
        log.info("rejected malformed %s: %s", operation, error)
        return text(400, f"malformed SCEP message: {error}")
    except (CustodyError, StoreError) as error:
        log.error("%s failed: %s", operation, error)
        return text(503, "the CA is temporarily unavailable")


def _dispatch(
    service: ScepService, method: str, operation: str, params: Mapping[str, str], body: bytes, limit: int
) -> HttpReply:
    name = operation.lower()
    if name == "getcacaps":
        return HttpReply(200, "\n".join(service.capabilities()).encode("ascii"), CONTENT_TEXT)
    if name == "getcacert":
        return HttpReply(200, service.ca_certificates(), CONTENT_CA_RA)
    if name == "getnextcacert":
        next_ca = service.next_ca_certificates()
        if next_ca is None:
            return text(404, "no next CA certificate is published")
        return HttpReply(200, next_ca, CONTENT_NEXT_CA)
    if name == "pkioperation":
        message = _pki_message(method, params, body, limit)
        if isinstance(message, HttpReply):
            return message
        reply = service.pki_operation(message)
        return HttpReply(200, reply.der, CONTENT_PKI_MESSAGE)
    return text(400, f"unknown operation {operation[:40]!r}")


def _pki_message(method: str, params: Mapping[str, str], body: bytes, limit: int) -> bytes | HttpReply:
    if method == "POST":
        data = body
    elif method == "GET":
        encoded = _param(params, "message")
        if not encoded:
            return text(400, "PKIOperation over GET needs a message parameter")
        if len(encoded) > limit * 4 // 3 + 1024:
            return text(413, "message too large")
        data = decode_message_param(encoded)
        if data is None:
            return text(400, "the message parameter is not base64")
    else:
        return text(405, "PKIOperation takes GET or POST")
    if not data:
        return text(400, "empty PKIOperation message")
    if len(data) > limit:
        return text(413, f"message larger than {limit} bytes")
    return data


def decode_message_param(value: str) -> bytes | None:
    """Base64 as devices really send it: '+' turned into ' ' by unescaped query strings (Apple), line breaks
    (Cisco, strongSwan), base64url, missing padding."""
    raw = value.encode("ascii", "ignore").replace(b" ", b"+")
    raw = _BASE64_JUNK.sub(b"", raw).replace(b"-", b"+").replace(b"_", b"/").rstrip(b"=")
    raw += b"=" * (-len(raw) % 4)
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        return None


def _param(params: Mapping[str, str], name: str) -> str | None:
    if name in params:
        return params[name]
    for key, value in params.items():
        if key.lower() == name:
            return value
    return None


def ca_download(service: ScepService, form: str) -> HttpReply:
    """The issuing CA certificate, for Intune's trusted certificate profile."""
    certificate = service.custody.keys().ca.certificate
    if form == "pem":
        body = certificate.public_bytes(serialization.Encoding.PEM)
        return HttpReply(200, body, "application/x-pem-file", {"Content-Disposition": 'attachment; filename="ca.pem"'})
    body = certificate.public_bytes(serialization.Encoding.DER)
    return HttpReply(200, body, "application/pkix-cert", {"Content-Disposition": 'attachment; filename="ca.cer"'})


def health(service: ScepService) -> HttpReply:
    """CA and RA expiry, whether custody and the store answer. No secrets, no key operation.

    status "ok"; "degraded" when the CA or RA expires within 30 days (HTTP 200: the CA still serves) or custody
    or the store fails (HTTP 503); "expired" when the CA or RA has expired (HTTP 503: devices refuse its replies).
    """
    report: dict = {"status": "ok", "version": __version__}
    serving = True
    try:
        keys = service.custody.keys()
    except CustodyError as error:
        report["status"], serving = "degraded", False
        report["ca"] = {"error": str(error)}
    else:
        expiries = expiry_of(keys)
        for expiry in expiries:
            report[expiry.role.lower()] = _certificate_report(expiry)
        states = {expiry.state for expiry in expiries}
        if ExpiryState.EXPIRED in states:
            report["status"], serving = "expired", False
        elif ExpiryState.EXPIRING in states:
            report["status"] = "degraded"
    try:
        service.store.ping()
        report["store"] = {"reachable": True}
    except StoreError as error:
        report["status"] = "degraded" if report["status"] == "ok" else report["status"]
        serving = False
        report["store"] = {"reachable": False, "error": str(error)}
    return HttpReply(200 if serving else 503, json.dumps(report, indent=2).encode("utf-8"), "application/json")


def _certificate_report(expiry: Expiry) -> dict:
    certificate = expiry.certificate
    return {
        "subject": certificate.subject.rfc4514_string(),
        "sha256": fingerprint(certificate),
        "notAfter": expiry.not_after.isoformat(),
        "daysLeft": expiry.days_left,
        "expiry": expiry.state.value,
        "expired": expiry.state is ExpiryState.EXPIRED,
    }
