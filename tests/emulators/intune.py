"""A wire-level emulator of Microsoft Intune's SCEP validation service and its Graph service discovery.

Endpoints (HTTPS, one server):
  GET  /v1.0/servicePrincipals/appId=0000000a-0000-0000-c000-000000000000/endpoints   Graph service discovery
  POST /ScepRequestValidationFEService/ScepActions/validateRequest
  POST /ScepRequestValidationFEService/ScepActions/successNotification
  POST /ScepRequestValidationFEService/ScepActions/failureNotification
  POST /PkiConnectorFEService/CertificateAuthorityRequests/downloadRevocationRequests
  POST /PkiConnectorFEService/CertificateAuthorityRequests/uploadRevocationResults
  POST /_emulator/challenges       {"subject", "sans", "ttl", "key_usage", "eku", "key_size"} -> {"challenge"}
  GET  /_emulator/notifications    recorded notifications; GET /_emulator/validations: validation outcomes
  POST /_emulator/faults           {"endpoint", "status", "delay", "code", "reply", "times"}; DELETE clears them
  POST /_emulator/revocations      {"serialNumber", "issuerName", "caConfiguration"} -> {"requestContext"} queued
  GET  /_emulator/revocations      the queue, the requests handed out and not answered, and the results uploaded

Tokens come from the Entra emulator: ScepActions need an access token for the Intune resource with the
`scep_challenge_provider` role, Graph needs one for the emulator's own URL with `Application.Read.All`
(401 for a bad token or another tenant, 403 for a missing role).

Revocation requests follow Microsoft's client library (Intune-Resource-Access, src/CsrValidation: the Java
IntuneRevocationClient, CARevocationRequest, CARevocationResult, CARequestErrorCodes): api-version 5019-05-05,
maxRequests 1-500, issuerName null or a filter; each result names a requestContext that was handed out, succeeded
exactly when errorCode is "0", and the upload is answered {"value": true}. A request handed out is not handed out
again (the strict reading: a CA must keep what it downloaded) unless its result was retryable (41xx), which puts
it back in the queue.

Challenges are real cryptography: a JSON statement of what the CSR must contain (subject, SANs, key usage,
EKU, key size, issue and expiry time), HMAC-SHA256 signed, then AES-256-GCM encrypted with the emulator's
keys and base64url encoded. validateRequest checks the CSR against it and answers with Intune's codes.

Run alone: `python -m tests.emulators.intune --port 8443` prints the URLs and the settings to use.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hmac
import json
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from hashlib import sha256
from typing import Any

from asn1crypto import core as asn1_core
from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import AttributeOID, ExtensionOID, ObjectIdentifier

from .common import EmulatorCA, EmulatorServer, HttpError, Request, Response, json_response
from .entra import DEFAULT_TENANT, EntraEmulator, TokenError

INTUNE_APP_ID = "0000000a-0000-0000-c000-000000000000"
INTUNE_RESOURCE = "https://api.manage.microsoft.com/"
SCEP_ROLE = "scep_challenge_provider"
GRAPH_ROLE = "Application.Read.All"
API_VERSION = "2018-02-20"
REVOCATION_API_VERSION = "5019-05-05"
MAX_REVOCATION_REQUESTS = 500
RETRYABLE_CODES = ("4100", "4101", "4102", "4103")
KNOWN_RESULT_CODES = ("0", "4000", "4001", "4002", "4003", "4004", "4005", "4006", "4007", *RETRYABLE_CODES)
VALIDATION_SERVICE = "ScepRequestValidationFEService"
PKI_CONNECTOR_SERVICE = "PkiConnectorFEService"
UPN_OID = ObjectIdentifier("1.3.6.1.4.1.311.20.2.3")
CLOCK_SKEW_SECONDS = 300
_CHALLENGE_AAD = b"intune-challenge"
ENDPOINTS = ("validate", "success", "failure", "discovery", "download", "upload")
_ACTION_ENDPOINT = {
    "validateRequest": "validate",
    "successNotification": "success",
    "failureNotification": "failure",
}
_KEY_USAGE_FLAGS = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
)


class ChallengeProblem(Exception):
    """Why a challenge or CSR does not pass; `code` is the Intune error code to answer with."""

    def __init__(self, code: str, description: str) -> None:
        super().__init__(f"{code}: {description}")
        self.code = code
        self.description = description


class ChallengeCodec:
    """Issues and opens challenges: sign (HMAC-SHA256) then encrypt (AES-256-GCM), base64url."""

    def __init__(self, encryption_key: bytes | None = None, signing_key: bytes | None = None) -> None:
        self.encryption_key = encryption_key or AESGCM.generate_key(bit_length=256)
        self.signing_key = signing_key or os.urandom(32)

    def issue(
        self,
        subject: str,
        sans: Iterable[str] = (),
        ttl: float = 3600,
        key_usage: Iterable[str] | None = None,
        eku: Iterable[str] | None = None,
        key_size: int | None = None,
        issued_at: float | None = None,
    ) -> str:
        issued = time.time() if issued_at is None else issued_at
        statement = {
            "sub": subject,
            "san": [_normalise_san(item) for item in sans],
            "iat": round(issued, 3),
            "exp": round(issued + ttl, 3),
            "ku": sorted(key_usage) if key_usage is not None else None,
            "eku": sorted(eku) if eku is not None else None,
            "ks": key_size,
            "n": base64.b64encode(os.urandom(9)).decode(),
        }
        payload = json.dumps({k: v for k, v in statement.items() if v is not None}, separators=(",", ":")).encode()
        signed = payload + hmac.new(self.signing_key, payload, sha256).digest()
        nonce = os.urandom(12)
        sealed = AESGCM(self.encryption_key).encrypt(nonce, signed, _CHALLENGE_AAD)
        return base64.urlsafe_b64encode(nonce + sealed).rstrip(b"=").decode("ascii")

    def open(self, challenge: str) -> dict[str, Any]:
        """The statement inside challenge; ChallengeProblem with Intune's code when it cannot be trusted."""
        try:
            blob = base64.urlsafe_b64decode(challenge + "=" * (-len(challenge) % 4))
        except (ValueError, TypeError):
            raise ChallengeProblem("ChallengeDecodingError", "the challenge is not base64url") from None
        if len(blob) < 12 + 16:
            raise ChallengeProblem("ChallengeDecodingError", "the challenge is too short")
        try:
            signed = AESGCM(self.encryption_key).decrypt(blob[:12], blob[12:], _CHALLENGE_AAD)
        except InvalidTag:
            raise ChallengeProblem("ChallengeDecryptionError", "the challenge does not decrypt") from None
        payload, signature = signed[:-32], signed[-32:]
        try:
            statement = json.loads(payload)
        except ValueError:
            statement = None
        if not isinstance(statement, dict):
            raise ChallengeProblem("ChallengeDeserializationError", "the challenge is not a statement")
        if not hmac.compare_digest(hmac.new(self.signing_key, payload, sha256).digest(), signature):
            raise ChallengeProblem("SignatureValidationFailed", "the challenge signature does not verify")
        return statement


@dataclass
class Fault:
    status: int | None = None
    delay: float = 0.0
    code: str | None = None
    reply: dict[str, Any] | None = None  # answered with HTTP 200 as is, e.g. {"value": false} to an upload
    times: int | None = None  # None: every call until cleared


@dataclass(frozen=True)
class Notification:
    kind: str  # "success" or "failure"
    transaction_id: str
    body: dict[str, Any]
    headers: dict[str, str]


@dataclass(frozen=True)
class Validation:
    transaction_id: str
    code: str
    description: str


@dataclass
class _State:
    faults: dict[str, Fault] = field(default_factory=dict)
    notifications: list[Notification] = field(default_factory=list)
    validations: list[Validation] = field(default_factory=list)
    service_uris: dict[str, str] = field(default_factory=dict)
    revocation_queue: list[dict[str, Any]] = field(default_factory=list)
    revocations_out: dict[str, dict[str, Any]] = field(default_factory=dict)  # handed out, not answered
    revocation_results: list[dict[str, Any]] = field(default_factory=list)


class IntuneEmulator(EmulatorServer):
    """Graph service discovery + Intune ScepActions, backed by an EntraEmulator for tokens."""

    def __init__(
        self,
        entra: EntraEmulator,
        tenant: str = DEFAULT_TENANT,
        resource: str = INTUNE_RESOURCE,
        host: str = "127.0.0.1",
        port: int = 0,
        ca: EmulatorCA | None = None,
        codec: ChallengeCodec | None = None,
    ) -> None:
        super().__init__(host, port, ca or entra.ca)
        self.entra = entra
        self.tenant = tenant
        self.resource = resource
        self.codec = codec or ChallengeCodec()
        self.provider_names = {VALIDATION_SERVICE: VALIDATION_SERVICE, PKI_CONNECTOR_SERVICE: PKI_CONNECTOR_SERVICE}
        self.discovery_page_size: int | None = None  # page the endpoint list with @odata.nextLink
        self._state = _State()
        self._lock = threading.Lock()
        self.route("GET", rf"/v1\.0/servicePrincipals/appId={INTUNE_APP_ID}/endpoints", self._discovery)
        self.route(
            "POST",
            rf"/{VALIDATION_SERVICE}/ScepActions/(?P<action>validateRequest|successNotification|failureNotification)",
            self._scep_action,
        )
        self.route(
            "POST",
            rf"/{PKI_CONNECTOR_SERVICE}/CertificateAuthorityRequests/"
            r"(?P<action>downloadRevocationRequests|uploadRevocationResults)",
            self._revocation_action,
        )
        self.route("POST", r"/_emulator/challenges", self._control_challenge)
        self.route("POST", r"/_emulator/revocations", self._control_queue_revocation)
        self.route("GET", r"/_emulator/revocations", self._control_revocations)
        self.route("GET", r"/_emulator/notifications", self._control_notifications)
        self.route("GET", r"/_emulator/validations", self._control_validations)
        self.route("POST", r"/_emulator/faults", self._control_fault)
        self.route("DELETE", r"/_emulator/faults", self._control_clear_faults)

    # Python API for tests

    @property
    def graph_url(self) -> str:
        return self.url

    @property
    def service_url(self) -> str:
        return f"{self.url}/{VALIDATION_SERVICE}"

    def register_client(
        self,
        client_id: str,
        secret: str | None = None,
        certificate: x509.Certificate | None = None,
        scep_role: bool = True,
        graph_role: bool = True,
        federated_subjects: Iterable[str] = (),
    ) -> None:
        """Register an application in the Entra emulator with (by default) both roles this service needs."""
        self.entra.register_client(
            self.tenant,
            client_id,
            secret=secret,
            certificate=certificate,
            roles=self.roles(scep_role, graph_role),
            federated_subjects=federated_subjects,
        )

    def roles(self, scep_role: bool = True, graph_role: bool = True) -> dict[str, list[str]]:
        """The roles mapping (audience -> roles) for Entra registrations."""
        return {
            self.resource: [SCEP_ROLE] if scep_role else [],
            self.graph_url: [GRAPH_ROLE] if graph_role else [],
        }

    def issue_challenge(
        self,
        subject: str,
        sans: Sequence[str] = (),
        ttl: float = 3600,
        key_usage: Iterable[str] | None = None,
        eku: Iterable[str] | None = None,
        key_size: int | None = None,
    ) -> str:
        """A challenge naming what the CSR must contain. sans: "dns:...", "email:...", "upn:...", "uri:..."."""
        return self.codec.issue(subject, sans, ttl, key_usage=key_usage, eku=eku, key_size=key_size)

    def inject(
        self,
        endpoint: str,
        status: int | None = None,
        delay: float = 0.0,
        code: str | None = None,
        times: int | None = None,
        reply: dict[str, Any] | None = None,
    ) -> None:
        """Make endpoint ("validate", "success", "failure", "discovery", "download", "upload") answer status, or
        sleep delay seconds first, or answer 200 with code (or with the JSON reply); for `times` calls (None: until
        clear_faults)."""
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {ENDPOINTS}")
        with self._lock:
            self._state.faults[endpoint] = Fault(status, delay, code, reply, times)

    def queue_revocation(
        self, serial_number: str, issuer_name: str | None = None, ca_configuration: str | None = None
    ) -> str:
        """Queue a revocation request as Intune does when a device is retired, wiped or leaves the profile;
        returns its requestContext."""
        context = str(uuid.uuid4())
        item = {
            "requestContext": context,
            "serialNumber": serial_number,
            "issuerName": issuer_name,
            "caConfiguration": ca_configuration,
        }
        with self._lock:
            self._state.revocation_queue.append(item)
        return context

    def requeue_revocation(self, context: str) -> None:
        """Put a request handed out and not answered back in the queue (Intune asking again)."""
        with self._lock:
            self._state.revocation_queue.append(self._state.revocations_out.pop(context))

    @property
    def revocation_results(self) -> list[dict[str, Any]]:
        """Every result uploaded, in order (a result uploaded twice appears twice)."""
        with self._lock:
            return list(self._state.revocation_results)

    @property
    def revocations_pending(self) -> list[dict[str, Any]]:
        """Requests queued or handed out and not yet answered."""
        with self._lock:
            return [*self._state.revocation_queue, *self._state.revocations_out.values()]

    def clear_faults(self) -> None:
        with self._lock:
            self._state.faults.clear()

    def reset(self) -> None:
        """Forget faults, notifications, validations, overrides and the request log (between tests)."""
        with self._lock:
            self._state = _State()
        self.provider_names = {VALIDATION_SERVICE: VALIDATION_SERVICE, PKI_CONNECTOR_SERVICE: PKI_CONNECTOR_SERVICE}
        self.discovery_page_size = None
        self.clear_log()

    def refuse_credentials(self, client_id: str) -> None:
        """Entra stops issuing tokens to client_id (as if its secret or certificate were revoked)."""
        self.entra.refuse(client_id)

    def set_service_uri(self, provider: str, uri: str | None) -> None:
        """What discovery lists for provider (None: the emulator's own endpoint)."""
        with self._lock:
            if uri is None:
                self._state.service_uris.pop(provider, None)
            else:
                self._state.service_uris[provider] = uri

    @property
    def notifications(self) -> list[Notification]:
        with self._lock:
            return list(self._state.notifications)

    def notifications_of(self, kind: str) -> list[Notification]:
        return [item for item in self.notifications if item.kind == kind]

    @property
    def validations(self) -> list[Validation]:
        with self._lock:
            return list(self._state.validations)

    def client_environment(self, client_id: str, secret: str) -> dict[str, str]:
        """Settings that point this product's Intune client at the emulators."""
        return {
            "SCEP_CHALLENGE_MODE": "intune",
            "INTUNE_AUTH": "secret",
            "INTUNE_TENANT_ID": self.tenant,
            "INTUNE_CLIENT_ID": client_id,
            "INTUNE_CLIENT_SECRET": secret,
            "INTUNE_AUTHORITY_HOST": self.entra.url,
            "INTUNE_GRAPH_URL": self.graph_url,
            "INTUNE_RESOURCE_URL": self.resource,
            "REQUESTS_CA_BUNDLE": self.ca_bundle_path,
            "SSL_CERT_FILE": self.ca_bundle_path,
        }

    # Faults

    def _apply_fault(self, endpoint: str) -> Response | None:
        with self._lock:
            fault = self._state.faults.get(endpoint)
            if fault is None:
                return None
            if fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    del self._state.faults[endpoint]
        if fault.delay:
            time.sleep(fault.delay)
        if fault.status is not None:
            return json_response({"error": {"code": "InternalServerError", "message": "injected fault"}}, fault.status)
        if fault.code is not None:
            return json_response({"code": fault.code, "errorDescription": "injected answer"})
        if fault.reply is not None:
            return json_response(fault.reply)
        return None

    # Authentication

    def _claims(self, request: Request, audience: str, role: str) -> dict[str, Any]:
        authorization = request.header("Authorization") or ""
        if not authorization.startswith("Bearer "):
            raise HttpError(401, {"error": {"code": "Unauthorized", "message": "missing bearer token"}})
        try:
            claims = self.entra.verify_token(authorization.removeprefix("Bearer "), audience)
        except TokenError as error:
            raise HttpError(401, {"error": {"code": "InvalidAuthenticationToken", "message": str(error)}}) from None
        if claims.get("tid") != self.tenant:
            raise HttpError(401, {"error": {"code": "InvalidAuthenticationToken", "message": "wrong tenant"}})
        if role not in (claims.get("roles") or []):
            raise HttpError(
                403, {"error": {"code": "Authorization_RequestDenied", "message": f"the {role} role is missing"}}
            )
        return claims

    # Graph

    def _discovery(self, request: Request) -> Response:
        self._claims(request, self.graph_url, GRAPH_ROLE)
        fault = self._apply_fault("discovery")
        if fault is not None:
            return fault
        with self._lock:
            overrides = dict(self._state.service_uris)
        value = [
            {"providerName": self.provider_names[provider], "uri": overrides.get(provider, f"{self.url}/{provider}")}
            for provider in (PKI_CONNECTOR_SERVICE, VALIDATION_SERVICE)
        ]
        page: dict[str, Any] = {"@odata.context": f"{self.url}/v1.0/$metadata#endpoints"}
        start = int(request.query.get("$skiptoken") or 0)
        size = self.discovery_page_size or len(value)
        page["value"] = value[start : start + size]
        if start + size < len(value):
            page["@odata.nextLink"] = f"{self.url}{request.path}?$skiptoken={start + size}"
        return json_response(page)

    # ScepActions

    def _scep_action(self, request: Request, action: str) -> Response:
        self._claims(request, self.resource, SCEP_ROLE)
        self._check_headers(request, API_VERSION)
        endpoint = _ACTION_ENDPOINT[action]
        fault = self._apply_fault(endpoint)
        if fault is not None:
            return fault
        body = request.json()
        if endpoint == "validate":
            return self._validate(_section(body, "request", ("transactionId", "certificateRequest", "callerInfo")))
        if endpoint == "success":
            fields = (
                "transactionId",
                "certificateRequest",
                "certificateThumbprint",
                "certificateSerialNumber",
                "certificateExpirationDateUtc",
                "issuingCertificateAuthority",
                "caConfiguration",
                "certificateAuthority",
                "callerInfo",
            )
        else:
            fields = ("transactionId", "certificateRequest", "hResult", "errorDescription", "callerInfo")
        notification = _section(body, "notification", fields)
        with self._lock:
            self._state.notifications.append(
                Notification(endpoint, str(notification["transactionId"]), notification, dict(request.headers))
            )
        return json_response({"code": "Success", "errorDescription": ""})

    # Revocation requests

    def _revocation_action(self, request: Request, action: str) -> Response:
        # The PKI connector service takes the same Intune API token as the SCEP actions (IntuneRevocationClient
        # extends IntuneClient and asks for the same resource).
        self._claims(request, self.resource, SCEP_ROLE)
        self._check_headers(request, REVOCATION_API_VERSION)
        endpoint = "download" if action == "downloadRevocationRequests" else "upload"
        fault = self._apply_fault(endpoint)
        if fault is not None:
            return fault
        if endpoint == "download":
            return self._download_revocations(_section(request.json(), "downloadParameters", ("maxRequests",)))
        return self._upload_revocation_results(request.json())

    def _download_revocations(self, parameters: dict[str, Any]) -> Response:
        limit, issuer = parameters["maxRequests"], parameters.get("issuerName")
        # IntuneRevocationClient.DownloadCARevocationRequests: maxRequests between 1 and MAXREQUESTS_MAXVALUE (500).
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_REVOCATION_REQUESTS:
            raise _bad_request(f"maxRequests must be an integer from 1 to {MAX_REVOCATION_REQUESTS}")
        if issuer is not None and not isinstance(issuer, str):
            raise _bad_request("issuerName must be null or a string")
        with self._lock:
            queue = self._state.revocation_queue
            chosen = [item for item in queue if issuer is None or item["issuerName"] == issuer][:limit]
            for item in chosen:
                queue.remove(item)
                self._state.revocations_out[item["requestContext"]] = item
        return json_response({"value": chosen})

    def _upload_revocation_results(self, body: Any) -> Response:
        results = body.get("results") if isinstance(body, dict) else None
        # UploadRevocationResults: "revocationResults may not be null or empty".
        if not isinstance(results, list) or not results:
            raise _bad_request("results must be a non-empty list")
        for result in results:
            _check_revocation_result(result)
        with self._lock:
            out = self._state.revocations_out
            unknown = [r["requestContext"] for r in results if r["requestContext"] not in out and not self._answered(r)]
            if unknown:
                raise _bad_request(f"unknown requestContext {unknown[0]!r}")
            for result in results:
                self._state.revocation_results.append(dict(result))
                item = out.pop(result["requestContext"], None)
                if item is not None and result["errorCode"] in RETRYABLE_CODES:
                    self._state.revocation_queue.append(item)  # Intune asks again later
        return json_response({"value": True})

    def _answered(self, result: dict[str, Any]) -> bool:
        """A result for a request answered before (a CA reporting once more after a lost answer)."""
        return any(r["requestContext"] == result["requestContext"] for r in self._state.revocation_results)

    @staticmethod
    def _check_headers(request: Request, api_version: str) -> None:
        problems = []
        if request.header("api-version") != api_version:
            problems.append(f"api-version must be {api_version}")
        try:
            uuid.UUID(request.header("client-request-id") or "")
        except ValueError:
            problems.append("client-request-id must be a UUID")
        if not request.header("UserAgent"):
            problems.append("the UserAgent header is missing")
        if not (request.header("Content-Type") or "").startswith("application/json"):
            problems.append("Content-Type must be application/json")
        if problems:
            raise HttpError(400, {"error": {"code": "BadRequest", "message": "; ".join(problems)}})

    def _validate(self, fields: dict[str, Any]) -> Response:
        transaction_id = str(fields["transactionId"])
        try:
            self._check_request(str(fields["certificateRequest"]))
            code, description = "Success", ""
        except ChallengeProblem as problem:
            code, description = problem.code, problem.description
        with self._lock:
            self._state.validations.append(Validation(transaction_id, code, description))
        return json_response({"code": code, "errorDescription": description})

    def _check_request(self, certificate_request: str) -> None:
        try:
            csr = x509.load_der_x509_csr(base64.b64decode(certificate_request, validate=True))
        except ValueError:
            raise ChallengeProblem("CertificateRequestDecodingFailed", "not a base64 DER PKCS#10") from None
        if not csr.is_signature_valid:
            raise ChallengeProblem("SignatureValidationFailed", "the CSR signature does not verify")
        statement = self.codec.open(_challenge_of(csr))
        _check_times(statement)
        _check_subject(csr, str(statement.get("sub", "")))
        _check_sans(csr, statement.get("san") or [])
        _check_key(csr, statement)

    # Control endpoints

    def _control_challenge(self, request: Request) -> Response:
        body = request.json() or {}
        if not isinstance(body.get("subject"), str):
            raise HttpError(400, {"error": "subject (a string such as 'CN=device1') is required"})
        challenge = self.issue_challenge(
            body["subject"],
            body.get("sans") or [],
            float(body.get("ttl") or 3600),
            key_usage=body.get("key_usage"),
            eku=body.get("eku"),
            key_size=body.get("key_size"),
        )
        return json_response({"challenge": challenge})

    def _control_queue_revocation(self, request: Request) -> Response:
        body = request.json() or {}
        if not isinstance(body.get("serialNumber"), str):
            raise HttpError(400, {"error": "serialNumber (hex, as successNotification reported it) is required"})
        context = self.queue_revocation(body["serialNumber"], body.get("issuerName"), body.get("caConfiguration"))
        return json_response({"requestContext": context})

    def _control_revocations(self, request: Request) -> Response:
        with self._lock:
            queued, out = list(self._state.revocation_queue), list(self._state.revocations_out.values())
            results = list(self._state.revocation_results)
        return json_response({"queued": queued, "handedOut": out, "results": results})

    def _control_notifications(self, request: Request) -> Response:
        return json_response(
            [{"kind": n.kind, "transactionId": n.transaction_id, "body": n.body} for n in self.notifications]
        )

    def _control_validations(self, request: Request) -> Response:
        return json_response(
            [
                {"transactionId": v.transaction_id, "code": v.code, "description": v.description}
                for v in self.validations
            ]
        )

    def _control_fault(self, request: Request) -> Response:
        body = request.json() or {}
        try:
            self.inject(
                str(body.get("endpoint")),
                status=body.get("status"),
                delay=float(body.get("delay") or 0),
                code=body.get("code"),
                times=body.get("times"),
                reply=body.get("reply"),
            )
        except ValueError as error:
            raise HttpError(400, {"error": str(error)}) from None
        return json_response({"ok": True})

    def _control_clear_faults(self, request: Request) -> Response:
        self.clear_faults()
        return json_response({"ok": True})


# Checks of a CSR against a challenge statement


def _section(body: Any, name: str, fields: Sequence[str]) -> dict[str, Any]:
    section = body.get(name) if isinstance(body, dict) else None
    if not isinstance(section, dict):
        raise HttpError(400, {"error": {"code": "BadRequest", "message": f"the body needs a {name!r} object"}})
    missing = [item for item in fields if item not in section]
    if missing:
        raise HttpError(400, {"error": {"code": "BadRequest", "message": f"{name} lacks {', '.join(missing)}"}})
    return section


def _bad_request(message: str) -> HttpError:
    return HttpError(400, {"error": {"code": "BadRequest", "message": message}})


def _check_revocation_result(result: Any) -> None:
    """A CARevocationResult as the Java constructor allows it: a non-empty requestContext, succeeded exactly when
    errorCode is "0" (None), and a CARequestErrorCodes value."""
    if not isinstance(result, dict):
        raise _bad_request("each result must be an object")
    context, succeeded, code = result.get("requestContext"), result.get("succeeded"), result.get("errorCode")
    if not isinstance(context, str) or not context:
        raise _bad_request("requestContext may not be null or empty")
    if not isinstance(succeeded, bool) or code not in KNOWN_RESULT_CODES:
        raise _bad_request("succeeded must be a boolean and errorCode a CARequestErrorCodes value")
    if succeeded != (code == "0"):
        raise _bad_request("errorCode must be 0 (None) exactly when succeeded is true")
    message = result.get("errorMessage")
    if message is not None and not isinstance(message, str):
        raise _bad_request("errorMessage must be a string")


def _challenge_of(csr: x509.CertificateSigningRequest) -> str:
    try:
        value = csr.attributes.get_attribute_for_oid(AttributeOID.CHALLENGE_PASSWORD).value
    except x509.AttributeNotFound:
        raise ChallengeProblem("ChallengePasswordMissing", "the CSR has no challengePassword") from None
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    if not text:
        raise ChallengeProblem("ChallengePasswordMissing", "the challengePassword is empty")
    return text


def _check_times(statement: dict[str, Any]) -> None:
    now = time.time()
    try:
        issued, expires = float(statement["iat"]), float(statement["exp"])
    except (KeyError, TypeError, ValueError):
        raise ChallengeProblem("ChallengeInvalidTimestamp", "the challenge has no valid times") from None
    if issued > now + CLOCK_SKEW_SECONDS or expires < issued:
        raise ChallengeProblem("ChallengeInvalidTimestamp", "the challenge times are not plausible")
    if expires < now:
        raise ChallengeProblem("ChallengeExpired", "the challenge has expired")


def _check_subject(csr: x509.CertificateSigningRequest, expected: str) -> None:
    if len(csr.subject) == 0:
        raise ChallengeProblem("SubjectNameMissing", "the CSR has no subject")
    if csr.subject != x509.Name.from_rfc4514_string(expected):
        raise ChallengeProblem("SubjectNameMismatch", "the CSR subject is not the one Intune expects")


def _check_sans(csr: x509.CertificateSigningRequest, expected: list[str]) -> None:
    if not expected:
        return
    try:
        extension = csr.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    except x509.ExtensionNotFound:
        raise ChallengeProblem("SubjectAltNameMissing", "the CSR has no subjectAltName") from None
    present = {_describe_name(name) for name in extension.value}
    if present != set(expected):
        raise ChallengeProblem("SubjectAltNameMismatch", "the CSR names are not the ones Intune expects")


def _check_key(csr: x509.CertificateSigningRequest, statement: dict[str, Any]) -> None:
    key_size = statement.get("ks")
    public_key = csr.public_key()
    if key_size and (not isinstance(public_key, rsa.RSAPublicKey) or public_key.key_size != key_size):
        raise ChallengeProblem("KeyLengthMismatch", f"the key is not RSA {key_size}")
    expected_usage = statement.get("ku")
    if expected_usage is not None and _key_usage(csr) != set(expected_usage):
        raise ChallengeProblem("KeyUsageMismatch", "the CSR key usage is not the one Intune expects")
    expected_eku = statement.get("eku")
    if expected_eku is not None:
        try:
            extension = csr.extensions.get_extension_for_oid(ExtensionOID.EXTENDED_KEY_USAGE)
        except x509.ExtensionNotFound:
            raise ChallengeProblem("EnhancedKeyUsageMissing", "the CSR has no extended key usage") from None
        if {oid.dotted_string for oid in extension.value} != set(expected_eku):
            raise ChallengeProblem("EnhancedKeyUsageMismatch", "the CSR EKU is not the one Intune expects")


def _key_usage(csr: x509.CertificateSigningRequest) -> set[str]:
    try:
        usage = csr.extensions.get_extension_for_oid(ExtensionOID.KEY_USAGE).value
    except x509.ExtensionNotFound:
        return set()
    return {flag for flag in _KEY_USAGE_FLAGS if getattr(usage, flag)}


def _describe_name(name: x509.GeneralName) -> str:
    if isinstance(name, x509.DNSName):
        return f"dns:{name.value.lower()}"
    if isinstance(name, x509.RFC822Name):
        return f"email:{name.value.lower()}"
    if isinstance(name, x509.UniformResourceIdentifier):
        return f"uri:{name.value}"
    if isinstance(name, x509.OtherName) and name.type_id == UPN_OID:
        return f"upn:{asn1_core.UTF8String.load(name.value).native.lower()}"
    return f"other:{name!r}"


def _normalise_san(item: str) -> str:
    kind, _, value = item.partition(":")
    if not value:
        kind, value = "dns", kind
    kind = kind.lower()
    return f"{kind}:{value if kind == 'uri' else value.lower()}"


# Helpers for tests


def build_csr(
    subject: str,
    challenge: str | None,
    sans: Sequence[str] = (),
    key: rsa.RSAPrivateKey | None = None,
    key_usage: Iterable[str] | None = None,
    eku: Iterable[str] | None = None,
) -> x509.CertificateSigningRequest:
    """A CSR as an Intune-managed device sends it: the challenge in challengePassword, the names Intune told
    it to use. sans use the emulator's notation ("dns:", "email:", "upn:", "uri:")."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name.from_rfc4514_string(subject))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName([_general_name(s) for s in sans]), False)
    if key_usage is not None:
        flags = {flag: flag in set(key_usage) for flag in _KEY_USAGE_FLAGS}
        builder = builder.add_extension(x509.KeyUsage(**flags, encipher_only=False, decipher_only=False), True)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ObjectIdentifier(oid) for oid in eku]), False)
    if challenge is not None:
        builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, challenge.encode("utf-8"))
    return builder.sign(key or rsa.generate_private_key(public_exponent=65537, key_size=2048), hashes.SHA256())


def _general_name(item: str) -> x509.GeneralName:
    kind, _, value = _normalise_san(item).partition(":")
    if kind == "dns":
        return x509.DNSName(value)
    if kind == "email":
        return x509.RFC822Name(value)
    if kind == "uri":
        return x509.UniformResourceIdentifier(value)
    if kind == "upn":
        return x509.OtherName(UPN_OID, asn1_core.UTF8String(value).dump())
    raise ValueError(f"unknown SAN kind {kind!r}")


@dataclass
class IntuneTestbed:
    """Running Entra + Intune emulators with one application registered (secret auth, both roles)."""

    entra: EntraEmulator
    intune: IntuneEmulator
    client_id: str
    secret: str

    def environment(self) -> dict[str, str]:
        return self.intune.client_environment(self.client_id, self.secret)

    def reset(self) -> None:
        """Back to the state right after start: no faults or records, the client registered and accepted."""
        self.intune.reset()
        self.entra.clear_log()
        self.entra.accept(self.client_id)
        self.intune.register_client(self.client_id, secret=self.secret)


@contextlib.contextmanager
def running_intune(
    client_id: str = "5f0c3a4e-1d2b-4c6a-9e8f-7a1b2c3d4e5f", secret: str | None = None
) -> Iterator[IntuneTestbed]:
    """Start both emulators (free ports, one CA), register client_id, stop them afterwards."""
    secret = secret or base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("=")
    with EntraEmulator() as entra, IntuneEmulator(entra) as intune:
        intune.register_client(client_id, secret=secret)
        yield IntuneTestbed(entra, intune, client_id, secret)


# Stand-alone use


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the Intune (and Entra ID) emulators until interrupted.")
    parser.add_argument("--port", type=int, default=0, help="port of the Intune/Graph emulator (0: any free)")
    parser.add_argument("--entra-port", type=int, default=0, help="port of the Entra ID emulator (0: any free)")
    parser.add_argument("--client-id", default="5f0c3a4e-1d2b-4c6a-9e8f-7a1b2c3d4e5f")
    parser.add_argument("--client-secret", default=None, help="default: a random one, printed")
    args = parser.parse_args(argv)
    secret = args.client_secret or base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("=")
    with EntraEmulator(port=args.entra_port) as entra, IntuneEmulator(entra, port=args.port) as intune:
        intune.register_client(args.client_id, secret=secret)
        print(f"Intune + Graph emulator: {intune.url}", flush=True)
        print(f"Entra ID emulator:       {entra.url}", flush=True)
        print(f"CA bundle:               {intune.ca_bundle_path}", flush=True)
        print("Settings for the SCEP server:", flush=True)
        for name, value in intune.client_environment(args.client_id, secret).items():
            print(f"export {name}={value}", flush=True)
        print("Issue a challenge (put it in the CSR's challengePassword):", flush=True)
        print(
            f"  curl --cacert {intune.ca_bundle_path} -X POST {intune.url}/_emulator/challenges "
            "-H 'Content-Type: application/json' "
            """-d '{"subject": "CN=device1", "sans": ["dns:device1.example.com"], "ttl": 3600}'""",
            flush=True,
        )
        print(f"Notifications received:  curl --cacert {intune.ca_bundle_path} {intune.url}/_emulator/notifications")
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
