"""The Key Vault and Intune backends' metrics, against the emulators, read from an in-process OpenTelemetry SDK."""

from __future__ import annotations

import hashlib

import pytest

from scep.keys import KeySpec, time_budget
from tests import otel_capture
from tests.emulators.intune import IntuneTestbed
from tests.emulators.keyvault import KeyVaultEmulator
from tests.test_intune_validator import CLIENT_AUTH, SANS, SUBJECT, issued_certificate, request_for, validator_for
from tests.test_keyvault import azure_environment, entra, init_ca_and_ra, make_home, vault  # noqa: F401 - fixtures

SIGNATURES = 8


@pytest.fixture(autouse=True)
def sdk() -> None:
    otel_capture.install()


def test_key_vault_throttling_counts_throttled_calls_and_retries(vault: KeyVaultEmulator) -> None:  # noqa: F811
    home = make_home(vault)
    init_ca_and_ra(home, KeySpec("RSA", 2048))
    ca = home.keys().ca
    before = {name: otel_capture.total(name) for name in ("scep.keyvault.throttled", "scep.keyvault.retries")}
    calls_before = otel_capture.total("scep.keyvault.duration", operation="sign")
    vault.reset_counts()
    vault.throttle_key_operations(2)
    try:
        with time_budget(30):
            for _ in range(SIGNATURES):
                ca.sign_digest(hashlib.sha256(b"throttled").digest(), "sha256")
    finally:
        vault.throttle_key_operations(0)

    throttled = vault.operations["throttled"]
    assert throttled >= SIGNATURES // 2
    assert otel_capture.total("scep.keyvault.throttled") - before["scep.keyvault.throttled"] == throttled
    assert otel_capture.total("scep.keyvault.retries") - before["scep.keyvault.retries"] == throttled
    assert otel_capture.total("scep.keyvault.duration", operation="sign") - calls_before == SIGNATURES + throttled


def test_intune_calls_are_timed_and_failures_counted_by_code(testbed: IntuneTestbed) -> None:
    def calls(call: str) -> float:
        return otel_capture.total("scep.intune.duration", call=call)

    validated, notified = calls("validateRequest"), calls("successNotification")
    failed = otel_capture.total("scep.intune.failures", code="503")
    challenge = testbed.intune.issue_challenge(SUBJECT, SANS, key_usage=["digital_signature"], eku=[CLIENT_AUTH])
    validator = validator_for(testbed)
    request = request_for(challenge, key_usage=["digital_signature"], eku=[CLIENT_AUTH])
    assert validator.validate(request).accepted
    validator.notify_success(request, issued_certificate(request))
    assert calls("validateRequest") == validated + 1
    assert calls("successNotification") == notified + 1

    testbed.intune.inject("validate", status=503)
    assert not validator.validate(request_for(challenge, key_usage=["digital_signature"], eku=[CLIENT_AUTH])).accepted
    attempts = 1 + validator.client.settings.validate_retries
    assert otel_capture.total("scep.intune.failures", code="503") == failed + attempts
    assert calls("validateRequest") == validated + 1 + attempts
