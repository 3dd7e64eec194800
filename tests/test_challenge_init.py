"""The static challenge survives redeployment: `scep challenge init` stores a random challenge in Key Vault only
when none exists (and prints it only when asked), and a static validator whose secret is missing refuses every
challenge with one clear log line instead of failing open or raising."""

from __future__ import annotations

import logging
import uuid

import pytest

from scep import config
from scep.challenge import EnrollmentRequest, Verdict
from scep.challenge.composite import CompositeValidator
from scep.challenge.static import StaticValidator
from scep.config import load_settings
from scep.tools.challenge import CHALLENGE_BYTES, new_challenge
from tests import test_secrets_fail_closed as shared
from tests.emulators.keyvault import KeyVaultEmulator
from tests.serverproc import run_cli
from tests.test_secrets_fail_closed import MANAGED_IDENTITY, request

# The emulated vault and the environment that points the app at it, shared with the secrets tests.
vault = shared.vault
vault_environment = shared.vault_environment



def stored(vault: KeyVaultEmulator, name: str) -> list[str]:
    from azure.core.exceptions import ResourceNotFoundError
    from azure.keyvault.secrets import SecretClient

    from scep.azure.identity import build_credential

    client = SecretClient(vault.url, build_credential(MANAGED_IDENTITY), verify_challenge_resource=False)
    try:
        return [client.get_secret(name).value]
    except ResourceNotFoundError:
        return []


def test_a_new_challenge_is_long_and_random() -> None:
    first, second = new_challenge(), new_challenge()
    assert first != second
    assert len(first) == 43 and CHALLENGE_BYTES == 32  # 256 bits, URL-safe base64 without padding


def test_init_creates_the_secret_once_and_never_prints_it_unasked(vault, vault_environment) -> None:
    name = f"scep-challenge-{uuid.uuid4().hex[:6]}"
    created = run_cli({**vault_environment, "SCEP_CHALLENGE_SECRET_NAME": name}, "challenge", "init")
    assert created.returncode == 0, created.stderr
    assert "created with a random value" in created.stdout
    (value,) = stored(vault, name)
    assert value not in created.stdout + created.stderr

    again = run_cli({**vault_environment, "SCEP_CHALLENGE_SECRET_NAME": name}, "challenge", "init", "--show")
    assert again.returncode == 0, again.stderr
    assert "already exists: left unchanged" in again.stdout
    assert stored(vault, name) == [value], "a second run keeps the challenge devices are configured with"
    assert again.stdout.splitlines()[-1] == value, "--show prints the stored challenge"


def test_init_takes_the_name_from_the_command_line(vault, vault_environment) -> None:
    name = f"corp-challenge-{uuid.uuid4().hex[:6]}"
    completed = run_cli(vault_environment, "challenge", "init", "--name", name, "--show")
    assert completed.returncode == 0, completed.stderr
    assert stored(vault, name) == [completed.stdout.splitlines()[-1]]


def test_init_without_a_vault_names_the_setting() -> None:
    completed = run_cli({"KEY_VAULT_URL": ""}, "challenge", "init")
    assert completed.returncode == 2
    assert "KEY_VAULT_URL" in completed.stderr and "Traceback" not in completed.stderr


def test_init_refused_by_the_vault_says_which_role_is_missing(vault, vault_environment) -> None:
    outsider, outsider_object = str(uuid.uuid4()), str(uuid.uuid4())
    vault.entra.register_managed_identity(outsider, outsider_object)
    vault.forbid(outsider_object)
    name = f"scep-challenge-{uuid.uuid4().hex[:6]}"
    completed = run_cli({**vault_environment, "AZURE_CLIENT_ID": outsider}, "challenge", "init", "--name", name)
    assert completed.returncode == 1
    assert "HTTP 403" in completed.stderr and "Key Vault Secrets Officer" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert stored(vault, name) == []


def static_validator(environment: dict[str, str], name: str) -> StaticValidator:
    settings = load_settings({**environment, "SCEP_CHALLENGE_MODE": "static", "SCEP_CHALLENGE_SECRET_NAME": name})
    validator = config.build_validator(settings)
    assert isinstance(validator, StaticValidator)
    return validator


def test_a_missing_challenge_secret_refuses_every_challenge_with_one_clear_line(
    vault, vault_environment, caplog: pytest.LogCaptureFixture
) -> None:
    name = f"never-created-{uuid.uuid4().hex[:6]}"
    validator = static_validator(vault_environment, name)
    with caplog.at_level(logging.ERROR, logger="scep.challenge.static"):
        for guess in ("", "guess", "@Microsoft.KeyVault(SecretUri=x)"):
            verdict = validator.validate(request(guess))
            assert not verdict.accepted and verdict.fail_info is not None
    lines = [record.getMessage() for record in caplog.records if record.name == "scep.challenge.static"]
    assert lines and all(name in line and "scep challenge init" in line for line in lines)
    assert all(record.exc_info is None for record in caplog.records), "a clear line, not a traceback"


def test_a_missing_static_secret_does_not_block_the_other_validator(vault, vault_environment) -> None:
    class AcceptsAll:
        name = "intune"
        requires_notification = False

        def validate(self, request: EnrollmentRequest):
            return Verdict(True, validator=self)

    static = static_validator(vault_environment, f"never-created-{uuid.uuid4().hex[:6]}")
    verdict = CompositeValidator([static, AcceptsAll()]).validate(request("from intune"))  # type: ignore[list-item]
    assert verdict.accepted and verdict.validator.name == "intune"


def test_once_init_creates_the_secret_the_validator_accepts_it(vault, vault_environment) -> None:
    name = f"scep-challenge-{uuid.uuid4().hex[:6]}"
    validator = static_validator(vault_environment, name)
    assert not validator.validate(request("anything")).accepted
    completed = run_cli(vault_environment, "challenge", "init", "--name", name, "--show")
    challenge = completed.stdout.splitlines()[-1]
    assert validator.validate(request(challenge)).accepted
    assert not validator.validate(request("anything")).accepted
