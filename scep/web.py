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
from datetime import datetime, timezone

from cryptography.hazmat.primitives import serialization

from scep import __version__
from scep.issuer import fingerprint
from scep.keys import CustodyError
from scep.message import MalformedMessage
from scep.service import ScepService
from scep.store import StoreError

log = logging.getLogger("scep.web")

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024
CONTENT_PKI_MESSAGE = "application/x-pki-message"
CONTENT_CA_RA = "application/x-x509-ca-ra-cert"
CONTENT_NEXT_CA = "application/x-x509-next-ca-cert"
_BASE64_JUNK = re.compile(rb"[\s]")


@dataclass(frozen=True)
class HttpReply:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
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
        return HttpReply(200, "\n".join(service.capabilities()).encode("ascii"), "text/plain")
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
    """CA subject, fingerprint and expiry; whether the store answers. No secrets."""
    report: dict = {"status": "ok", "version": __version__}
    try:
        ca = service.custody.keys().ca.certificate
        report["ca"] = {
            "subject": ca.subject.rfc4514_string(),
            "sha256": fingerprint(ca),
            "notAfter": ca.not_valid_after_utc.isoformat(),
            "expired": ca.not_valid_after_utc <= datetime.now(timezone.utc),
        }
    except CustodyError as error:
        report["status"] = "degraded"
        report["ca"] = {"error": str(error)}
    try:
        service.store.ping()
        report["store"] = {"reachable": True}
    except StoreError as error:
        report["status"] = "degraded"
        report["store"] = {"reachable": False, "error": str(error)}
    status = 200 if report["status"] == "ok" else 503
    return HttpReply(status, json.dumps(report, indent=2).encode("utf-8"), "application/json")
