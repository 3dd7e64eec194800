"""step-ca webhook callbacks, so that open-source step-ca can enrol Intune devices through this app.

step-ca's SCEP provisioner calls a SCEPCHALLENGE webhook to decide whether a request's challenge is good
(answer `{"allow": true|false}`), and NOTIFYING webhooks after it signed a certificate (the body carries
`x509Certificate`) or failed to (`scepErrorCode` / `scepErrorDescription`). Every call carries
`X-Smallstep-Signature`: the hex HMAC-SHA256 of the raw body, keyed with the webhook's secret as step-ca
holds it (base64 text, decoded to bytes), and `X-Smallstep-Webhook-ID`.

Framework-free: the HTTP layer passes the raw body and the headers, and sends back (status, JSON object).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime
from typing import Any

from cryptography import x509

from scep.challenge import ChallengeValidator, EnrollmentRequest, HResult, NotificationFailed, challenge_password

logger = logging.getLogger("scep.challenge.webhook")

SIGNATURE_HEADER = "X-Smallstep-Signature"
WEBHOOK_ID_HEADER = "X-Smallstep-Webhook-ID"
MAX_BODY_BYTES = 256 * 1024
MAX_TRANSACTION_ID = 255
DEFAULT_MAX_AGE_SECONDS = 300.0

Reply = tuple[int, dict[str, Any]]


class WebhookRejected(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def decode_webhook_secret(text: str, setting: str = "SCEP_WEBHOOK_SECRET") -> bytes:
    """The HMAC key from the secret step-ca prints (standard base64), as step-ca itself decodes it."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{setting}: not the base64 secret step-ca printed for the webhook") from None
    if len(key) < 16:
        raise ValueError(f"{setting}: the secret is shorter than 16 bytes")
    return key


def sign_webhook_body(secret: bytes, body: bytes) -> str:
    """The X-Smallstep-Signature value step-ca sends for body."""
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


class WebhookHandler:
    """Answers step-ca's SCEPCHALLENGE and NOTIFYING webhooks with `validator`.

    secret: HMAC key(s) of the SCEPCHALLENGE webhook; notify_secret: of the NOTIFYING webhook (step-ca
    makes one secret per webhook; default: the same as secret). webhook_ids: when given, only these
    X-Smallstep-Webhook-ID values are served. max_age_seconds: how far the signed timestamp may be from
    now (replay protection; None to disable).
    """

    def __init__(
        self,
        secret: bytes | Sequence[bytes],
        validator: ChallengeValidator,
        *,
        notify_secret: bytes | Sequence[bytes] | None = None,
        webhook_ids: Collection[str] | None = None,
        max_age_seconds: float | None = DEFAULT_MAX_AGE_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.validator = validator
        self._challenge_keys = _keys(secret)
        self._notify_keys = _keys(notify_secret) if notify_secret is not None else self._challenge_keys
        self._webhook_ids = frozenset(webhook_ids) if webhook_ids else None
        self._max_age = max_age_seconds
        self._clock = clock

    def handle_challenge(self, body: bytes, headers: Mapping[str, str]) -> Reply:
        """SCEPCHALLENGE: 200 {"allow": bool}; 401 on a bad signature; 400 on a malformed body."""
        try:
            payload = self._authenticate(body, headers, self._challenge_keys)
            request = _enrollment_request(payload, payload.get("scepChallenge"))
        except WebhookRejected as rejection:
            logger.warning("step-ca challenge webhook rejected: %s", rejection.message)
            return rejection.status, {"allow": False, "error": rejection.message}
        try:
            verdict = self.validator.validate(request)
        except Exception:  # fail closed, and keep the traceback for the operator
            logger.exception("step-ca challenge webhook: validation raised, transaction=%s", request.transaction_id)
            return 200, {"allow": False}
        logger.info(
            "step-ca challenge webhook: transaction=%s allow=%s validator=%s reason=%s",
            request.transaction_id,
            verdict.accepted,
            getattr(verdict.validator, "name", None),
            verdict.reason,
        )
        return 200, {"allow": verdict.accepted}

    def handle_notify(self, body: bytes, headers: Mapping[str, str]) -> Reply:
        """NOTIFYING: success -> successNotification (424 when it fails), failure -> failureNotification."""
        try:
            payload = self._authenticate(body, headers, self._notify_keys)
            request = _enrollment_request(payload, None)
            request = _with_challenge_from_csr(request)
            certificate = _issued_certificate(payload)
        except WebhookRejected as rejection:
            logger.warning("step-ca notify webhook rejected: %s", rejection.message)
            return rejection.status, {"error": rejection.message}
        if certificate is None:
            return self._failure(request, payload)
        try:
            self.validator.notify_success(request, certificate)
        except NotificationFailed as failure:
            # Not a 5xx: step-ca retries those, and a success notification must not be sent twice.
            logger.warning("step-ca notify webhook: transaction=%s %s", request.transaction_id, failure)
            return 424, {"error": str(failure)}
        logger.info("step-ca notify webhook: transaction=%s success reported", request.transaction_id)
        return 200, {"ok": True}

    def _failure(self, request: EnrollmentRequest, payload: dict[str, Any]) -> Reply:
        code = payload.get("scepErrorCode")
        hresult = code & 0xFFFFFFFF if isinstance(code, int) and code & 0x80000000 else HResult.E_FAIL
        description = payload.get("scepErrorDescription")
        text = description if isinstance(description, str) and description else "step-ca could not sign"
        self.validator.notify_failure(request, int(hresult), text)
        logger.info(
            "step-ca notify webhook: transaction=%s failure reported hresult=0x%08X", request.transaction_id, hresult
        )
        return 200, {"ok": True}

    def _authenticate(self, body: bytes, headers: Mapping[str, str], keys: Sequence[bytes]) -> dict[str, Any]:
        if len(body) > MAX_BODY_BYTES:
            raise WebhookRejected(400, "body too large")
        if self._webhook_ids is not None and _header(headers, WEBHOOK_ID_HEADER) not in self._webhook_ids:
            raise WebhookRejected(401, "unknown webhook id")
        if not _signature_matches(_header(headers, SIGNATURE_HEADER), body, keys):
            raise WebhookRejected(401, "missing or invalid signature")
        try:
            payload = json.loads(body)
        except ValueError:
            raise WebhookRejected(400, "body is not JSON") from None
        if not isinstance(payload, dict):
            raise WebhookRejected(400, "body is not a JSON object")
        self._check_timestamp(payload.get("timestamp"))
        return payload

    def _check_timestamp(self, value: Any) -> None:
        if self._max_age is None:
            return
        moment = _parse_timestamp(value)
        if moment is None:
            raise WebhookRejected(400, "timestamp missing or malformed")
        if abs(self._clock() - moment) > self._max_age:
            raise WebhookRejected(401, "timestamp too far from now (replay or clock skew)")


def _keys(secret: bytes | Sequence[bytes]) -> tuple[bytes, ...]:
    keys = (secret,) if isinstance(secret, (bytes, bytearray)) else tuple(secret)
    if not keys or any(not isinstance(key, (bytes, bytearray)) or not key for key in keys):
        raise ValueError("webhook secrets must be non-empty bytes")
    return tuple(bytes(key) for key in keys)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    wanted = name.lower()
    for key, candidate in headers.items():
        if key.lower() == wanted:
            return candidate
    return None


def _signature_matches(presented: str | None, body: bytes, keys: Sequence[bytes]) -> bool:
    if not presented:
        return False
    try:
        signature = bytes.fromhex(presented.strip())
    except ValueError:
        return False
    matched = False
    for key in keys:  # no early exit: the time taken does not depend on which key matched
        matched |= hmac.compare_digest(hmac.new(key, body, hashlib.sha256).digest(), signature)
    return matched


_FRACTION = re.compile(r"(\.\d{6})\d+")


def _parse_timestamp(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    text = _FRACTION.sub(r"\1", value.strip()).replace("Z", "+00:00").replace("z", "+00:00")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment.timestamp() if moment.tzinfo is not None else None


def _enrollment_request(payload: dict[str, Any], challenge: Any) -> EnrollmentRequest:
    transaction_id = payload.get("scepTransactionID")
    if not isinstance(transaction_id, str) or not transaction_id or len(transaction_id) > MAX_TRANSACTION_ID:
        raise WebhookRejected(400, "scepTransactionID missing or malformed")
    csr_der = _raw_bytes(payload.get("x509CertificateRequest"), "x509CertificateRequest")
    try:
        csr = x509.load_der_x509_csr(csr_der)
    except ValueError:
        raise WebhookRejected(400, "x509CertificateRequest.raw is not a DER PKCS#10 request") from None
    return EnrollmentRequest(
        transaction_id=transaction_id,
        csr=csr,
        csr_der=csr_der,
        challenge=challenge if isinstance(challenge, str) and challenge else None,
        renewal=False,
    )


def _with_challenge_from_csr(request: EnrollmentRequest) -> EnrollmentRequest:
    # The notification body has no challenge; the CSR's challengePassword attribute tells a composite
    # validator which of its members accepted the request.
    challenge = challenge_password(request.csr)
    if challenge is None:
        return request
    return EnrollmentRequest(request.transaction_id, request.csr, request.csr_der, challenge, request.renewal)


def _issued_certificate(payload: dict[str, Any]) -> x509.Certificate | None:
    if payload.get("x509Certificate") is None:
        return None
    try:
        return x509.load_der_x509_certificate(_raw_bytes(payload["x509Certificate"], "x509Certificate"))
    except ValueError:
        raise WebhookRejected(400, "x509Certificate.raw is not a DER certificate") from None


def _raw_bytes(section: Any, name: str) -> bytes:
    raw = section.get("raw") if isinstance(section, dict) else None
    if not isinstance(raw, str) or not raw:
        raise WebhookRejected(400, f"{name}.raw missing (this step-ca version does not send the request; upgrade it)")
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise WebhookRejected(400, f"{name}.raw is not base64") from None


def build_webhook_handler(
    secrets: Sequence[str],
    validator: ChallengeValidator,
    *,
    webhook_ids: Collection[str] = (),
    setting: str = "SCEP_WEBHOOK_SECRET",
) -> WebhookHandler:
    """The handler for the step-ca webhook routes: secrets are the base64 texts step-ca printed (e.g. the
    SCEPCHALLENGE and the NOTIFYING webhook's), from the setting named `setting`; webhook_ids (optional) restricts
    the X-Smallstep-Webhook-ID values served. Raises ValueError naming the setting."""
    if not secrets:
        raise ValueError(f"{setting}: required for the step-ca webhooks (or SCEP_WEBHOOK_SECRET_NAME)")
    keys = [decode_webhook_secret(item, setting) for item in secrets]
    return WebhookHandler(keys, validator, webhook_ids=webhook_ids or None)
