"""The admin API (JSON): the certificate inventory, one certificate, revoke by serial. `scep certs` runs the same
operations (`list_certificates`, `show_certificate`, `revoke_certificate`) on the same store.

Serial numbers are hexadecimal as `openssl x509 -serial` prints them (`serial=` prefix and colons optional, any
case); reasons are RFC 5280 CRLReason names (`keyCompromise`, ...) or their numeric codes. Every route answers
only an administrator (admin_auth.require_admin); bad input gets a 4xx with a JSON `error` and `message`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from scep import config
from scep.core import revocation
from scep.core.service import ScepService
from scep.http import admin_auth, status
from scep.http.web import HttpReply, Request
from scep.keys import KeyHome
from scep.store import (
    MAX_PAGE_SIZE,
    CertificatePage,
    CertificateQuery,
    CertStatus,
    IssuedCertificate,
    RevocationReason,
    Revoked,
    Store,
    StoreError,
    UnknownSerial,
    serial_hex,
)

log = logging.getLogger("scep.http.admin_api")

MAX_SERIAL_DIGITS = 40  # RFC 5280 4.1.2.2: at most 20 octets
MAX_DAYS = 36500
DEFAULT_PAGE_SIZE = 100
_HEX = re.compile(r"[0-9a-f]+")
# RFC 5280 5.3.1 CRLReason codes of the reasons this CA uses (certificateHold, removeFromCRL: never)
REASON_CODES = {
    0: RevocationReason.UNSPECIFIED,
    1: RevocationReason.KEY_COMPROMISE,
    2: RevocationReason.CA_COMPROMISE,
    3: RevocationReason.AFFILIATION_CHANGED,
    4: RevocationReason.SUPERSEDED,
    5: RevocationReason.CESSATION_OF_OPERATION,
    9: RevocationReason.PRIVILEGE_WITHDRAWN,
}


class BadInput(ValueError):
    """A parameter of an admin request is malformed; the message says which and what is expected."""


# --------------------------------------------------------------------------------------------- parsing


def parse_serial(text: str) -> int:
    """'0A:1B:...', '0a1b...', 'serial=0A1B...' -> the serial number."""
    digits = text.strip().lower().removeprefix("serial=").replace(":", "")
    if not digits or len(digits) > MAX_SERIAL_DIGITS or not _HEX.fullmatch(digits):
        raise BadInput(f"serial must be hexadecimal as openssl x509 -serial prints it, not {text[:60]!r}")
    return int(digits, 16)


def parse_reason(text: str) -> RevocationReason:
    value = text.strip()
    if value.isdigit() and int(value) in REASON_CODES:
        return REASON_CODES[int(value)]
    for reason in RevocationReason:
        if value.lower() == reason.value.lower():
            return reason
    names = ", ".join(reason.value for reason in RevocationReason)
    raise BadInput(f"reason must be one of {names} (or its RFC 5280 code), not {value[:60]!r}")


def parse_status(text: str) -> CertStatus:
    try:
        return CertStatus(text.strip().lower())
    except ValueError:
        names = ", ".join(status.value for status in CertStatus)
        raise BadInput(f"status must be one of {names}, not {text[:60]!r}") from None


def parse_count(name: str, text: str, low: int, high: int) -> int:
    if not text.strip().isdigit() or not low <= int(text) <= high:
        raise BadInput(f"{name} must be a whole number from {low} to {high}, not {text[:20]!r}")
    return int(text)


# --------------------------------------------------------------------------------------------- the operations


@dataclass(frozen=True)
class InventoryFilter:
    subject: str | None = None  # the start of the RFC 4514 subject, e.g. "CN=device-"
    status: CertStatus | None = None
    expiring_within_days: int | None = None
    limit: int = DEFAULT_PAGE_SIZE
    page: str | None = None


def list_certificates(store: Store, wanted: InventoryFilter) -> dict:
    now = datetime.now(timezone.utc)
    within = wanted.expiring_within_days
    query = CertificateQuery(
        subject_prefix=wanted.subject, status=wanted.status, limit=wanted.limit, page=wanted.page,
        expires_after=now if within is not None else None,
        expires_before=now + timedelta(days=within) if within is not None else None,
    )
    page = store.find_certificates(query)
    return {"items": [certificate_view(item) for item in page.items], "nextPage": page.next_page}


def show_certificate(store: Store, serial: int) -> dict:
    certificate = store.certificate_by_serial(serial)
    if certificate is None:
        raise _unknown(serial)
    return certificate_view(certificate)


def _unknown(serial: int) -> UnknownSerial:
    return UnknownSerial(f"no certificate with serial {serial_hex(serial)} was issued by this CA")


def revoke_certificate(
    store: Store, home: KeyHome, serial: int, reason: RevocationReason, crl_validity: timedelta
) -> dict:
    """Revoke (idempotent: revoking again reports the first time and reason), then publish a new CRL and replace
    the certificate's cached OCSP response at once."""
    try:
        revoked = store.revoke(serial, reason, datetime.now(timezone.utc))
    except UnknownSerial:
        raise _unknown(serial) from None
    view = revocation_view(revoked)
    if not revoked.already:
        log.warning("certificate %s revoked (%s)", serial_hex(serial), reason.value)
        view["crlPublished"] = revocation.publish_now(store, home, crl_validity)
    return view


def certificate_view(certificate: IssuedCertificate) -> dict:
    return {
        "serial": serial_hex(certificate.serial),
        "subject": certificate.subject,
        "status": certificate.status.value,
        "notBefore": certificate.not_before.isoformat(),
        "notAfter": certificate.not_after.isoformat(),
        "transactionId": certificate.transaction_id,
        "thumbprintSha1": certificate.thumbprint_sha1,
        "issuerSha256": certificate.issuer_sha256,
        "revokedAt": certificate.revoked_at.isoformat() if certificate.revoked_at else None,
        "revocationReason": certificate.revocation_reason.value if certificate.revocation_reason else None,
    }


def revocation_view(revoked: Revoked) -> dict:
    revocation = revoked.revocation
    return {
        "serial": serial_hex(revocation.serial),
        "status": CertStatus.REVOKED.value,
        "alreadyRevoked": revoked.already,
        "revokedAt": revocation.revoked_at.isoformat(),
        "reason": revocation.reason.value,
    }


# --------------------------------------------------------------------------------------------- HTTP


def handle(action: str, request: Request, service: Callable[[], ScepService]) -> HttpReply:
    """One admin request: the login form needs no admin; every other action needs one before anything is read."""
    if action == "login":
        return admin_auth.login(request)
    principal = admin_auth.require_admin(request)
    if isinstance(principal, HttpReply):
        return _sign_in_first(request, principal) if action == "status" else principal
    if action == "status":
        return _status_page(service(), request, principal)
    try:
        return _json(200, _ACTIONS[action](service(), request))
    except BadInput as error:
        return _error(400, "bad_request", str(error))
    except UnknownSerial as error:
        return _error(404, "not_found", str(error))
    except StoreError as error:
        log.error("admin %s failed: %s", action, error)
        return _error(503, "unavailable", "the inventory is temporarily unavailable")


# --------------------------------------------------------------------------------------------- the admin page


def _sign_in_first(request: Request, refused: HttpReply) -> HttpReply:
    """A browser opening the admin page without a (valid) session gets the sign-in form, still with 401 and no
    data; Entra ID callers (no form) and every other refusal get the refusal itself."""
    if refused.status != 401 or request.method.upper() != "GET" or config.settings().admin.mode != "credential":
        return refused
    page = status.login_page(status.ADMIN_PATH)
    return HttpReply(401, page.encode("utf-8"), "text/html; charset=utf-8", {**refused.headers, **status.ADMIN_HEADERS})


def _status_page(service: ScepService, request: Request, principal: admin_auth.AdminPrincipal) -> HttpReply:
    """GET: counts, failures, the search; POST: revoke one certificate (as the API's revoke), then the page."""
    notice, problem, code = "", "", 200
    try:
        if request.method.upper() == "POST":
            notice = _revoke_from_form(service, request)
        search = status.Search(request.params.get("by", "subject"), request.params.get("q", "").strip(),
                               request.params.get("status", ""))
        results = _search(service.store, search, request.params.get("page") or None)
    except (BadInput, UnknownSerial, ValueError) as error:
        problem, code, search, results = str(error), 400, status.Search(), None
    try:
        view = status.admin_view(service, principal.name, principal.csrf_token, search, results, notice, problem)
    except StoreError as error:
        log.error("admin page failed: %s", error)
        return HttpReply(503, b"the inventory is temporarily unavailable\n", "text/plain; charset=utf-8")
    return HttpReply(code, status.render_admin(view).encode("utf-8"), "text/html; charset=utf-8",
                     status.ADMIN_HEADERS)


def _revoke_from_form(service: ScepService, request: Request) -> str:
    fields = admin_auth.form_fields(request)
    serial = parse_serial(_required(fields, "serial"))
    done = revoke_certificate(
        service.store, service.custody, serial, parse_reason(_required(fields, "reason")), service.options.crl_validity
    )
    if done["alreadyRevoked"]:
        return f"Certificate {done['serial']} was already revoked ({done['reason']}, {done['revokedAt']})."
    published = "a new CRL is published" if done.get("crlPublished") else "the CRL is published at the next run"
    return f"Certificate {done['serial']} revoked ({done['reason']}); {published}."


def _search(store: Store, search: status.Search, page: str | None) -> CertificatePage | None:
    """The inventory page the search form asks for; None before anything was searched."""
    if search.by not in status.SEARCH_FIELDS:
        raise BadInput(f"search by one of {', '.join(status.SEARCH_FIELDS)}, not {search.by[:20]!r}")
    wanted = parse_status(search.status) if search.status else None
    if not search.text and wanted is None:
        return None
    text = search.text or None
    query = CertificateQuery(
        subject_prefix=text if search.by == "subject" else None,
        san=text if search.by == "san" else None,
        serial=parse_serial(search.text) if search.by == "serial" and text else None,
        thumbprint_sha1=_thumbprint(search.text) if search.by == "thumbprint" and text else None,
        status=wanted, limit=DEFAULT_PAGE_SIZE, page=page,
    )
    return store.find_certificates(query)


def _thumbprint(text: str) -> str:
    digits = text.strip().replace(":", "").lower()
    if len(digits) != 40 or not _HEX.fullmatch(digits):
        raise BadInput("a SHA-1 thumbprint is 40 hexadecimal digits (colons allowed)")
    return digits


def _list(service: ScepService, request: Request) -> dict:
    params = request.params
    status, within = params.get("status"), params.get("expiringWithinDays")
    wanted = InventoryFilter(
        subject=params.get("subject") or None,
        status=parse_status(status) if status else None,
        expiring_within_days=parse_count("expiringWithinDays", within, 0, MAX_DAYS) if within else None,
        limit=parse_count("limit", params.get("limit") or str(DEFAULT_PAGE_SIZE), 1, MAX_PAGE_SIZE),
        page=params.get("page") or None,
    )
    return list_certificates(service.store, wanted)


def _show(service: ScepService, request: Request) -> dict:
    return show_certificate(service.store, parse_serial(_required(request.params, "serial")))


def _revoke(service: ScepService, request: Request) -> dict:
    fields = _body_fields(request)
    serial = parse_serial(_required(fields, "serial"))
    return revoke_certificate(
        service.store, service.custody, serial, parse_reason(_required(fields, "reason")), service.options.crl_validity
    )


_ACTIONS: dict[str, Callable[[ScepService, Request], dict]] = {
    "certificates": _list,
    "certificate": _show,
    "revoke": _revoke,
}


def _body_fields(request: Request) -> Mapping[str, str]:
    """A JSON object, or the fields of a form post (a browser session's)."""
    form = admin_auth.form_fields(request)
    if form:
        return form
    try:
        fields = json.loads(request.body or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise BadInput("the body must be a JSON object such as {\"serial\": \"...\", \"reason\": \"...\"}") from None
    if not isinstance(fields, dict):
        raise BadInput("the body must be a JSON object")
    return {str(key): str(value) for key, value in fields.items() if isinstance(value, (str, int))}


def _required(fields: Mapping[str, str], name: str) -> str:
    value = fields.get(name)
    if not value:
        raise BadInput(f"{name} is required")
    return value


def _json(status: int, payload: dict) -> HttpReply:
    return HttpReply(status, json.dumps(payload, indent=2).encode("utf-8"), "application/json",
                     {"Cache-Control": "no-store"})


def _error(status: int, error: str, message: str) -> HttpReply:
    return _json(status, {"error": error, "message": message})
