"""A wire-level Azure Key Vault emulator over HTTPS: keys, certificates and secrets, as the Python SDK sees them.

Authentication follows Key Vault's challenge protocol: a request without a bearer token gets 401 with
`WWW-Authenticate: Bearer authorization="<entra>/<tenant>", resource="https://vault.azure.net"`; tokens are
verified with the Entra emulator. The SDK checks by default that the challenge resource matches the vault
host, which cannot hold for 127.0.0.1, so clients of this emulator turn that check off
(`verify_challenge_resource=False`; in the product, KEY_VAULT_VERIFY_CHALLENGE_RESOURCE=false).

REST subset (the api-versions the Python SDKs know, see API_VERSIONS; the SDK's are logged):
  keys:          GET /keys/{name}[/{version}], POST /keys/{name}/{version}/sign | decrypt | unwrapkey
  certificates:  POST /certificates/{name}/create, GET|DELETE /certificates/{name}/pending,
                 POST /certificates/{name}/pending/merge, GET /certificates/{name}[/{version}],
                 GET /certificates/{name}/versions, PATCH /certificates/{name}/{version}
  secrets:       PUT /secrets/{name}, GET /secrets/{name}[/{version}]

Key material never appears in a response. Rules enforced as Key Vault enforces them (sources next to each):
  - a certificate's key gets the key_ops its X.509 key usage maps to (KEY_USAGE_OPERATIONS); any other
    operation is 403 Forbidden / KeyOperationForbidden;
  - a disabled key version refuses its private-key operations (sign, decrypt, unwrapKey) with 403 Forbidden /
    KeyDisabled; the key of a certificate whose creation is still pending is disabled until the merge;
  - sign takes a digest of exactly the algorithm's size (RS/PS/ES 256/384/512: 32/48/64 bytes), else 400
    BadParameter "Invalid length of 'value'";
  - values are base64url; a blob that does not unwrap is 400 BadParameter with Key Vault's text;
  - api-version is required and must be one Key Vault serves.

Fault injection: `throttle(n, retry_after)` answers the next n authenticated requests with 429 (Retry-After
only when given); `throttle_key_operations(every)` answers every n-th key operation (sign, decrypt, unwrapKey)
with 429 and no Retry-After, as Key Vault throttles them; `fail_transiently(n, status)` with 503 (or another
5xx). `operations` counts what reached the vault per type. stop() and start() again keep the vault's content
and port: an outage and the recovery from it.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import re
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature

from .common import EmulatorCA, EmulatorServer, HttpError, Request, Response, json_response, wait_until_interrupted
from .entra import DEFAULT_TENANT, EntraEmulator, TokenError

VAULT_RESOURCE = "https://vault.azure.net"
PAGE_SIZE = 25

_HASHES: dict[str, hashes.HashAlgorithm] = {"256": hashes.SHA256(), "384": hashes.SHA384(), "512": hashes.SHA512()}
_CURVES = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1, "P-521": ec.SECP521R1}
_CURVE_FOR_ES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}

# The api-versions of Key Vault's data plane that the Python SDKs (keys, certificates, secrets) can send; Key
# Vault answers any other with 400 BadParameter (REST reference, "Key Vault versions").
API_VERSIONS = frozenset(
    {"2016-10-01", "7.0", "7.1", "7.2", "7.3", "7.4", "7.5", "7.6", "2025-07-01", "2026-04-01"}
)

# Microsoft, "About Azure Key Vault certificates", section "X509 to Key Vault usage mapping": the key of a
# certificate gets the key operations its X.509 key usage maps to, and no others.
KEY_USAGE_OPERATIONS = {
    "digitalSignature": ("sign", "verify"),
    "nonRepudiation": ("sign", "verify"),
    "keyCertSign": ("sign", "verify"),
    "cRLSign": ("sign", "verify"),
    "keyEncipherment": ("wrapKey", "unwrapKey"),
    "dataEncipherment": ("encrypt", "decrypt"),
}
# A policy without key_usage: the portal's default usage for a generated certificate (an assumption, and the
# narrow one: it grants no encrypt/decrypt).
DEFAULT_KEY_USAGE = ("digitalSignature", "keyEncipherment")
# Operations that need the private key; a disabled key refuses exactly these (verify, encrypt and wrapKey use
# the public key and still work): azure-sdk-for-python issue #45342, checked against a live vault.
PRIVATE_KEY_OPERATIONS = frozenset({"sign", "decrypt", "unwrapKey"})
# What Key Vault says when a blob does not unwrap: RSA1_5 (azure-sdk-for-js issue #30125) and RSA-OAEP
# (MicrosoftDocs/azure-docs issue #39976); both 400 BadParameter.
UNWRAP_FAILURES = {
    "RSA1_5": "Unable to decrypt specified value with this key.",
    "RSA-OAEP": "Error occurred while decoding OAEP padding.",
    "RSA-OAEP-256": "Error occurred while decoding OAEP padding.",
}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    """Key Vault's 'value' is base64url: anything else is 400 BadParameter (Go SDK users meet this text,
    bruj0/vault-recovery-key issue #20)."""
    stripped = text.rstrip("=")
    if not stripped or not re.fullmatch(r"[A-Za-z0-9_-]+", stripped) or len(stripped) % 4 == 1:
        raise _kv_error(400, "BadParameter", "Content of 'value' is not base64url.\r\nProperty 'value' is required.")
    return base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))


def _b64_decode(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _kv_error(status: int, code: str, message: str, inner: str | None = None) -> HttpError:
    body: dict[str, Any] = {"error": {"code": code, "message": message}}
    if inner:
        body["error"]["innererror"] = {"code": inner}
    return HttpError(status, body)


def _not_found(kind: str, name: str) -> HttpError:
    return _kv_error(404, f"{kind}NotFound", f"A {kind.lower()} with (name/id) {name} was not found in this key vault.")


@dataclass
class KeyVersion:
    name: str
    version: str
    private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    kty: str
    created: int
    key_ops: tuple[str, ...]
    enabled: bool = True
    managed: bool = False
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class CertificateVersion:
    name: str
    version: str
    key: KeyVersion
    policy: dict[str, Any]
    issuer_name: str
    created: int
    updated: int
    csr_der: bytes
    status: str = "inProgress"
    certificate: x509.Certificate | None = None
    chain: list[x509.Certificate] = field(default_factory=list)
    enabled: bool = True
    tags: dict[str, str] = field(default_factory=dict)
    polls_until_complete: int = 0


@dataclass
class SecretVersion:
    name: str
    version: str
    value: str
    content_type: str | None
    created: int
    updated: int
    enabled: bool = True
    tags: dict[str, str] = field(default_factory=dict)


class KeyVaultEmulator(EmulatorServer):
    """Key Vault keys, certificates and secrets behind Entra-issued bearer tokens."""

    def __init__(
        self,
        entra: EntraEmulator,
        tenant: str = DEFAULT_TENANT,
        resource: str = VAULT_RESOURCE,
        host: str = "127.0.0.1",
        port: int = 0,
        ca: EmulatorCA | None = None,
    ) -> None:
        super().__init__(host, port, ca or entra.ca)
        self.entra = entra
        self.tenant = tenant
        self.resource = resource
        self._lock = threading.RLock()
        self._keys: dict[str, list[KeyVersion]] = {}
        self._certificates: dict[str, list[CertificateVersion]] = {}
        self._pending: dict[str, CertificateVersion] = {}
        self._secrets: dict[str, list[SecretVersion]] = {}
        self._forbidden: set[str] = set()
        self._throttle_remaining = 0
        self._throttle_retry_after: int | None = None
        self._throttle_every = 0
        self._key_operations_seen = 0
        self._faults_remaining = 0
        self._fault_status = 503
        self.operations: Counter[str] = Counter()
        self.api_versions: set[str] = set()
        self._register_routes()

    def _register_routes(self) -> None:
        name = r"(?P<name>[0-9A-Za-z-]+)"
        version = r"(?P<version>[0-9A-Za-z]*)"
        self.route("POST", rf"/keys/{name}/{version}/sign", self._sign)
        self.route("POST", rf"/keys/{name}/{version}/decrypt", self._decrypt)
        self.route("POST", rf"/keys/{name}/{version}/unwrapkey", self._unwrap)
        self.route("GET", rf"/keys/{name}(?:/{version})?", self._get_key)
        self.route("POST", rf"/certificates/{name}/create", self._create_certificate)
        self.route("GET", rf"/certificates/{name}/pending", self._get_pending)
        self.route("DELETE", rf"/certificates/{name}/pending", self._delete_pending)
        self.route("POST", rf"/certificates/{name}/pending/merge", self._merge)
        self.route("GET", rf"/certificates/{name}/versions", self._list_certificate_versions)
        self.route("GET", rf"/certificates/{name}(?:/{version})?", self._get_certificate)
        self.route("PATCH", rf"/certificates/{name}/{version}", self._update_certificate)
        self.route("PUT", rf"/secrets/{name}", self._set_secret)
        self.route("GET", rf"/secrets/{name}(?:/{version})?", self._get_secret)

    # Test controls

    def throttle(self, count: int, retry_after: int | None = None) -> None:
        """Answer the next count authenticated requests with 429 Too Many Requests (Retry-After when given)."""
        with self._lock:
            self._throttle_remaining = count
            self._throttle_retry_after = retry_after

    def throttle_key_operations(self, every: int) -> None:
        """Answer every n-th key operation (sign, decrypt, unwrapKey) with 429 and no Retry-After (0: off).

        Key Vault throttles key operations per vault and answers 429 without Retry-After ("Azure Key Vault
        throttling guidance"; the Retry-After in the SDK's samples comes from other services)."""
        with self._lock:
            self._throttle_every = every
            self._key_operations_seen = 0

    def fail_transiently(self, count: int, status: int = 503) -> None:
        """Answer the next count authenticated requests with a transient server error."""
        with self._lock:
            self._faults_remaining = count
            self._fault_status = status

    def forbid(self, object_id: str) -> None:
        """Answer requests from this principal (token oid) with 403 Forbidden."""
        with self._lock:
            self._forbidden.add(object_id)

    def operation_count(self, *names: str) -> int:
        """How many operations of the given types (all types when none given) reached the vault."""
        with self._lock:
            if not names:
                return sum(count for key, count in self.operations.items() if key != "challenge")
            return sum(self.operations[name] for name in names)

    def reset_counts(self) -> None:
        with self._lock:
            self.operations.clear()

    def certificate_versions(self, name: str) -> list[CertificateVersion]:
        with self._lock:
            return list(self._certificates.get(name, []))

    def client_environment(self) -> dict[str, str]:
        """Settings that point the product at this vault (plus the Entra emulator's)."""
        return {
            **self.entra.client_environment(),
            "KEY_VAULT_URL": self.url,
            "KEY_VAULT_VERIFY_CHALLENGE_RESOURCE": "false",
        }

    # Authentication and faults

    def _challenge(self, message: str) -> Response:
        header = f'Bearer authorization="{self.entra.url}/{self.tenant}", resource="{self.resource}"'
        with self._lock:
            self.operations["challenge"] += 1
        return json_response(
            {"error": {"code": "Unauthorized", "message": message}}, 401, {"WWW-Authenticate": header}
        )

    def before_request(self, request: Request) -> Response | None:
        api_version = request.query.get("api-version")
        if not api_version:
            raise _kv_error(400, "BadParameter", "The 'api-version' query parameter is required.")
        if api_version not in API_VERSIONS:
            raise _kv_error(
                400,
                "BadParameter",
                f"The specified version ({api_version}) is not recognized. Consider using the latest supported "
                "version (7.6).",
            )
        authorization = request.header("Authorization") or ""
        if not authorization.startswith("Bearer "):
            return self._challenge("AKV10000: Request is missing a Bearer or PoP token.")
        try:
            claims = self.entra.verify_token(authorization.removeprefix("Bearer "), self.resource)
        except TokenError as error:
            return self._challenge(f"AKV10032: Invalid token: {error}.")
        if claims.get("tid") != self.tenant:
            return self._challenge("AKV10032: Invalid issuer.")
        with self._lock:
            self.api_versions.add(api_version)
            if claims.get("oid") in self._forbidden:
                # an RBAC denial: code Forbidden, innererror ForbiddenByRbac (Key Vault RBAC troubleshooting)
                raise _kv_error(
                    403, "Forbidden", "Caller is not authorized to perform action on resource.", "ForbiddenByRbac"
                )
            return self._injected_fault(request)

    def _injected_fault(self, request: Request) -> Response | None:
        if self._throttle_remaining > 0:
            self._throttle_remaining -= 1
            return self._throttled(self._throttle_retry_after)
        if self._throttle_every and _is_key_operation(request):
            self._key_operations_seen += 1
            if self._key_operations_seen % self._throttle_every == 0:
                return self._throttled(None)
        if self._faults_remaining > 0:
            self._faults_remaining -= 1
            self.operations["faulted"] += 1
            return json_response(
                {"error": {"code": "ServiceUnavailable", "message": "The service is temporarily unavailable."}},
                self._fault_status,
            )
        return None

    def _throttled(self, retry_after: int | None) -> Response:
        self.operations["throttled"] += 1
        headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
        message = (
            "Request was not processed because too many requests were received. Reason: A) Number of "
            "requests to the vault exceeded the vault's limit (Azure Key Vault throttling guidance)."
        )
        return json_response({"error": {"code": "Throttled", "message": message}}, 429, headers)

    def _count(self, operation: str) -> None:
        with self._lock:
            self.operations[operation] += 1

    # Keys

    def _key_version(self, name: str, version: str | None) -> KeyVersion:
        with self._lock:
            versions = self._keys.get(name)
            if not versions:
                raise _not_found("Key", name)
            if not version:
                return versions[-1]
            for candidate in versions:
                if candidate.version == version:
                    return candidate
        raise _not_found("Key", f"{name}/{version}")

    def _usable_key(self, name: str, version: str, operation: str) -> KeyVersion:
        key = self._key_version(name, version)
        if operation not in key.key_ops:
            # the answer azure-sdk-for-net issue #11518 shows for a certificate key without dataEncipherment
            raise _kv_error(
                403, "Forbidden", f"Operation {operation} is not permitted on this key.", "KeyOperationForbidden"
            )
        if not key.enabled and operation in PRIVATE_KEY_OPERATIONS:
            raise _kv_error(
                403, "Forbidden", f"Operation {operation} is not allowed on a disabled key.", "KeyDisabled"
            )
        return key

    def _key_bundle(self, key: KeyVersion) -> dict[str, Any]:
        jwk: dict[str, Any] = {"kid": f"{self.url}/keys/{key.name}/{key.version}", "kty": key.kty}
        public = key.private_key.public_key()
        jwk["key_ops"] = list(key.key_ops)
        if isinstance(public, rsa.RSAPublicKey):
            numbers = public.public_numbers()
            jwk["n"] = _b64url(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big"))
            jwk["e"] = _b64url(numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big"))
        else:
            numbers = public.public_numbers()
            size = (public.curve.key_size + 7) // 8
            jwk["crv"] = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}[public.curve.name]
            jwk["x"] = _b64url(numbers.x.to_bytes(size, "big"))
            jwk["y"] = _b64url(numbers.y.to_bytes(size, "big"))
        bundle: dict[str, Any] = {
            "key": jwk,
            "attributes": {
                "enabled": key.enabled,
                "created": key.created,
                "updated": key.created,
                "recoveryLevel": "Recoverable+Purgeable",
                "recoverableDays": 90,
                "exportable": False,
            },
            "tags": dict(key.tags),
        }
        if key.managed:
            bundle["managed"] = True
        return bundle

    def _get_key(self, request: Request, name: str, version: str | None = None) -> Response:
        self._count("keys.get")
        return json_response(self._key_bundle(self._key_version(name, version)))

    def _sign(self, request: Request, name: str, version: str) -> Response:
        self._count("keys.sign")
        key = self._usable_key(name, version, "sign")
        body = request.json() or {}
        algorithm = str(body.get("alg", ""))
        digest = _b64url_decode(str(body.get("value", "")))
        signature = _sign_digest(key, algorithm, digest)
        return json_response({"kid": f"{self.url}/keys/{key.name}/{key.version}", "value": _b64url(signature)})

    def _decrypt(self, request: Request, name: str, version: str) -> Response:
        self._count("keys.decrypt")
        return self._rsa_unwrap(request, name, version, "decrypt")

    def _unwrap(self, request: Request, name: str, version: str) -> Response:
        self._count("keys.unwrapkey")
        return self._rsa_unwrap(request, name, version, "unwrapKey")

    def _rsa_unwrap(self, request: Request, name: str, version: str, operation: str) -> Response:
        key = self._usable_key(name, version, operation)
        body = request.json() or {}
        algorithm = str(body.get("alg", ""))
        ciphertext = _b64url_decode(str(body.get("value", "")))
        if not isinstance(key.private_key, rsa.RSAPrivateKey):
            raise _kv_error(400, "BadParameter", f"Operation {operation} is not supported for key type {key.kty}.")
        paddings = {
            "RSA1_5": padding.PKCS1v15(),
            "RSA-OAEP": padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None),
            "RSA-OAEP-256": padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None),
        }
        if algorithm not in paddings:
            raise _kv_error(400, "BadParameter", f"Invalid algorithm '{algorithm}'.")
        try:
            if algorithm == "RSA1_5":
                plaintext = _rsa1_5_decrypt(key.private_key, ciphertext)
            else:
                plaintext = key.private_key.decrypt(ciphertext, paddings[algorithm])
        except ValueError:
            raise _kv_error(400, "BadParameter", UNWRAP_FAILURES[algorithm]) from None
        return json_response({"kid": f"{self.url}/keys/{key.name}/{key.version}", "value": _b64url(plaintext)})

    # Certificates

    def _new_key(self, name: str, version: str, policy: dict[str, Any], created: int) -> KeyVersion:
        key_props = dict(policy.get("key_props") or {})
        kty = str(key_props.get("kty") or "RSA")
        with self._lock:
            previous = self._keys.get(name, [])
        if key_props.get("reuse_key") and previous:
            private_key = previous[-1].private_key
        elif kty in ("RSA", "RSA-HSM"):
            size = int(key_props.get("key_size") or 2048)
            if size not in (2048, 3072, 4096):
                raise _kv_error(400, "BadParameter", f"Invalid key size {size}.")
            private_key = rsa.generate_private_key(public_exponent=65537, key_size=size)
        elif kty in ("EC", "EC-HSM"):
            curve = str(key_props.get("crv") or "P-256")
            if curve not in _CURVES:
                raise _kv_error(400, "BadParameter", f"Invalid curve {curve}.")
            private_key = ec.generate_private_key(_CURVES[curve]())
        else:
            raise _kv_error(400, "BadParameter", f"Invalid key type {kty}.")
        return KeyVersion(name, version, private_key, kty, created, _key_operations(policy), managed=True)

    def _create_certificate(self, request: Request, name: str) -> Response:
        self._count("certificates.create")
        body = request.json() or {}
        policy = dict(body.get("policy") or {})
        issuer_name = str((policy.get("issuer") or {}).get("name") or "")
        if issuer_name.lower() not in ("self", "unknown"):
            raise _kv_error(400, "BadParameter", f"Issuer '{issuer_name}' is not configured in this emulator.")
        subject = str((policy.get("x509_props") or {}).get("subject") or "")
        if not subject:
            raise _kv_error(400, "BadParameter", "Subject or SubjectAlternativeNames is required.")
        with self._lock:
            pending = self._pending.get(name)
            if pending is not None and pending.status == "inProgress":
                raise _kv_error(409, "Conflict", f"Certificate {name} is currently being created.")
        now = int(time.time())
        version = uuid.uuid4().hex
        key = self._new_key(name, version, policy, now)
        subject_name = _parse_subject(subject)
        created = CertificateVersion(
            name=name,
            version=version,
            key=key,
            policy=policy,
            issuer_name=issuer_name,
            created=now,
            updated=now,
            csr_der=_make_csr(key.private_key, subject_name),
            tags=dict(body.get("tags") or {}),
            enabled=bool((body.get("attributes") or {}).get("enabled", True)),
        )
        # The key of a certificate still being created is disabled: Key Vault enables a certificate's key and
        # secret with the certificate, which is enabled only once issued or merged ("About Azure Key Vault
        # certificates": the addressable key and secret follow the certificate's attributes).
        key.enabled = False
        if issuer_name.lower() == "self":
            created.certificate = _self_signed(key.private_key, subject_name, policy)
            created.polls_until_complete = 1
        with self._lock:
            self._keys.setdefault(name, []).append(key)
            self._certificates.setdefault(name, []).append(created)
            self._pending[name] = created
        return json_response(self._operation(created), 202)

    def _operation(self, pending: CertificateVersion) -> dict[str, Any]:
        operation: dict[str, Any] = {
            "id": f"{self.url}/certificates/{pending.name}/pending",
            "issuer": {"name": pending.issuer_name},
            "csr": _b64(pending.csr_der),
            "cancellation_requested": False,
            "status": pending.status,
            "request_id": pending.version,
        }
        if pending.status == "inProgress":
            operation["status_details"] = (
                "Pending certificate created. Certificate request is in progress. This may take some time "
                "based on the issuer provider. Please check again later."
            )
        else:
            operation["target"] = f"{self.url}/certificates/{pending.name}"
        return operation

    def _pending_for(self, name: str) -> CertificateVersion:
        with self._lock:
            pending = self._pending.get(name)
        if pending is None:
            raise _kv_error(404, "PendingCertificateNotFound", f"Pending certificate not found: {name}")
        return pending

    def _get_pending(self, request: Request, name: str) -> Response:
        self._count("certificates.pending")
        pending = self._pending_for(name)
        with self._lock:
            if pending.status == "inProgress" and pending.certificate is not None:
                pending.polls_until_complete -= 1
                if pending.polls_until_complete <= 0:
                    pending.status = "completed"
                    pending.key.enabled = pending.enabled
        return json_response(self._operation(pending))

    def _delete_pending(self, request: Request, name: str) -> Response:
        self._count("certificates.pending.delete")
        pending = self._pending_for(name)
        with self._lock:
            del self._pending[name]
            if pending.status == "inProgress":
                self._certificates[name].remove(pending)
                self._keys[name].remove(pending.key)
                if not self._certificates[name]:
                    del self._certificates[name]
                    del self._keys[name]
        return json_response(self._operation(pending))

    def _merge(self, request: Request, name: str) -> Response:
        self._count("certificates.merge")
        body = request.json() or {}
        with self._lock:
            pending = self._pending.get(name)
        if pending is None or pending.status != "inProgress" or pending.issuer_name.lower() != "unknown":
            raise _kv_error(403, "Forbidden", f"Pending certificate not found for merge: {name}")
        try:
            chain = [x509.load_der_x509_certificate(_b64_decode(item)) for item in body.get("x5c") or []]
        except ValueError:
            raise _kv_error(400, "BadParameter", "Property x5c has invalid value.") from None
        if not chain:
            raise _kv_error(400, "BadParameter", "Property x5c is required.")
        if _public_der(chain[0].public_key()) != _public_der(pending.key.private_key.public_key()):
            raise _kv_error(
                400, "BadParameter", "Public key from x509 certificate and key of this instance doesn't match"
            )
        with self._lock:
            pending.certificate = chain[0]
            pending.chain = chain[1:]
            pending.status = "completed"
            pending.updated = int(time.time())
            if body.get("tags") is not None:
                pending.tags = dict(body["tags"])
            attributes = body.get("attributes") or {}
            if "enabled" in attributes:
                pending.enabled = bool(attributes["enabled"])
            pending.key.enabled = pending.enabled
        return json_response(self._certificate_bundle(pending), 201)

    def _certificate_version(self, name: str, version: str | None) -> CertificateVersion:
        with self._lock:
            versions = self._certificates.get(name)
            if not versions:
                raise _not_found("Certificate", name)
            if not version:
                return versions[-1]
            for candidate in versions:
                if candidate.version == version:
                    return candidate
        raise _not_found("Certificate", f"{name}/{version}")

    def _attributes(self, item: CertificateVersion) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            "enabled": item.enabled and item.status == "completed",
            "created": item.created,
            "updated": item.updated,
            "recoveryLevel": "Recoverable+Purgeable",
            "recoverableDays": 90,
        }
        if item.status == "completed" and item.certificate is not None:
            attributes["nbf"] = int(item.certificate.not_valid_before_utc.timestamp())
            attributes["exp"] = int(item.certificate.not_valid_after_utc.timestamp())
        return attributes

    def _certificate_bundle(self, item: CertificateVersion) -> dict[str, Any]:
        bundle: dict[str, Any] = {
            "id": f"{self.url}/certificates/{item.name}/{item.version}",
            "kid": f"{self.url}/keys/{item.name}/{item.version}",
            "sid": f"{self.url}/secrets/{item.name}/{item.version}",
            "attributes": self._attributes(item),
            "policy": {**item.policy, "id": f"{self.url}/certificates/{item.name}/policy"},
            "tags": dict(item.tags),
            "contentType": str((item.policy.get("secret_props") or {}).get("contentType") or "application/x-pkcs12"),
        }
        if item.status == "completed" and item.certificate is not None:
            bundle["cer"] = _b64(item.certificate.public_bytes(serialization.Encoding.DER))
            bundle["x5t"] = _b64url(item.certificate.fingerprint(hashes.SHA1()))
        return bundle

    def _get_certificate(self, request: Request, name: str, version: str | None = None) -> Response:
        self._count("certificates.get")
        return json_response(self._certificate_bundle(self._certificate_version(name, version)))

    def _list_certificate_versions(self, request: Request, name: str) -> Response:
        self._count("certificates.versions")
        with self._lock:
            versions = list(self._certificates.get(name, []))
        if not versions:
            raise _not_found("Certificate", name)
        start = int(request.query.get("$skiptoken") or 0)
        page = versions[start : start + PAGE_SIZE]
        items = []
        for item in page:
            entry: dict[str, Any] = {
                "id": f"{self.url}/certificates/{item.name}/{item.version}",
                "attributes": self._attributes(item),
                "tags": dict(item.tags),
            }
            if item.certificate is not None and item.status == "completed":
                entry["x5t"] = _b64url(item.certificate.fingerprint(hashes.SHA1()))
            items.append(entry)
        next_link = None
        if start + PAGE_SIZE < len(versions):
            next_link = (
                f"{self.url}/certificates/{name}/versions?api-version={request.query['api-version']}"
                f"&$skiptoken={start + PAGE_SIZE}"
            )
        return json_response({"value": items, "nextLink": next_link})

    def _update_certificate(self, request: Request, name: str, version: str) -> Response:
        self._count("certificates.update")
        item = self._certificate_version(name, version)
        body = request.json() or {}
        with self._lock:
            if body.get("tags") is not None:
                item.tags = dict(body["tags"])
            attributes = body.get("attributes") or {}
            if "enabled" in attributes and attributes["enabled"] is not None:
                item.enabled = bool(attributes["enabled"])
                item.key.enabled = item.enabled
            item.updated = int(time.time())
        return json_response(self._certificate_bundle(item))

    # Secrets

    def _secret_bundle(self, secret: SecretVersion) -> dict[str, Any]:
        bundle: dict[str, Any] = {
            "value": secret.value,
            "id": f"{self.url}/secrets/{secret.name}/{secret.version}",
            "attributes": {
                "enabled": secret.enabled,
                "created": secret.created,
                "updated": secret.updated,
                "recoveryLevel": "Recoverable+Purgeable",
                "recoverableDays": 90,
            },
            "tags": dict(secret.tags),
        }
        if secret.content_type:
            bundle["contentType"] = secret.content_type
        return bundle

    def _set_secret(self, request: Request, name: str) -> Response:
        self._count("secrets.set")
        body = request.json() or {}
        if not isinstance(body.get("value"), str):
            raise _kv_error(400, "BadParameter", "Property 'value' is required.")
        now = int(time.time())
        secret = SecretVersion(
            name=name,
            version=uuid.uuid4().hex,
            value=body["value"],
            content_type=body.get("contentType"),
            created=now,
            updated=now,
            enabled=bool((body.get("attributes") or {}).get("enabled", True)),
            tags=dict(body.get("tags") or {}),
        )
        with self._lock:
            self._secrets.setdefault(name, []).append(secret)
        return json_response(self._secret_bundle(secret))

    def _get_secret(self, request: Request, name: str, version: str | None = None) -> Response:
        self._count("secrets.get")
        with self._lock:
            versions = list(self._secrets.get(name, []))
        matches = [item for item in versions if not version or item.version == version]
        if not matches:
            raise _not_found("Secret", name if not version else f"{name}/{version}")
        secret = matches[-1]
        if not secret.enabled:
            raise _kv_error(403, "Forbidden", "Operation get is not allowed on a disabled secret.", "SecretDisabled")
        return json_response(self._secret_bundle(secret))


def _parse_subject(subject: str) -> x509.Name:
    try:
        return x509.Name.from_rfc4514_string(subject)
    except ValueError:
        raise _kv_error(400, "BadParameter", f"Subject '{subject}' is not a valid X.500 name.") from None


def _public_der(public_key: Any) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _make_csr(private_key: Any, subject: x509.Name) -> bytes:
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(private_key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.DER)


def _self_signed(private_key: Any, subject: x509.Name, policy: dict[str, Any]) -> x509.Certificate:
    """What Key Vault's "Self" issuer makes: note there is no basicConstraints extension."""
    months = int((policy.get("x509_props") or {}).get("validity_months") or 12)
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30 * months))
        .sign(private_key, hashes.SHA256())
    )


def _rsa1_5_decrypt(private_key: rsa.RSAPrivateKey, ciphertext: bytes) -> bytes:
    """RSAES-PKCS1-v1_5 decryption that reports a bad padding, as Key Vault does (a 400, issue #30125 above).

    OpenSSL 3.2+ answers a bad padding with a synthetic plaintext instead (implicit rejection, the Marvin
    countermeasure), which would make this emulator kinder to a caller than the vault is.
    """
    numbers = private_key.private_numbers()
    modulus = numbers.public_numbers.n
    size = (modulus.bit_length() + 7) // 8
    value = int.from_bytes(ciphertext, "big")
    if len(ciphertext) != size or value >= modulus:
        raise ValueError("ciphertext length")
    block = pow(value, numbers.d, modulus).to_bytes(size, "big")
    separator = block.find(b"\x00", 2)
    if block[:2] != b"\x00\x02" or separator < 10:
        raise ValueError("padding")
    return block[separator + 1 :]


def _key_operations(policy: dict[str, Any]) -> tuple[str, ...]:
    usages = (policy.get("x509_props") or {}).get("key_usage") or DEFAULT_KEY_USAGE
    return tuple(dict.fromkeys(op for usage in usages for op in KEY_USAGE_OPERATIONS.get(str(usage), ())))


def _is_key_operation(request: Request) -> bool:
    return request.method == "POST" and request.path.rsplit("/", 1)[-1] in ("sign", "decrypt", "unwrapkey")


def _sign_digest(key: KeyVersion, algorithm: str, digest: bytes) -> bytes:
    if len(algorithm) != 5 or algorithm[2:] not in _HASHES:
        raise _kv_error(400, "BadParameter", f"Invalid algorithm '{algorithm}'.")
    chosen_hash = _HASHES[algorithm[2:]]
    if len(digest) != chosen_hash.digest_size:
        # Key Vault's own text (azure-cli issue #28027, azure-sdk-for-python issue #4399): RS/PS/ES 256, 384
        # and 512 take exactly 32, 48 and 64 bytes, ES512 included (a SHA-512 digest, not a P-521-sized one).
        raise _kv_error(
            400,
            "BadParameter",
            f"Invalid length of 'value': {len(digest)} bytes. {algorithm} requires {chosen_hash.digest_size} "
            "bytes, encoded with base64url.",
        )
    private_key = key.private_key
    if algorithm.startswith(("RS", "PS")) and isinstance(private_key, rsa.RSAPrivateKey):
        chosen_padding = (
            padding.PKCS1v15()
            if algorithm.startswith("RS")
            else padding.PSS(mgf=padding.MGF1(chosen_hash), salt_length=chosen_hash.digest_size)
        )
        return private_key.sign(digest, chosen_padding, Prehashed(chosen_hash))
    if algorithm.startswith("ES") and isinstance(private_key, ec.EllipticCurvePrivateKey):
        if _CURVE_FOR_ES[algorithm] != _curve_name(private_key):
            raise _kv_error(400, "BadParameter", f"Algorithm {algorithm} does not match the key's curve.")
        r, s = decode_dss_signature(private_key.sign(digest, ec.ECDSA(Prehashed(chosen_hash))))
        size = (private_key.curve.key_size + 7) // 8
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")
    raise _kv_error(400, "BadParameter", f"Algorithm {algorithm} is not valid for key type {key.kty}.")


def _curve_name(private_key: ec.EllipticCurvePrivateKey) -> str:
    return {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}[private_key.curve.name]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the Key Vault and Entra emulators until interrupted.")
    parser.add_argument("--port", type=int, default=0, help="Key Vault emulator port (0: any free port)")
    parser.add_argument("--entra-port", type=int, default=0, help="Entra emulator port (0: any free port)")
    parser.add_argument("--client-id", default="00000000-0000-4000-8000-00000000c11e")
    args = parser.parse_args(argv)
    with EntraEmulator(port=args.entra_port) as entra, KeyVaultEmulator(entra, port=args.port) as vault:
        entra.register_managed_identity(args.client_id, str(uuid.uuid4()), system_assigned=True)
        print(f"Key Vault emulator:  {vault.url}", flush=True)
        print(f"Entra emulator:      {entra.url}", flush=True)
        print(f"CA bundle:           {vault.ca_bundle_path}", flush=True)
        environment = {
            **vault.client_environment(),
            **entra.managed_identity_environment(),
            "AZURE_CLIENT_ID": args.client_id,
        }
        for name, value in environment.items():
            print(f"export {name}={value}", flush=True)
        wait_until_interrupted()


if __name__ == "__main__":
    main()
