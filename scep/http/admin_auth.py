"""Who may use the admin API and the admin pages: one check for every admin route.

Two ways in, chosen by SCEP_ADMIN_AUTH:

- `credential` (`scep serve`, any local run): a random credential created once in the data directory (file
  `admin-credential`, mode 0600) and printed by `scep serve` at start. Tools send it as
  `Authorization: Bearer <credential>`; browsers post it once to the login form (`POST /api/admin/login`) and get
  a session cookie: HMAC-signed with a key derived from the credential, expiring, `HttpOnly`, `SameSite=Strict`,
  `Secure` over https. A cookie session must also send its CSRF token with every state-changing request.
- `entra` (Azure): Microsoft Entra ID access tokens, validated here: RS256 signature by a key of the tenant's JWKS,
  issuer, audience (SCEP_ADMIN_AUDIENCE), expiry, and the app role SCEP_ADMIN_ROLE in `roles`.

Every comparison of secrets is constant-time. No credential: 401 with `WWW-Authenticate`; a credential that is
not valid: 401; a valid one without the admin role, or a cookie session without its CSRF token: 403.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import parse_qsl

from scep import config
from scep.http.web import HttpReply, Request

log = logging.getLogger("scep.http.admin_auth")

CREDENTIAL_FILE = "admin-credential"
SESSION_COOKIE = "scep_admin"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
LOGIN_PATH = "/api/admin/login"
REALM = "scep-admin"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CLOCK_SKEW_SECONDS = 60
_SESSION_KEY_LABEL = b"scep admin session v1"
_CSRF_LABEL = b"csrf."


@dataclass(frozen=True)
class AdminPrincipal:
    """An authenticated administrator."""

    name: str  # "local admin", or the token's preferred_username / oid
    method: str  # "bearer", "session" or "entra"
    csrf_token: str | None = None  # the session's CSRF token: pages put it into their forms


class _Refused(Exception):
    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(description)
        self.status, self.error, self.description = status, error, description


# --------------------------------------------------------------------------------------------- the interface


def authenticate(request: Request) -> AdminPrincipal | None:
    """The administrator this request proves to be, or None (no credential, a wrong one, or not an admin)."""
    try:
        return _authenticator().principal(request)
    except _Refused:
        return None


def require_admin(request: Request) -> AdminPrincipal | HttpReply:
    """The administrator, or the reply refusing the request: 401 (with WWW-Authenticate) when no valid credential
    is presented, 403 when it is valid but not an admin's, or a cookie session's state-changing request lacks its
    CSRF token."""
    try:
        principal = _authenticator().principal(request)
        if principal is None:
            raise _Refused(401, "", "sign in: Authorization: Bearer <credential>, or the login form")
        if principal.method == "session" and request.method.upper() not in SAFE_METHODS:
            _check_csrf(request, principal)
        return principal
    except _Refused as refused:
        return refusal(refused)


def refusal(refused: _Refused) -> HttpReply:
    challenge = f'Bearer realm="{REALM}"'
    if refused.error:
        challenge += f', error="{refused.error}"'
    headers = {"WWW-Authenticate": challenge} if refused.status == 401 else {}
    body = json.dumps({"error": refused.error or "unauthorized", "message": refused.description}).encode()
    return HttpReply(refused.status, body, "application/json", headers)


def login(request: Request) -> HttpReply:
    """The login form (GET) and its post (POST, form field `credential`): a session cookie and its CSRF token."""
    authenticator = _authenticator()
    if not isinstance(authenticator, CredentialAuthenticator):
        return HttpReply(404, b'{"error": "not_found", "message": "sign in with an Entra ID access token"}',
                         "application/json")
    if request.method.upper() == "GET":
        return HttpReply(200, _LOGIN_FORM, "text/html; charset=utf-8", _PAGE_HEADERS)
    return authenticator.login(request)


def ensure_local_credential(data_dir: Path) -> tuple[str, bool]:
    """The local admin credential, created once (256 random bits, file mode 0600); (credential, created now)."""
    path = data_dir / CREDENTIAL_FILE
    try:
        return _read_credential(path), False
    except FileNotFoundError:
        pass
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    credential = secrets.token_urlsafe(32)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another worker created it meanwhile
        return _read_credential(path), False
    with os.fdopen(descriptor, "w", encoding="ascii") as handle:
        handle.write(credential + "\n")
    return credential, True


def _read_credential(path: Path) -> str:
    credential = path.read_text(encoding="ascii").strip()
    if len(credential) < 32:
        raise ValueError(f"the admin credential file {path} is too short: delete it, and a new one is created")
    return credential


# --------------------------------------------------------------------------------------------- local credential


class CredentialAuthenticator:
    """The local credential as a bearer token, or the session cookie the login form sets."""

    def __init__(self, credential: str, session_seconds: int) -> None:
        self._credential = credential.encode("ascii")
        self._session_key = hmac.new(self._credential, _SESSION_KEY_LABEL, hashlib.sha256).digest()
        self._session_seconds = session_seconds

    def principal(self, request: Request) -> AdminPrincipal | None:
        token = bearer_token(request)
        if token is not None:
            if not hmac.compare_digest(token.encode("utf-8", "replace"), self._credential):
                raise _Refused(401, "invalid_token", "the admin credential is not valid")
            return AdminPrincipal("local admin", "bearer")
        cookie = cookies(request).get(SESSION_COOKIE)
        if cookie is None:
            return None
        nonce = self._session_nonce(cookie)
        return AdminPrincipal("local admin", "session", self.csrf_token(nonce))

    def login(self, request: Request) -> HttpReply:
        form = form_fields(request)
        presented = form.get("credential", "").strip().encode("utf-8", "replace")
        if not hmac.compare_digest(presented, self._credential):
            return refusal(_Refused(401, "invalid_token", "the admin credential is not valid"))
        expires = int(time.time()) + self._session_seconds
        nonce = secrets.token_urlsafe(16)
        cookie = f"{expires}.{nonce}.{self._mac(f'{expires}.{nonce}')}"
        attributes = f"Path=/api/; Max-Age={self._session_seconds}; HttpOnly; SameSite=Strict"
        if is_https(request):
            attributes += "; Secure"
        headers = {"Set-Cookie": f"{SESSION_COOKIE}={cookie}; {attributes}", **_PAGE_HEADERS}
        target = form.get("next", "")
        if _is_local_path(target):
            return HttpReply(303, b"", "text/plain; charset=utf-8", {**headers, "Location": target})
        body = {"csrfToken": self.csrf_token(nonce), "expires": expires}
        return HttpReply(200, json.dumps(body).encode(), "application/json", headers)

    def csrf_token(self, nonce: str) -> str:
        return self._mac(_CSRF_LABEL.decode() + nonce)

    def _session_nonce(self, cookie: str) -> str:
        expires, _, rest = cookie.partition(".")
        nonce, _, mac = rest.partition(".")
        if not (expires.isdigit() and nonce and hmac.compare_digest(mac.encode(), self._mac(f"{expires}.{nonce}")
                                                                      .encode())):
            raise _Refused(401, "invalid_token", "the session cookie is not valid: sign in again")
        if int(expires) <= time.time():
            raise _Refused(401, "invalid_token", "the session has expired: sign in again")
        return nonce

    def _mac(self, text: str) -> str:
        digest = hmac.new(self._session_key, text.encode("ascii"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _check_csrf(request: Request, principal: AdminPrincipal) -> None:
    presented = request_header(request, CSRF_HEADER) or form_fields(request).get(CSRF_FIELD, "")
    expected = principal.csrf_token or ""
    if not (presented and hmac.compare_digest(presented.encode("utf-8", "replace"), expected.encode())):
        raise _Refused(403, "csrf", f"a state-changing request of a browser session needs its {CSRF_HEADER}")


# --------------------------------------------------------------------------------------------- Entra ID


class EntraAuthenticator:
    """Access tokens issued by the tenant for the admin app registration, carrying the admin app role.

    Each rule is Microsoft identity platform's ("Secure applications and APIs by validating claims", "Access tokens
    in the Microsoft identity platform"): the signature by a key of the tenant's OpenID Connect JWKS, `iss` the
    tenant's v2.0 issuer, `aud` the API's client ID or Application ID URI, `exp`/`nbf` with little clock skew, and
    the app role in `roles` (an app role assigned to a user or application appears there).
    """

    def __init__(self, admin: config.AdminSettings) -> None:
        import jwt  # here, not at the top: only Entra sign-in needs PyJWT, and local mode saves its memory

        base = f"{admin.authority_host}/{admin.tenant_id}"
        self.issuer = f"{base}/v2.0"
        self.audiences = list(admin.audiences)
        self.role = admin.role
        self._keys = jwt.PyJWKClient(f"{base}/discovery/v2.0/keys", cache_keys=True, lifespan=3600, timeout=10)

    def principal(self, request: Request) -> AdminPrincipal | None:
        token = bearer_token(request)
        if token is None:
            return None
        claims = self._claims(token)
        if self.role not in (claims.get("roles") or ()):
            raise _Refused(403, "insufficient_scope", f"the token does not carry the app role {self.role}")
        name = claims.get("preferred_username") or claims.get("upn") or claims.get("oid") or claims.get("sub")
        return AdminPrincipal(str(name), "entra")

    def _claims(self, token: str) -> dict:
        import jwt

        try:
            key = self._keys.get_signing_key_from_jwt(token)
            return jwt.decode(
                token, key.key, algorithms=["RS256"], audience=self.audiences, issuer=self.issuer,
                leeway=CLOCK_SKEW_SECONDS, options={"require": ["exp", "iss", "aud", "nbf"]},
            )
        except jwt.PyJWKClientConnectionError as error:
            log.error("cannot read the signing keys of the admin tenant: %s", error)
            raise _Refused(401, "invalid_token", "the token's signing keys cannot be read now") from None
        except (jwt.PyJWKClientError, jwt.InvalidTokenError) as error:
            raise _Refused(401, "invalid_token", f"the token is not valid: {error}") from None


# --------------------------------------------------------------------------------------------- request helpers


def request_header(request: Request, name: str) -> str | None:
    wanted = name.lower()
    return next((value for key, value in request.headers.items() if key.lower() == wanted), None)


def bearer_token(request: Request) -> str | None:
    """The token of `Authorization: Bearer <token>`; any other Authorization scheme is refused (401)."""
    header = request_header(request, "Authorization")
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _Refused(401, "invalid_request", "only Authorization: Bearer is accepted")
    return token.strip()


def cookies(request: Request) -> dict[str, str]:
    found: dict[str, str] = {}
    for part in (request_header(request, "Cookie") or "").split(";"):
        name, separator, value = part.strip().partition("=")
        if separator:
            found.setdefault(name, value)
    return found


def form_fields(request: Request) -> dict[str, str]:
    content_type = (request_header(request, "Content-Type") or "").partition(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        return {}
    try:
        return dict(parse_qsl(request.body.decode("utf-8"), keep_blank_values=True))
    except UnicodeDecodeError:
        return {}


def is_https(request: Request) -> bool:
    forwarded = (request_header(request, "X-Forwarded-Proto") or "").split(",")[0].strip().lower()
    return request.scheme == "https" or forwarded == "https"


def _is_local_path(target: str) -> bool:
    return target.startswith("/") and not target.startswith("//") and "\\" not in target


# --------------------------------------------------------------------------------------------- per process

_lock = threading.Lock()


def _authenticator() -> CredentialAuthenticator | EntraAuthenticator:
    settings = config.settings()
    with _lock:
        return _build(settings.admin, settings.data_dir)


@lru_cache(maxsize=4)
def _build(admin: config.AdminSettings, data_dir: Path) -> CredentialAuthenticator | EntraAuthenticator:
    if admin.mode == "entra":
        return EntraAuthenticator(admin)
    credential, _ = ensure_local_credential(data_dir)
    return CredentialAuthenticator(credential, admin.session_seconds)


_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; form-action 'self'",
}
_LOGIN_FORM = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>SCEP admin sign-in</title></head>
<body><form method="post" action="/api/admin/login">
<label>Admin credential (printed by scep serve) <input type="password" name="credential" autocomplete="off"></label>
<button type="submit">Sign in</button>
</form></body></html>
"""
