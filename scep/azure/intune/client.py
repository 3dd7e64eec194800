"""Client of Intune's SCEP validation service: tokens, service discovery, validateRequest and notifications.

The wire protocol follows Microsoft's published client libraries (Intune-Resource-Access, CsrValidation):
every call is a JSON POST to a URL found through Microsoft Graph service discovery, authenticated with an
Entra ID token for the Intune API. Tokens are cached by the azure-identity credential; the discovered URLs are
cached here and forgotten when one of them stops answering.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from typing import Any
from urllib.parse import urlsplit

import requests
from azure.core.credentials import TokenCredential
from urllib3.exceptions import NameResolutionError, NewConnectionError

from scep.azure import telemetry
from scep.azure.errors import first_line, translated
from scep.azure.intune.settings import IntuneSettings

logger = logging.getLogger("scep.azure.intune")

INTUNE_API_APP_ID = "c161e42e-d4df-4a3d-9b42-e7a3c31f59d4"  # "Microsoft Intune API", which owns SCEP_ROLE
SCEP_ROLE = "scep_challenge_provider"
GRAPH_ROLE = "Application.Read.All"
VALIDATION_SERVICE = "ScepRequestValidationFEService"
PKI_CONNECTOR_SERVICE = "PkiConnectorFEService"
SCEP_API_VERSION = "2018-02-20"
VALIDATE_PATH = "ScepActions/validateRequest"
SUCCESS_PATH = "ScepActions/successNotification"
FAILURE_PATH = "ScepActions/failureNotification"
# Revocation requests (Intune-Resource-Access, IntuneRevocationClient): their own service and api-version.
REVOCATION_API_VERSION = "5019-05-05"
DOWNLOAD_REVOCATIONS_PATH = "CertificateAuthorityRequests/downloadRevocationRequests"
UPLOAD_REVOCATIONS_PATH = "CertificateAuthorityRequests/uploadRevocationResults"
MAX_REVOCATION_REQUESTS = 500  # the most one download may ask for

SUCCESS_CODE = "Success"
# Every answer code Microsoft's libraries know; anything else is treated as a failure of unknown meaning.
ERROR_CODES = frozenset(
    {
        "CertificateRequestDecodingFailed",
        "ChallengePasswordMissing",
        "ChallengeDeserializationError",
        "ChallengeDecryptionError",
        "ChallengeDecodingError",
        "ChallengeInvalidTimestamp",
        "ChallengeExpired",
        "SubjectNameMissing",
        "SubjectNameMismatch",
        "SubjectAltNameMissing",
        "SubjectAltNameMismatch",
        "KeyUsageMismatch",
        "KeyLengthMismatch",
        "EnhancedKeyUsageMissing",
        "EnhancedKeyUsageMismatch",
        "AadKeyIdentifierListMissing",
        "RegisteredKeyMismatch",
        "SigningCertThumbprintMismatch",
        "ScepProfileNoLongerTargetedToTheClient",
        "SignatureValidationFailed",
        "BadCertificateRequestIdInChallenge",
        "BadDeviceIdInChallenge",
        "BadUserIdInChallenge",
    }
)
KNOWN_CODES = ERROR_CODES | {SUCCESS_CODE}

MAX_ERROR_DESCRIPTION = 255
_MAX_DISCOVERY_PAGES = 20
_RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


# Results and errors


@dataclass(frozen=True)
class IntuneResult:
    """Intune's answer to one call: `code` is "Success" or an error code; unknown codes are failures."""

    code: str
    error_description: str
    activity_id: str

    @property
    def succeeded(self) -> bool:
        return self.code == SUCCESS_CODE

    @property
    def known(self) -> bool:
        return self.code in KNOWN_CODES


@dataclass(frozen=True)
class RevocationRequest:
    """One certificate Intune asks this CA to revoke (CARevocationRequest); serial_number is hex as reported."""

    request_context: str
    serial_number: str
    issuer_name: str | None
    ca_configuration: str | None


@dataclass(frozen=True)
class RevocationResult:
    """What became of one request (CARevocationResult): error_code "0" on success, else a CARequestErrorCodes value."""

    request_context: str
    succeeded: bool
    error_code: str
    error_message: str


class IntuneError(Exception):
    """Intune could not be asked, or did not answer in the expected way."""


class IntuneAuthenticationError(IntuneError):
    """No token could be obtained from Entra ID for `scope`."""

    def __init__(self, scope: str, detail: str) -> None:
        super().__init__(f"could not get a token for {scope}: {detail}")
        self.scope = scope
        self.detail = detail


class IntuneConnectionError(IntuneError):
    """The service did not answer: refused, unresolvable, TLS failure, or `timed_out`.

    `never_sent` is True when no connection was established, so the request cannot have had any effect.
    """

    def __init__(self, url: str, detail: str, timed_out: bool = False, never_sent: bool = False) -> None:
        super().__init__(f"{url}: {detail}")
        self.url = url
        self.timed_out = timed_out
        self.never_sent = never_sent


class IntuneHttpError(IntuneError):
    """The service answered with an HTTP error status."""

    def __init__(self, url: str, status: int, detail: str) -> None:
        super().__init__(f"{url}: HTTP {status} {detail}".rstrip())
        self.url = url
        self.status = status
        self.detail = detail


class IntuneServiceNotFound(IntuneError):
    """Graph service discovery did not list the provider."""

    def __init__(self, provider: str) -> None:
        super().__init__(f"service discovery does not list {provider}")
        self.provider = provider


class IntuneResponseError(IntuneError):
    """The service answered 2xx with something that is not the expected JSON."""


class RetryPolicy(Enum):
    # An idempotent call: retry on connection failures and on 429/5xx answers.
    IDEMPOTENT = "idempotent"
    # A call with an effect: retry only when the request certainly never reached the service.
    UNSENT_ONLY = "unsent-only"


# The client


class IntuneClient:
    """Talks to Intune's ScepRequestValidationFEService on behalf of this CA. Thread-safe."""

    def __init__(
        self,
        settings: IntuneSettings,
        credential: TokenCredential,
        *,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.credential = credential
        self._session = session or requests.Session()
        self._sleep = sleep
        self._services: dict[str, str] | None = None
        self._discovery_lock = threading.Lock()

    def close(self) -> None:
        self._session.close()
        close = getattr(self.credential, "close", None)
        if callable(close):
            close()

    # Tokens

    def token(self, scope: str) -> str:
        """A bearer token for scope (azure-identity caches it until shortly before it expires)."""
        with translated(lambda detail: IntuneAuthenticationError(scope, detail)):
            return self.credential.get_token(scope).token

    # Service discovery

    def services(self) -> dict[str, str]:
        """providerName (lower case) -> uri, from Graph; cached until a discovered URL fails."""
        with self._discovery_lock:
            if self._services is None:
                self._services = self._discover()
            return dict(self._services)

    def service_url(self, provider: str) -> str:
        uri = self.services().get(provider.lower())
        if not uri:
            raise IntuneServiceNotFound(provider)
        return uri

    def forget_services(self) -> None:
        with self._discovery_lock:
            self._services = None

    def _discover(self) -> dict[str, str]:
        token = self.token(self.settings.graph_scope)
        services: dict[str, str] = {}
        url: str | None = self.settings.discovery_url
        for _ in range(_MAX_DISCOVERY_PAGES):
            if url is None:
                break
            page = self._get_json(url, token)
            for entry in page.get("value") or []:
                if isinstance(entry, dict) and entry.get("providerName") and entry.get("uri"):
                    services[str(entry["providerName"]).lower()] = str(entry["uri"])
            next_link = page.get("@odata.nextLink")
            # Follow pages only on Graph itself: the token must not travel anywhere else.
            url = str(next_link) if next_link and _same_origin(str(next_link), self.settings.graph_url) else None
        logger.info("Intune service discovery found %d endpoints", len(services))
        return services

    def _get_json(self, url: str, token: str) -> dict[str, Any]:
        headers = {
            "Authorization": f"Bearer {token}",
            "Accept": "application/json",
            "client-request-id": str(uuid.uuid4()),
            "User-Agent": self.settings.user_agent,
        }
        try:
            response = self._session.get(url, headers=headers, timeout=self._timeouts())
        except requests.RequestException as error:
            raise _connection_error(url, error) from error
        if not response.ok:
            raise IntuneHttpError(url, response.status_code, _excerpt(response))
        return _json_object(url, response)

    # ScepActions

    def validate_request(self, transaction_id: str, csr_der: bytes) -> IntuneResult:
        """Ask Intune whether this CSR (with its challenge) may be issued."""
        body = {
            "request": {
                "transactionId": transaction_id,
                "certificateRequest": _b64(csr_der),
                "callerInfo": self.settings.user_agent,
            }
        }
        return self.call(VALIDATION_SERVICE, VALIDATE_PATH, body, transaction_id, RetryPolicy.IDEMPOTENT)

    def success_notification(
        self,
        transaction_id: str,
        csr_der: bytes,
        *,
        thumbprint: str,
        serial_number: str,
        expires: datetime,
        issuing_ca: str,
        ca_configuration: str,
        certificate_authority: str,
    ) -> IntuneResult:
        """Tell Intune which certificate was issued for this transaction."""
        body = {
            "notification": {
                "transactionId": transaction_id,
                "certificateRequest": _b64(csr_der),
                "certificateThumbprint": thumbprint,
                "certificateSerialNumber": serial_number,
                "certificateExpirationDateUtc": iso_utc(expires),
                "issuingCertificateAuthority": issuing_ca,
                "caConfiguration": ca_configuration,
                "certificateAuthority": certificate_authority,
                "callerInfo": self.settings.user_agent,
            }
        }
        return self.call(VALIDATION_SERVICE, SUCCESS_PATH, body, transaction_id, RetryPolicy.UNSENT_ONLY)

    def failure_notification(self, transaction_id: str, csr_der: bytes, hresult: int, description: str) -> IntuneResult:
        """Tell Intune that issuance failed after a successful validation."""
        body = {
            "notification": {
                "transactionId": transaction_id,
                "certificateRequest": _b64(csr_der),
                "hResult": _signed_32(hresult),
                "errorDescription": (description or "Certificate issuance failed")[:MAX_ERROR_DESCRIPTION],
                "callerInfo": self.settings.user_agent,
            }
        }
        return self.call(VALIDATION_SERVICE, FAILURE_PATH, body, transaction_id, RetryPolicy.UNSENT_ONLY)

    def download_revocation_requests(
        self, max_requests: int, issuer_name: str | None, activity: str
    ) -> list[RevocationRequest]:
        """Up to max_requests (1-500) certificates Intune wants revoked, only those of issuer_name when given.

        Items without a requestContext cannot be answered and are left out (logged)."""
        if not 1 <= max_requests <= MAX_REVOCATION_REQUESTS:
            raise ValueError(f"max_requests must be 1-{MAX_REVOCATION_REQUESTS}")
        body = {"downloadParameters": {"maxRequests": max_requests, "issuerName": issuer_name}}
        _, reply = self.post_retrying(
            PKI_CONNECTOR_SERVICE, DOWNLOAD_REVOCATIONS_PATH, body, activity, RetryPolicy.IDEMPOTENT,
            REVOCATION_API_VERSION,
        )
        items = reply.get("value")
        if not isinstance(items, list):
            raise IntuneResponseError(f"{DOWNLOAD_REVOCATIONS_PATH}: the answer has no value list")
        requests_ = [_revocation_request(item) for item in items]
        if None in requests_:
            logger.warning("Intune %s: %d items without a requestContext left out", DOWNLOAD_REVOCATIONS_PATH,
                           requests_.count(None))
        return [item for item in requests_ if item is not None]

    def upload_revocation_results(self, results: Sequence[RevocationResult], activity: str) -> None:
        """Report results; IntuneResponseError unless Intune answers {"value": true}."""
        body = {
            "results": [
                {
                    "requestContext": result.request_context,
                    "succeeded": result.succeeded,
                    "errorCode": result.error_code,
                    "errorMessage": result.error_message,
                }
                for result in results
            ]
        }
        _, reply = self.post_retrying(
            PKI_CONNECTOR_SERVICE, UPLOAD_REVOCATIONS_PATH, body, activity, RetryPolicy.IDEMPOTENT,
            REVOCATION_API_VERSION,
        )
        if reply.get("value") is not True:
            raise IntuneResponseError(f"{UPLOAD_REVOCATIONS_PATH}: Intune did not accept the results")

    def call(
        self,
        provider: str,
        path: str,
        body: dict[str, Any],
        transaction_id: str,
        retry: RetryPolicy,
        api_version: str = SCEP_API_VERSION,
    ) -> IntuneResult:
        """POST body to {discovered uri of provider}/{path}; retries as the policy allows."""
        return _result(*self.post_retrying(provider, path, body, transaction_id, retry, api_version), path)

    def post_retrying(
        self,
        provider: str,
        path: str,
        body: dict[str, Any],
        transaction_id: str,
        retry: RetryPolicy,
        api_version: str,
    ) -> tuple[str, dict[str, Any]]:
        """post() again as the policy allows: (activity id, reply)."""
        attempts = 1 + self.settings.validate_retries if retry is RetryPolicy.IDEMPOTENT else 2
        for attempt in range(1, attempts + 1):
            try:
                activity_id, reply = self.post(provider, path, body, transaction_id, api_version)
            except (IntuneConnectionError, IntuneHttpError) as error:
                if attempt == attempts or not _may_retry(error, retry):
                    raise
                logger.warning(
                    "Intune %s failed (attempt %d of %d, transaction %s): %s",
                    path,
                    attempt,
                    attempts,
                    transaction_id,
                    error,
                )
                self._sleep(0.25 * attempt)
                continue
            return activity_id, reply
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def post(
        self, provider: str, path: str, body: dict[str, Any], transaction_id: str, api_version: str
    ) -> tuple[str, dict[str, Any]]:
        """One POST, no retry: (the activity id sent as client-request-id, the reply's JSON object)."""
        base = self.service_url(provider)
        url = f"{base.rstrip('/')}/{path}"
        activity_id = str(uuid.uuid4())
        headers = {
            "Authorization": f"Bearer {self.token(self.settings.intune_scope)}",
            "Content-Type": "application/json",
            "Accept": "application/json",
            "client-request-id": activity_id,
            "api-version": api_version,
            "UserAgent": self.settings.user_agent,
            "User-Agent": self.settings.user_agent,
        }
        started = time.monotonic()
        try:
            response = self._session.post(
                url, data=json.dumps(body).encode("utf-8"), headers=headers, timeout=self._timeouts()
            )
        except requests.RequestException as error:
            no_answer = "timeout" if isinstance(error, requests.Timeout) else "connection"
            telemetry.intune_call(_call_name(path), started, no_answer)
            if not isinstance(error, requests.ReadTimeout):
                # The service may have moved: ask Graph again next time (as Microsoft's libraries do).
                self.forget_services()
            raise _connection_error(url, error) from error
        telemetry.intune_call(_call_name(path), started, None if response.ok else str(response.status_code))
        elapsed_ms = int((time.monotonic() - started) * 1000)
        logger.info(
            "Intune %s transaction=%s activity=%s status=%d elapsed_ms=%d",
            path,
            transaction_id,
            activity_id,
            response.status_code,
            elapsed_ms,
        )
        if response.status_code == 404:
            self.forget_services()
        if not response.ok:
            raise IntuneHttpError(url, response.status_code, _excerpt(response))
        return activity_id, _json_object(url, response)

    def _timeouts(self) -> tuple[float, float]:
        return (self.settings.connect_timeout, self.settings.read_timeout)


# Helpers


def iso_utc(moment: datetime) -> str:
    """ISO 8601 in UTC with milliseconds and a Z, e.g. 2026-01-31T12:00:00.000Z."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    text = moment.astimezone(timezone.utc).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def _call_name(path: str) -> str:
    """ScepActions/validateRequest -> validateRequest, as telemetry names Intune's calls."""
    return path.rsplit("/", 1)[-1]


def _same_origin(url: str, base: str) -> bool:
    left, right = urlsplit(url), urlsplit(base)
    return (left.scheme, left.netloc.lower()) == (right.scheme, right.netloc.lower())


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _signed_32(value: int) -> int:
    """HRESULTs travel as signed 32-bit integers (0x80004005 -> -2147467259), as .NET sends them."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def _may_retry(error: IntuneError, retry: RetryPolicy) -> bool:
    if isinstance(error, IntuneConnectionError):
        if retry is RetryPolicy.UNSENT_ONLY:
            return error.never_sent
        # A read timeout already spent the whole budget; the device will retry the SCEP request itself.
        return not error.timed_out or error.never_sent
    if isinstance(error, IntuneHttpError):
        return retry is RetryPolicy.IDEMPOTENT and error.status in _RETRYABLE_STATUS
    return False


def _connection_error(url: str, error: requests.RequestException) -> IntuneConnectionError:
    timed_out = isinstance(error, requests.Timeout)
    never_sent = isinstance(error, requests.ConnectTimeout) or _is_connect_failure(error)
    detail = first_line(error)
    return IntuneConnectionError(url, detail, timed_out=timed_out, never_sent=never_sent)


def _is_connect_failure(error: BaseException) -> bool:
    """True when the TCP connection was never established (so the request never left this machine)."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, (NewConnectionError, NameResolutionError, ConnectionRefusedError)):
            return True
        pending.extend([current.__cause__, current.__context__, getattr(current, "reason", None)])
        pending.extend(arg for arg in getattr(current, "args", ()) if isinstance(arg, BaseException))
    return False


def _json_object(url: str, response: requests.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        raise IntuneResponseError(f"{url}: the answer is not JSON ({_excerpt(response)})") from None
    if not isinstance(data, dict):
        raise IntuneResponseError(f"{url}: the answer is not a JSON object")
    return data


def _result(activity_id: str, reply: dict[str, Any], path: str) -> IntuneResult:
    code = reply.get("code")
    if not isinstance(code, str) or not code:
        raise IntuneResponseError(f"{path}: the answer has no code")
    description = reply.get("errorDescription")
    return IntuneResult(code, description if isinstance(description, str) else "", activity_id)


def _revocation_request(item: Any) -> RevocationRequest | None:
    """One downloaded item; None without a requestContext (nothing to answer it with). A missing or odd
    serialNumber stays "" so that the request is answered as invalid."""
    if not isinstance(item, dict) or not isinstance(item.get("requestContext"), str) or not item["requestContext"]:
        return None

    def text(name: str) -> str | None:
        value = item.get(name)
        return value if isinstance(value, str) else None

    return RevocationRequest(item["requestContext"], text("serialNumber") or "", text("issuerName"),
                             text("caConfiguration"))


def _excerpt(response: requests.Response) -> str:
    text = (response.text or "").strip().replace("\n", " ")
    return text[:200]
