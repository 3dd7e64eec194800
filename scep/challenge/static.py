"""A static challenge password shared by every device (the embedded default, and non-Intune fleets).

The challenge is either a fixed value (SCEP_CHALLENGE) or a Key Vault secret read by name at run time
(SCEP_CHALLENGE_SECRET_NAME). A secret is cached for a bounded time by its reader; in addition, a challenge
that does not match makes the validator re-read the secret, at most once per `reread_interval` per process,
so devices given a rotated challenge succeed at once while wrong guesses cannot hammer the vault.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from cryptography import x509

from scep.appsettings import is_key_vault_reference
from scep.challenge import EnrollmentRequest, Verdict
from scep.core.protocol import FailInfo
from scep.keys import SecretNotFound

log = logging.getLogger(__name__)

REREAD_INTERVAL_SECONDS = 30.0


class ChallengeSource(Protocol):
    """Where a rotating challenge comes from: current() may be cached, refresh() reads it again now."""

    def current(self) -> str: ...

    def refresh(self) -> str: ...


class StaticValidator:
    """Accepts a request whose challengePassword equals the configured secret (constant-time), or a renewal
    signed by a certificate this CA issued (the core has checked that signer before asking)."""

    name = "static"
    requires_notification = False

    def __init__(
        self,
        secret: str | ChallengeSource,
        *,
        reread_interval: float = REREAD_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ):
        if isinstance(secret, str):
            if not secret:
                raise ValueError("the static challenge must not be empty")
            if is_key_vault_reference(secret):
                raise ValueError("the static challenge is the text of an unresolved Key Vault reference")
        self._secret = secret
        self._reread_interval = reread_interval
        self._clock = clock
        self._last_reread = float("-inf")
        self._lock = threading.Lock()

    def matches(self, challenge: str | None) -> bool:
        if challenge is None:
            return False
        if isinstance(self._secret, str):
            return _equal(challenge, self._secret)
        try:
            if _equal(challenge, self._secret.current()):
                return True
            fresh = self._reread(self._secret)
        except SecretNotFound as error:  # any other vault trouble propagates: the service answers FAILURE
            log.error("no static challenge is accepted: %s; `scep challenge init` creates it", error)
            return False
        return fresh is not None and _equal(challenge, fresh)

    def _reread(self, source: ChallengeSource) -> str | None:
        """The secret read again, or None when it was re-read less than reread_interval ago."""
        with self._lock:
            now = self._clock()
            if now - self._last_reread < self._reread_interval:
                return None
            self._last_reread = now
        return source.refresh()

    def validate(self, request: EnrollmentRequest) -> Verdict:
        if self.matches(request.challenge):
            return Verdict(True, validator=self)
        if request.challenge is None and request.renewal:
            return Verdict(True, validator=self)
        reason = "challenge password missing" if request.challenge is None else "challenge password is wrong"
        return Verdict(False, FailInfo.BAD_REQUEST, reason)

    def notify_success(self, request: EnrollmentRequest, certificate: x509.Certificate) -> None:
        """Nothing to tell: the static challenge has no service behind it."""

    def notify_failure(self, request: EnrollmentRequest, hresult: int, description: str) -> None:
        """Nothing to tell: the static challenge has no service behind it."""


def _equal(offered: str, expected: str) -> bool:
    return hmac.compare_digest(offered.encode("utf-8"), expected.encode("utf-8"))
