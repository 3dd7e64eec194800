"""`scep intune check`: walk the whole Intune path once and explain in plain words what works and what to fix.

Steps: a Graph token, an Intune token (and the roles they carry), Graph service discovery, then a
validateRequest for a throwaway CSR with a dummy challenge. Intune rejecting that dummy challenge with one
of its error codes is the good outcome: the service was reached, trusted our token and looked at the request.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import uuid
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import AttributeOID, NameOID

from scep.azure.intune.client import (
    GRAPH_ROLE,
    INTUNE_API_APP_ID,
    SCEP_ROLE,
    VALIDATION_SERVICE,
    IntuneAuthenticationError,
    IntuneClient,
    IntuneConnectionError,
    IntuneError,
    IntuneHttpError,
    IntuneServiceNotFound,
)
from scep.azure.intune.settings import AuthMode
from scep.findings import Finding, Status


@dataclass
class CheckReport:
    lines: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(line.ok for line in self.lines)

    def add(self, status: Status, step: str, message: str) -> None:
        self.lines.append(Finding(status, message, step))


def run_check(client: IntuneClient) -> CheckReport:
    report = CheckReport()
    settings = client.settings
    graph_token = _token_step(client, report, "Graph token", settings.graph_scope, GRAPH_ROLE)
    intune_token = _token_step(client, report, "Intune token", settings.intune_scope, SCEP_ROLE)
    if graph_token is None or intune_token is None:
        return report
    if not _discovery_step(client, report):
        return report
    _validate_step(client, report)
    return report


# Tokens


def _token_step(client: IntuneClient, report: CheckReport, step: str, scope: str, role: str) -> str | None:
    try:
        token = client.token(scope)
    except IntuneAuthenticationError as error:
        report.add(Status.FAIL, step, f"{_credential_name(client)} was refused for {scope}. {_auth_hint(error)}")
        return None
    roles = _token_roles(token)
    if roles is None:
        report.add(Status.OK, step, f"obtained for {scope} with {_credential_name(client)}")
    elif role in roles:
        report.add(Status.OK, step, f"obtained for {scope}; it carries the {role} role")
    else:
        report.add(Status.WARN, step, f"obtained for {scope}, but without the {role} role: {_role_hint(role)}")
    return token


def _credential_name(client: IntuneClient) -> str:
    settings = client.settings
    if settings.auth is AuthMode.SECRET:
        return f"the client secret of app {settings.client_id} (tenant {settings.tenant_id})"
    if settings.auth is AuthMode.CERTIFICATE:
        return f"the certificate {settings.client_certificate_path} of app {settings.client_id}"
    identity = settings.managed_identity_client_id or "system-assigned"
    if settings.auth is AuthMode.MANAGED_IDENTITY:
        return f"the managed identity ({identity})"
    return f"app {settings.client_id} with the managed identity ({identity}) as federated credential"


_AADSTS_HINTS = {
    "7000215": "The client secret is wrong: copy the secret's value (not its id) into INTUNE_CLIENT_SECRET.",
    "7000222": "The client secret has expired: create a new one and update INTUNE_CLIENT_SECRET.",
    "700016": "The app was not found in this tenant: check INTUNE_CLIENT_ID and INTUNE_TENANT_ID.",
    "90002": "The tenant does not exist: check INTUNE_TENANT_ID.",
    "900023": "The tenant id is malformed: check INTUNE_TENANT_ID.",
    "700027": "The certificate is not registered on the app: upload its public part to the app registration.",
    "700024": "The client assertion is outside its validity: check this machine's clock.",
    "70021": "No federated credential of the app matches the managed identity: add one for its principal id.",
    "700211": "The managed identity's exchange token was refused: check the federated credential's issuer.",
    "7000218": "The app expects a secret or a certificate: check INTUNE_AUTH.",
}


def _auth_hint(error: IntuneAuthenticationError) -> str:
    for code, hint in _AADSTS_HINTS.items():
        if re.search(rf"AADSTS{code}\b", error.detail):
            return f"{hint} ({_short(error.detail)})"
    return f"Entra ID said: {_short(error.detail)}"


def _role_hint(role: str) -> str:
    if role == SCEP_ROLE:
        return (
            f"grant the application permission {SCEP_ROLE} of 'Microsoft Intune API' ({INTUNE_API_APP_ID}) "
            "and give admin consent; Intune will answer 403 until then."
        )
    return f"grant the Microsoft Graph application permission {GRAPH_ROLE} and give admin consent."


def _token_roles(token: str) -> list[str] | None:
    """The roles claim of a JWT access token (read, not verified: only to explain); None if unreadable."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return None
    roles = claims.get("roles") if isinstance(claims, dict) else None
    return [str(role) for role in roles] if isinstance(roles, list) else []


# Discovery


def _discovery_step(client: IntuneClient, report: CheckReport) -> bool:
    step = "Service discovery"
    try:
        uri = client.service_url(VALIDATION_SERVICE)
    except IntuneHttpError as error:
        report.add(Status.FAIL, step, _discovery_http_hint(error))
        return False
    except IntuneServiceNotFound:
        report.add(
            Status.FAIL,
            step,
            f"Graph does not list {VALIDATION_SERVICE} for this tenant: is Intune licensed and is "
            "INTUNE_TENANT_ID the Intune tenant?",
        )
        return False
    except IntuneError as error:
        report.add(Status.FAIL, step, _reach_hint("Microsoft Graph", error))
        return False
    report.add(Status.OK, step, f"{VALIDATION_SERVICE} is at {uri}")
    return True


def _discovery_http_hint(error: IntuneHttpError) -> str:
    if error.status == 403:
        return (
            f"Graph refused the endpoint lookup (403): grant the Microsoft Graph application permission "
            f"{GRAPH_ROLE} and give admin consent."
        )
    if error.status == 401:
        return "Graph refused the token (401): check INTUNE_TENANT_ID and INTUNE_GRAPH_URL."
    return f"Graph answered HTTP {error.status}: {_short(error.detail)}"


# validateRequest


def _validate_step(client: IntuneClient, report: CheckReport) -> None:
    step = "validateRequest"
    transaction_id = f"scep-intune-check-{uuid.uuid4()}"
    try:
        result = client.validate_request(transaction_id, _dummy_csr())
    except IntuneHttpError as error:
        report.add(Status.FAIL, step, _validate_http_hint(error))
        return
    except IntuneError as error:
        report.add(Status.FAIL, step, _reach_hint("the Intune validation service", error))
        return
    if result.succeeded:
        report.add(Status.FAIL, step, "Intune accepted a dummy challenge: this is not the real Intune service.")
    elif result.known:
        report.add(
            Status.OK,
            step,
            f"the service works: it answered {result.code} for the dummy challenge, as expected "
            f"(activity {result.activity_id}).",
        )
    else:
        report.add(
            Status.WARN,
            step,
            f"the service answered an unknown code {result.code!r}; this CA treats it as a rejection.",
        )


def _validate_http_hint(error: IntuneHttpError) -> str:
    if error.status == 403:
        return f"Intune refused the call (403): {_role_hint(SCEP_ROLE)}"
    if error.status == 401:
        return (
            "Intune refused the token (401): check INTUNE_TENANT_ID (the Intune tenant) and "
            "INTUNE_RESOURCE_URL (https://api.manage.microsoft.com/)."
        )
    return f"Intune answered HTTP {error.status}: {_short(error.detail)}; try again later."


def _reach_hint(what: str, error: IntuneError) -> str:
    if isinstance(error, IntuneConnectionError):
        if error.timed_out:
            return f"{what} did not answer in time ({error.url}); check the network, or raise INTUNE_TIMEOUT."
        return (
            f"cannot reach {what} ({_short(str(error))}): check DNS, the outbound firewall or proxy, "
            "and TLS trust (REQUESTS_CA_BUNDLE)."
        )
    if isinstance(error, IntuneAuthenticationError):
        return f"no token: {_auth_hint(error)}"
    return f"{what} answered unexpectedly: {_short(str(error))}"


def _dummy_csr() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "scep-intune-check")]))
        .add_attribute(AttributeOID.CHALLENGE_PASSWORD, f"dummy-{secrets.token_hex(16)}".encode())
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(Encoding.DER)


def _short(text: Any) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= 240 else flat[:237] + "..."
