"""The product's one HTTP boundary (framework-free): the route table, SCEP operation and message parsing, content
types, status codes.

`ROUTES` lists every path the product serves, its methods and its handler; `ScepHttp` answers a framework-free
`Request` with an `HttpReply`. Both adapters are built from that one table and the same `ScepHttp` object:
`functions.py` registers each route as an Azure Functions HTTP function, `asgi.py` is the ASGI application that
`scep serve` runs on gunicorn. Nothing here knows Azure Functions or ASGI.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.hazmat.primitives import serialization

from scep import __version__
from scep.challenge.webhook import WebhookHandler
from scep.core.issuer import fingerprint
from scep.core.maintenance import Expiry, ExpiryState, expiry_of
from scep.core.message import MalformedMessage
from scep.core.ocsp import OcspResponder
from scep.core.service import ScepService
from scep.http import revocation, status
from scep.keys import CustodyError
from scep.store import StoreError

log = logging.getLogger("scep.http.web")

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024
CONTENT_PKI_MESSAGE = "application/x-pki-message"
CONTENT_CA_RA = "application/x-x509-ca-ra-cert"
CONTENT_NEXT_CA = "application/x-x509-next-ca-cert"
CONTENT_TEXT = "text/plain; charset=utf-8"
CONTENT_HTML = "text/html; charset=utf-8"
_BASE64_JUNK = re.compile(rb"[\s]")


@dataclass(frozen=True)
class HttpReply:
    status: int
    body: bytes
    content_type: str = CONTENT_TEXT  # the whole Content-Type header, parameters included
    headers: dict[str, str] = field(default_factory=dict)


def text(status: int, message: str) -> HttpReply:
    return HttpReply(status, (message + "\n").encode("utf-8"))


def too_large(limit: int) -> HttpReply:
    return text(413, f"message larger than {limit} bytes")


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
        return too_large(limit)
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


# --------------------------------------------------------------------------------------------- routes


@dataclass(frozen=True)
class Request:
    """One HTTP request as every adapter hands it over: query parameters first value per name, `+` already
    decoded to a space (as the Functions host and web servers do), the whole body."""

    method: str
    path: str
    params: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    scheme: str = "http"  # as the server received it: "https" directly or behind a proxy it trusts


class Backend(Protocol):
    """What the handlers need from the composition root, once per process."""

    def service(self) -> ScepService: ...

    def max_message_bytes(self) -> int: ...

    def webhooks(self) -> WebhookHandler | None: ...

    def ocsp(self) -> OcspResponder: ...

    def admin(self, action: str, request: Request) -> HttpReply:
        """An admin route's action; the admin API checks the caller before anything else."""
        ...


Handler = Callable[[Backend, Request], HttpReply]


@dataclass(frozen=True)
class Route:
    name: str  # the Azure Functions function name
    path: str  # as a Functions route template is written: no leading slash (host.json routePrefix is ""); a last
    # segment {name} matches one segment, {*name} the rest of the path
    methods: tuple[str, ...]
    handler: Handler
    admin: bool = False  # needs an administrator; in Azure also a function key (auth level FUNCTION)


def _scep(backend: Backend, request: Request) -> HttpReply:
    return handle_scep(backend.service(), request.method, request.params, request.body, backend.max_message_bytes())


def _health(backend: Backend, request: Request) -> HttpReply:
    return health(backend.service())


def _ca_pem(backend: Backend, request: Request) -> HttpReply:
    return ca_download(backend.service(), "pem")


def _ca_der(backend: Backend, request: Request) -> HttpReply:
    return ca_download(backend.service(), "der")


def _status(backend: Backend, request: Request) -> HttpReply:
    page = status.public_page(backend.service(), request.headers)
    return HttpReply(200, page.encode("utf-8"), CONTENT_HTML, {"Cache-Control": "no-store"})


def _webhook(backend: Backend, request: Request, kind: str) -> HttpReply:
    handler = backend.webhooks()
    if handler is None:
        return text(404, "validation webhooks are not configured (SCEP_WEBHOOK_SECRET)")
    limit = backend.max_message_bytes()
    if len(request.body) > limit:
        return too_large(limit)
    handle = handler.handle_challenge if kind == "challenge" else handler.handle_notify
    status, payload = handle(request.body, request.headers)
    return HttpReply(status, json.dumps(payload).encode("utf-8"), "application/json")


def _webhook_challenge(backend: Backend, request: Request) -> HttpReply:
    return _webhook(backend, request, "challenge")


def _webhook_notify(backend: Backend, request: Request) -> HttpReply:
    return _webhook(backend, request, "notify")


def _admin(action: str) -> Handler:
    def handler(backend: Backend, request: Request) -> HttpReply:
        return backend.admin(action, request)

    return handler


_SCEP_METHODS = ("GET", "POST")

# Every route but the admin ones is anonymous: SCEP clients send no credentials, and the webhooks authenticate each
# call by its signature. The paths besides api/scep are the ones SCEP clients use by habit.
ROUTES: tuple[Route, ...] = (
    Route("scep", "api/scep", _SCEP_METHODS, _scep),
    Route("scep_pkiclient", "api/scep/pkiclient.exe", _SCEP_METHODS, _scep),
    Route("scep_cgi_bin", "cgi-bin/pkiclient.exe", _SCEP_METHODS, _scep),
    Route("scep_mscep", "certsrv/mscep/mscep.dll", _SCEP_METHODS, _scep),
    Route("scep_mscep_pkiclient", "certsrv/mscep/mscep.dll/pkiclient.exe", _SCEP_METHODS, _scep),
    Route("health", "api/health", ("GET",), _health),
    Route("ca_pem", "api/ca.pem", ("GET",), _ca_pem),
    Route("ca_der", "api/ca.der", ("GET",), _ca_der),
    Route("ca_crt", "api/ca.crt", ("GET",), _ca_der),
    Route("status", "status", ("GET",), _status),
    Route("webhook_scepchallenge", "api/webhook/scepchallenge", ("POST",), _webhook_challenge),
    Route("webhook_notify", "api/webhook/notify", ("POST",), _webhook_notify),
    Route("admin_login", "api/admin/login", ("GET", "POST"), _admin("login"), admin=True),
    Route("admin_certificates", "api/admin/certificates", ("GET",), _admin("certificates"), admin=True),
    Route("admin_certificate", "api/admin/certificate", ("GET",), _admin("certificate"), admin=True),
    Route("admin_revoke", "api/admin/revoke", ("POST",), _admin("revoke"), admin=True),
    Route("admin_status", "api/admin/status", ("GET", "POST"), _admin("status"), admin=True),
    Route("crl", "api/crl/{ca_file}", ("GET",), revocation.crl),
    Route("ca_issuer", "api/ca/{ca_file}", ("GET",), revocation.ca_certificate),
    Route("ocsp", "api/ocsp", ("GET", "POST"), revocation.ocsp_post),
    Route("ocsp_get", "api/ocsp/{*ocsp_request}", ("GET",), revocation.ocsp_get),
)


class ScepHttp:
    """The route table bound to a backend: the request handling both adapters run."""

    def __init__(self, backend: Backend, routes: tuple[Route, ...] = ROUTES) -> None:
        self.backend = backend
        self.routes = routes
        # Literal paths match case-insensitively and with or without a trailing slash, as on the Functions host.
        self._by_path = {route.path.lower(): route for route in routes if "{" not in route.path}
        self._templates = [(route.path.lower().partition("{")[0], route) for route in routes if "{" in route.path]

    def route_for(self, path: str) -> Route | None:
        key = path.strip("/").lower()
        if key in self._by_path:
            return self._by_path[key]
        for prefix, route in self._templates:
            rest = key[len(prefix):]
            if key.startswith(prefix) and rest and ("{*" in route.path or "/" not in rest):
                return route
        return None

    def handle(self, request: Request) -> HttpReply:
        """Route a request: 404 for an unknown path, 405 (with Allow) for a method the route does not take."""
        route = self.route_for(request.path)
        if route is None:
            return text(404, "not found")
        if request.method.upper() not in route.methods:
            allowed = ", ".join(route.methods)
            return HttpReply(405, f"{route.path} takes {allowed}\n".encode(), CONTENT_TEXT, {"Allow": allowed})
        return self.call(route, request)

    def call(self, route: Route, request: Request) -> HttpReply:
        return route.handler(self.backend, request)
