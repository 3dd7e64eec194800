"""A wire-level Microsoft Entra ID emulator over HTTPS, good enough for MSAL and azure-identity.

Endpoints:
  GET  /{tenant}/v2.0/.well-known/openid-configuration   OIDC discovery (what MSAL fetches first)
  GET  /{tenant}/discovery/v2.0/keys                     the emulator's signing keys (JWKS)
  GET  /common/discovery/instance                        instance discovery, for callers that point MSAL at it
  POST /{tenant}/oauth2/v2.0/token                       client_credentials with client_secret or
                                                         client_assertion (a JWT signed by a registered
                                                         certificate, or a token this emulator issued to a
                                                         managed identity the application trusts as a
                                                         federated credential)
  GET  /msi/token                                        App Service style managed identity endpoint
                                                         (IDENTITY_ENDPOINT + IDENTITY_HEADER)

Access tokens are RS256 JWTs signed by the emulator, with aud (the scope without "/.default"), iss, tid,
appid, azp, oid, sub, roles (configured per client and audience), iat, nbf and exp.

MSAL validates an unknown authority host against login.microsoftonline.com unless instance discovery is
disabled, so clients must pass `disable_instance_discovery=True` to azure-identity credentials (our
`scep.azure.identity.build_credential` does so whenever AZURE_AUTHORITY_HOST is not a Microsoft host).
"""

from __future__ import annotations

import argparse
import base64
import hmac
import json
import secrets
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from .common import EmulatorCA, EmulatorServer, HttpError, Request, Response, json_response, wait_until_interrupted

DEFAULT_TENANT = "8e1f6c0a-3b52-4f0e-9d3c-5a7b2c9e4d10"
TOKEN_EXCHANGE_AUDIENCE = "api://AzureADTokenExchange"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
DEFAULT_TOKEN_LIFETIME_SECONDS = 3600
CLOCK_SKEW_SECONDS = 300


class TokenError(Exception):
    """A token failed verification (bad signature, wrong audience, expired, revoked, malformed)."""


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def audience_of_scope(scope: str) -> str:
    """'https://vault.azure.net/.default' -> 'https://vault.azure.net' (what Entra puts in aud)."""
    return scope[: -len("/.default")] if scope.endswith("/.default") else scope


def _same_audience(left: str, right: str) -> bool:
    return left.rstrip("/").lower() == right.rstrip("/").lower()


@dataclass
class ClientRegistration:
    tenant: str
    client_id: str
    object_id: str
    secret: str | None = None
    certificates: list[x509.Certificate] = field(default_factory=list)
    federated_subjects: set[str] = field(default_factory=set)
    roles: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class ManagedIdentityRegistration:
    tenant: str
    client_id: str
    principal_id: str
    system_assigned: bool = False
    roles: dict[str, list[str]] = field(default_factory=dict)


def _roles_for(roles: dict[str, list[str]], audience: str) -> list[str]:
    for configured, granted in roles.items():
        if _same_audience(configured, audience):
            return list(granted)
    return []


def _entra_error(status: int, error: str, code: int, description: str) -> HttpError:
    return HttpError(
        status,
        {
            "error": error,
            "error_description": f"AADSTS{code}: {description}",
            "error_codes": [code],
            "timestamp": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
            "trace_id": str(uuid.uuid4()),
            "correlation_id": str(uuid.uuid4()),
        },
    )


class EntraEmulator(EmulatorServer):
    """Microsoft Entra ID token issuance for confidential clients and managed identities."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        ca: EmulatorCA | None = None,
        token_lifetime_seconds: int = DEFAULT_TOKEN_LIFETIME_SECONDS,
    ) -> None:
        super().__init__(host, port, ca)
        self.token_lifetime_seconds = token_lifetime_seconds
        self.identity_header = secrets.token_urlsafe(24)
        self._signing_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._key_id = secrets.token_hex(8)
        self._lock = threading.Lock()
        self._tenants: set[str] = {DEFAULT_TENANT}
        self._clients: dict[str, ClientRegistration] = {}
        self._identities: dict[str, ManagedIdentityRegistration] = {}
        self._refused: set[str] = set()
        self._issued: Counter[str] = Counter()
        self._not_before = 0.0
        self.route("GET", r"/(?P<tenant>[^/]+)/v2\.0/\.well-known/openid-configuration", self._discovery)
        self.route("GET", r"/(?P<tenant>[^/]+)/discovery/v2\.0/keys", self._keys)
        self.route("GET", r"/common/discovery/instance", self._instance_discovery)
        self.route("POST", r"/(?P<tenant>[^/]+)/oauth2/v2\.0/token", self._token)
        self.route("GET", r"/msi/token", self._managed_identity_token)

    # Registration API for tests

    def register_client(
        self,
        tenant: str,
        client_id: str,
        secret: str | None = None,
        certificate: x509.Certificate | None = None,
        roles: dict[str, list[str]] | None = None,
        federated_subjects: Iterable[str] = (),
        object_id: str | None = None,
    ) -> ClientRegistration:
        """Register an application (confidential client) in tenant.

        roles maps an audience (e.g. 'https://vault.azure.net') to the app roles its tokens carry.
        federated_subjects are managed identity principal ids whose exchange tokens this app accepts.
        """
        registration = ClientRegistration(
            tenant=tenant,
            client_id=client_id,
            object_id=object_id or str(uuid.uuid4()),
            secret=secret,
            certificates=[certificate] if certificate is not None else [],
            federated_subjects=set(federated_subjects),
            roles=dict(roles or {}),
        )
        with self._lock:
            self._tenants.add(tenant)
            self._clients[client_id] = registration
        return registration

    def register_managed_identity(
        self,
        client_id: str,
        principal_id: str,
        tenant: str = DEFAULT_TENANT,
        roles: dict[str, list[str]] | None = None,
        system_assigned: bool = False,
    ) -> ManagedIdentityRegistration:
        """Register a managed identity for /msi/token (a system-assigned one answers without client_id)."""
        registration = ManagedIdentityRegistration(
            tenant, client_id, principal_id, system_assigned, dict(roles or {})
        )
        with self._lock:
            self._tenants.add(tenant)
            self._identities[client_id] = registration
        return registration

    def set_client_secret(self, client_id: str, secret: str) -> None:
        """Rotate an application's secret: the old one stops working at once."""
        with self._lock:
            self._clients[client_id].secret = secret

    def refuse(self, client_id: str) -> None:
        """From now on, refuse to issue tokens to client_id (an app or a managed identity)."""
        with self._lock:
            self._refused.add(client_id)

    def accept(self, client_id: str) -> None:
        """Undo refuse()."""
        with self._lock:
            self._refused.discard(client_id)

    def revoke_issued_tokens(self) -> None:
        """Tokens issued before now fail verify_token (simulates revocation / key rollover)."""
        with self._lock:
            self._not_before = time.time()

    @property
    def tokens_issued(self) -> int:
        with self._lock:
            return sum(self._issued.values())

    def tokens_issued_to(self, client_id: str) -> int:
        with self._lock:
            return self._issued[client_id]

    def issuer(self, tenant: str = DEFAULT_TENANT) -> str:
        """The v2.0 issuer of the tenant's access tokens, as its OpenID configuration publishes it."""
        return f"{self.url}/{tenant}/v2.0"

    def authority(self, tenant: str = DEFAULT_TENANT) -> str:
        return f"{self.url}/{tenant}"

    def client_environment(self) -> dict[str, str]:
        """Environment variables that point azure-identity and requests at this emulator."""
        return {
            "AZURE_AUTHORITY_HOST": self.url,
            "REQUESTS_CA_BUNDLE": self.ca_bundle_path,
            "SSL_CERT_FILE": self.ca_bundle_path,
        }

    def managed_identity_environment(self) -> dict[str, str]:
        """IDENTITY_ENDPOINT / IDENTITY_HEADER, as App Service and Azure Functions set them."""
        return {"IDENTITY_ENDPOINT": f"{self.url}/msi/token", "IDENTITY_HEADER": self.identity_header}

    # Tokens

    def issue_token(
        self,
        tenant: str,
        audience: str,
        client_id: str,
        object_id: str,
        roles: list[str],
        *,
        lifetime_seconds: int | None = None,
        issuer: str | None = None,
    ) -> str:
        """Sign an access token; used by the endpoints and by tests that need a token directly (a negative
        lifetime_seconds gives an expired one, issuer another tenant's or cloud's issuer)."""
        now = int(time.time())
        lifetime = self.token_lifetime_seconds if lifetime_seconds is None else lifetime_seconds
        claims: dict[str, Any] = {
            "aud": audience,
            "iss": issuer or self.issuer(tenant),
            "iat": min(now, now + lifetime),
            "nbf": min(now, now + lifetime),
            "exp": now + lifetime,
            "tid": tenant,
            "appid": client_id,
            "azp": client_id,
            "oid": object_id,
            "sub": object_id,
            "idtyp": "app",
            "ver": "2.0",
            "uti": secrets.token_urlsafe(16),
        }
        if roles:
            claims["roles"] = roles
        with self._lock:
            self._issued[client_id] += 1
        return self._sign_jwt(claims)

    def verify_token(self, token: str, audience: str) -> dict[str, Any]:
        """Claims of a token this emulator issued for audience; raises TokenError otherwise."""
        try:
            header_part, claims_part, signature_part = token.split(".")
            header = json.loads(b64url_decode(header_part))
            claims = json.loads(b64url_decode(claims_part))
            signature = b64url_decode(signature_part)
        except ValueError as error:
            raise TokenError(f"malformed token: {error}") from None
        if header.get("alg") != "RS256" or header.get("kid") != self._key_id:
            raise TokenError("token not signed by this emulator")
        try:
            self._signing_key.public_key().verify(
                signature, f"{header_part}.{claims_part}".encode("ascii"), padding.PKCS1v15(), hashes.SHA256()
            )
        except InvalidSignature:
            raise TokenError("bad token signature") from None
        self._check_claims(claims, audience)
        return claims

    def _check_claims(self, claims: dict[str, Any], audience: str) -> None:
        now = time.time()
        if not isinstance(claims.get("aud"), str) or not _same_audience(claims["aud"], audience):
            raise TokenError(f"token audience {claims.get('aud')!r} is not {audience!r}")
        if int(claims.get("exp", 0)) <= now:
            raise TokenError("token expired")
        if int(claims.get("nbf", 0)) > now + CLOCK_SKEW_SECONDS:
            raise TokenError("token not yet valid")
        with self._lock:
            not_before = self._not_before
        if int(claims.get("iat", 0)) < int(not_before):
            raise TokenError("token revoked")

    def jwks(self) -> dict[str, Any]:
        numbers = self._signing_key.public_key().public_numbers()
        return {
            "keys": [
                {
                    "kty": "RSA",
                    "use": "sig",
                    "kid": self._key_id,
                    "alg": "RS256",
                    "n": b64url_encode(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
                    "e": b64url_encode(numbers.e.to_bytes(3, "big")),
                }
            ]
        }

    def _sign_jwt(self, claims: dict[str, Any]) -> str:
        header = {"alg": "RS256", "typ": "JWT", "kid": self._key_id}
        signing_input = (
            b64url_encode(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + b64url_encode(json.dumps(claims, separators=(",", ":")).encode())
        )
        signature = self._signing_key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{b64url_encode(signature)}"

    # Endpoints

    def _require_tenant(self, tenant: str) -> None:
        with self._lock:
            known = tenant in self._tenants or tenant in ("common", "organizations")
        if not known:
            raise _entra_error(400, "invalid_tenant", 90002, f"Tenant '{tenant}' not found.")

    def _discovery(self, request: Request, tenant: str) -> Response:
        self._require_tenant(tenant)
        base = f"{self.url}/{tenant}"
        return json_response(
            {
                "issuer": self.issuer(tenant),
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                "jwks_uri": f"{base}/discovery/v2.0/keys",
                "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt"],
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "tenant_region_scope": "EU",
            }
        )

    def _keys(self, request: Request, tenant: str) -> Response:
        self._require_tenant(tenant)
        return json_response(self.jwks())

    def _instance_discovery(self, request: Request) -> Response:
        authorize = request.query.get("authorization_endpoint", "")
        tenant = authorize.removeprefix(self.url + "/").split("/")[0] or "common"
        host = self.url.removeprefix("https://")
        return json_response(
            {
                "tenant_discovery_endpoint": f"{self.url}/{tenant}/v2.0/.well-known/openid-configuration",
                "api-version": "1.1",
                "metadata": [{"preferred_network": host, "preferred_cache": host, "aliases": [host]}],
            }
        )

    def _token(self, request: Request, tenant: str) -> Response:
        self._require_tenant(tenant)
        form = request.form()
        if form.get("grant_type") != "client_credentials":
            raise _entra_error(
                400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type."
            )
        client = self._authenticate_client(tenant, form, request)
        scope = form.get("scope", "").split()
        default_scopes = [item for item in scope if item.endswith("/.default")]
        if len(default_scopes) != 1:
            raise _entra_error(
                400,
                "invalid_scope",
                1002012,
                "The provided value for scope is not valid for client credentials.",
            )
        audience = audience_of_scope(default_scopes[0])
        token = self.issue_token(
            tenant, audience, client.client_id, client.object_id, _roles_for(client.roles, audience)
        )
        return json_response(
            {
                "token_type": "Bearer",
                "expires_in": self.token_lifetime_seconds,
                "ext_expires_in": self.token_lifetime_seconds,
                "access_token": token,
            }
        )

    def _authenticate_client(self, tenant: str, form: dict[str, str], request: Request) -> ClientRegistration:
        client_id = form.get("client_id", "")
        with self._lock:
            client = self._clients.get(client_id)
            refused = client_id in self._refused
        if client is None or client.tenant != tenant:
            raise _entra_error(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found.",
            )
        if refused:
            raise _entra_error(401, "invalid_client", 7000215, "Invalid client secret provided.")
        if "client_secret" in form:
            self._check_secret(client, form["client_secret"])
        elif form.get("client_assertion_type") == CLIENT_ASSERTION_TYPE and form.get("client_assertion"):
            self._check_assertion(client, form["client_assertion"], f"{self.url}/{tenant}/oauth2/v2.0/token")
        else:
            raise _entra_error(
                401,
                "invalid_client",
                7000218,
                "The request body must contain client_assertion or client_secret.",
            )
        return client

    @staticmethod
    def _check_secret(client: ClientRegistration, presented: str) -> None:
        expected = client.secret or ""
        if not expected or not hmac.compare_digest(expected.encode(), presented.encode()):
            raise _entra_error(401, "invalid_client", 7000215, "Invalid client secret provided.")

    def _check_assertion(self, client: ClientRegistration, assertion: str, token_endpoint: str) -> None:
        try:
            header_part, claims_part, _ = assertion.split(".")
            header = json.loads(b64url_decode(header_part))
            claims = json.loads(b64url_decode(claims_part))
        except ValueError:
            raise _entra_error(401, "invalid_client", 50027, "JWT token is invalid or malformed.") from None
        if header.get("kid") == self._key_id:
            self._check_federated_assertion(client, assertion)
        else:
            self._check_certificate_assertion(client, assertion, header, claims, token_endpoint)

    def _check_federated_assertion(self, client: ClientRegistration, assertion: str) -> None:
        try:
            claims = self.verify_token(assertion, TOKEN_EXCHANGE_AUDIENCE)
        except TokenError as error:
            raise _entra_error(
                401, "invalid_client", 700211, f"Invalid federated assertion: {error}."
            ) from None
        if claims.get("sub") not in client.federated_subjects:
            raise _entra_error(
                401,
                "invalid_client",
                70021,
                "No matching federated identity record found for presented assertion.",
            )

    def _check_certificate_assertion(
        self,
        client: ClientRegistration,
        assertion: str,
        header: dict[str, Any],
        claims: dict[str, Any],
        endpoint: str,
    ) -> None:
        certificate = self._certificate_for(client, header)
        if certificate is None:
            raise _entra_error(
                401, "invalid_client", 700027, "Client assertion contains an invalid signature."
            )
        header_part, claims_part, signature_part = assertion.split(".")
        if not _verify_rsa_jws(
            certificate,
            header.get("alg", ""),
            f"{header_part}.{claims_part}".encode(),
            b64url_decode(signature_part),
        ):
            raise _entra_error(
                401, "invalid_client", 700027, "Client assertion contains an invalid signature."
            )
        now = time.time()
        if claims.get("iss") != client.client_id or claims.get("sub") != client.client_id:
            raise _entra_error(
                401, "invalid_client", 700023, "Client assertion issuer or subject is invalid."
            )
        if claims.get("aud") != endpoint:
            raise _entra_error(401, "invalid_client", 700212, "Client assertion audience is invalid.")
        if int(claims.get("exp", 0)) <= now - CLOCK_SKEW_SECONDS:
            raise _entra_error(
                401, "invalid_client", 700024, "Client assertion is not within its valid time range."
            )

    @staticmethod
    def _certificate_for(client: ClientRegistration, header: dict[str, Any]) -> x509.Certificate | None:
        # MSAL pads the base64url thumbprint with "="; Entra accepts both forms.
        sha256 = str(header.get("x5t#S256", "")).rstrip("=")
        sha1 = str(header.get("x5t", "")).rstrip("=")
        for certificate in client.certificates:
            if sha256 and sha256 == b64url_encode(certificate.fingerprint(hashes.SHA256())):
                return certificate
            if sha1 and sha1 == b64url_encode(certificate.fingerprint(hashes.SHA1())):
                return certificate
        return None

    def _managed_identity_token(self, request: Request) -> Response:
        presented = request.header("X-IDENTITY-HEADER") or ""
        if not hmac.compare_digest(presented.encode(), self.identity_header.encode()):
            raise HttpError(401, {"statusCode": 401, "message": "Missing or invalid X-IDENTITY-HEADER."})
        resource = request.query.get("resource", "")
        if not resource:
            raise HttpError(400, {"statusCode": 400, "message": "Required parameter 'resource' is missing."})
        identity = self._identity_for(request.query.get("client_id"))
        audience = audience_of_scope(resource)
        token = self.issue_token(
            identity.tenant,
            audience,
            identity.client_id,
            identity.principal_id,
            _roles_for(identity.roles, audience),
        )
        return json_response(
            {
                "access_token": token,
                "expires_on": str(int(time.time()) + self.token_lifetime_seconds),
                "resource": resource,
                "token_type": "Bearer",
                "client_id": identity.client_id,
            }
        )

    def _identity_for(self, client_id: str | None) -> ManagedIdentityRegistration:
        with self._lock:
            if client_id:
                identity = self._identities.get(client_id)
            else:
                identity = next((item for item in self._identities.values() if item.system_assigned), None)
            refused = identity is not None and identity.client_id in self._refused
        if identity is None:
            raise HttpError(
                400, {"statusCode": 400, "message": "No managed identity found for the specified client_id."}
            )
        if refused:
            raise HttpError(
                400, {"statusCode": 400, "message": "Failed to acquire a token for the managed identity."}
            )
        return identity


def _verify_rsa_jws(certificate: x509.Certificate, alg: str, signed: bytes, signature: bytes) -> bool:
    public_key = certificate.public_key()
    if not isinstance(public_key, rsa.RSAPublicKey):
        return False
    schemes = {
        "RS256": (padding.PKCS1v15(), hashes.SHA256()),
        "PS256": (
            padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO),
            hashes.SHA256(),
        ),
    }
    if alg not in schemes:
        return False
    chosen_padding, chosen_hash = schemes[alg]
    try:
        public_key.verify(signature, signed, chosen_padding, chosen_hash)
    except InvalidSignature:
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the Entra ID emulator until interrupted.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--client-id", default="00000000-0000-4000-8000-00000000c11e")
    parser.add_argument(
        "--client-secret", default=None, help="register a confidential client with this secret"
    )
    args = parser.parse_args(argv)
    with EntraEmulator(port=args.port) as emulator:
        emulator.register_managed_identity(args.client_id, str(uuid.uuid4()), system_assigned=True)
        if args.client_secret:
            emulator.register_client(DEFAULT_TENANT, args.client_id, secret=args.client_secret)
        print(f"Entra emulator:      {emulator.url}", flush=True)
        print(f"CA bundle:           {emulator.ca_bundle_path}", flush=True)
        print(f"Tenant:              {DEFAULT_TENANT}", flush=True)
        environment = {**emulator.client_environment(), **emulator.managed_identity_environment()}
        environment["AZURE_CLIENT_ID"] = args.client_id
        for name, value in environment.items():
            print(f"export {name}={value}", flush=True)
        wait_until_interrupted()


if __name__ == "__main__":
    main()
