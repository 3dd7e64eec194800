"""A static challenge password shared by every device (the embedded default, and non-Intune fleets)."""

from __future__ import annotations

import hmac

from cryptography import x509

from scep.challenge import EnrollmentRequest, Verdict
from scep.protocol import FailInfo


class StaticValidator:
    """Accepts a request whose challengePassword equals the configured secret (constant-time), or a renewal
    signed by a certificate this CA issued (the core has checked that signer before asking)."""

    name = "static"
    requires_notification = False

    def __init__(self, secret: str):
        if not secret:
            raise ValueError("the static challenge must not be empty")
        self._secret = secret.encode("utf-8")

    def matches(self, challenge: str | None) -> bool:
        if challenge is None:
            return False
        return hmac.compare_digest(challenge.encode("utf-8"), self._secret)

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
