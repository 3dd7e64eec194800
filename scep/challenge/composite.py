"""Several validators at once (SCEP_CHALLENGE_MODE=static,intune): the first that accepts owns the request.

Every member but the last must be local and free of side effects (the static challenge): they are asked
first, and asked again when a notification must be routed to the owner of a request whose verdict is not
at hand (the step-ca notification webhook). The last member (Intune) decides everything the others do not
accept, and its rejection is the one the device gets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from cryptography import x509

from scep.challenge import ChallengeValidator, EnrollmentRequest, Verdict


class CompositeValidator:
    def __init__(self, validators: Sequence[ChallengeValidator]) -> None:
        if not validators:
            raise ValueError("a composite validator needs at least one validator")
        self.validators = tuple(validators)
        self.name = ",".join(validator.name for validator in self.validators)
        self.requires_notification = any(validator.requires_notification for validator in self.validators)

    def validate(self, request: EnrollmentRequest) -> Verdict:
        *local, deciding = self.validators
        for validator in local:
            verdict = validator.validate(request)
            if verdict.accepted:
                return _owned_by(verdict, validator)
        verdict = deciding.validate(request)
        return _owned_by(verdict, deciding) if verdict.accepted else verdict

    def owner(self, request: EnrollmentRequest) -> ChallengeValidator:
        """The member that accepts (or would accept) request: the first local one that does, else the last."""
        *local, deciding = self.validators
        for validator in local:
            if validator.validate(request).accepted:
                return validator
        return deciding

    def notify_success(self, request: EnrollmentRequest, certificate: x509.Certificate) -> None:
        self.owner(request).notify_success(request, certificate)

    def notify_failure(self, request: EnrollmentRequest, hresult: int, description: str) -> None:
        try:
            owner = self.owner(request)
        except Exception:  # notify_failure never raises
            return
        owner.notify_failure(request, hresult, description)


def _owned_by(verdict: Verdict, validator: ChallengeValidator) -> Verdict:
    return verdict if verdict.validator is not None else replace(verdict, validator=validator)
