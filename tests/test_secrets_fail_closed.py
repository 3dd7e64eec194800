"""Secrets fail closed: an unresolved Key Vault reference never becomes a setting or a challenge, the static
challenge is read from Key Vault by name and follows a rotation, and the Azure credential is the one chosen."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from scep import config
from scep.appsettings import is_key_vault_reference
from scep.azure.vault_secrets import SecretError, SecretReader
from scep.challenge import EnrollmentRequest
from scep.challenge.static import StaticValidator
from scep.config import ConfigError, load_settings
from tests.emulators.entra import EntraEmulator
from tests.emulators.keyvault import KeyVaultEmulator
from tests.serverproc import REPO_ROOT, hermetic_environment, run_cli

REFERENCE = "@Microsoft.KeyVault(SecretUri=https://x.vault.azure.net/secrets/c/)"
MANAGED_IDENTITY = str(uuid.uuid4())


# ---------------------------------------------------------------------------------------------- references


@pytest.mark.parametrize(
    "text",
    [REFERENCE, "@microsoft.keyvault(VaultName=v;SecretName=s)", "  @MICROSOFT.KEYVAULT(SecretUri=x)"],
)
def test_reference_text_is_recognised_in_any_case(text: str) -> None:
    assert is_key_vault_reference(text)


@pytest.mark.parametrize("text", ["correct horse", "Microsoft.KeyVault(", "x@Microsoft.KeyVault("])
def test_ordinary_values_are_not_references(text: str) -> None:
    assert not is_key_vault_reference(text)


@pytest.mark.parametrize(
    "name",
    ["SCEP_CHALLENGE", "INTUNE_CLIENT_SECRET", "SCEP_WEBHOOK_SECRET", "SCEP_TABLES_CONNECTION_STRING", "KEY_VAULT_URL"],
)
def test_any_setting_holding_an_unresolved_reference_is_refused(name: str) -> None:
    environment = {"SCEP_CHALLENGE": "secret", name: REFERENCE.lower()}
    with pytest.raises(ConfigError, match=name):
        load_settings(environment)


def test_serve_refuses_a_challenge_that_is_an_unresolved_reference(tmp_path: Path) -> None:
    completed = run_cli(
        {"SCEP_DATA_DIR": str(tmp_path), "SCEP_CHALLENGE": REFERENCE}, "serve", "--port", "0", timeout=60
    )
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert "SCEP_CHALLENGE" in completed.stderr and "unresolved Key Vault reference" in completed.stderr
    assert "Traceback" not in completed.stderr and "Ready" not in completed.stdout
    assert not (tmp_path / "scep.db").exists(), "nothing is created before the settings are refused"


def test_function_app_refuses_an_unresolved_reference_at_import(tmp_path: Path) -> None:
    environment = hermetic_environment({"SCEP_DATA_DIR": str(tmp_path), "SCEP_CHALLENGE": REFERENCE})
    completed = subprocess.run(
        [sys.executable, "-c", "import function_app"],
        cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=60, check=False,
    )
    assert completed.returncode != 0
    assert "SCEP_CHALLENGE is an unresolved Key Vault reference" in completed.stderr


def test_a_fixed_challenge_that_is_a_reference_is_refused_by_the_validator_too() -> None:
    with pytest.raises(ValueError, match="Key Vault reference"):
        StaticValidator(REFERENCE)


# ---------------------------------------------------------------------------------------------- static challenge


@pytest.mark.parametrize(
    "overrides,named",
    [
        ({}, "SCEP_CHALLENGE"),
        ({"SCEP_CHALLENGE": "a", "SCEP_CHALLENGE_SECRET_NAME": "b", "KEY_VAULT_URL": "https://v"}, "not both"),
        ({"SCEP_CHALLENGE_SECRET_NAME": "scep-challenge"}, "KEY_VAULT_URL"),
    ],
)
def test_static_mode_needs_exactly_one_challenge_source(overrides: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings({"SCEP_CHALLENGE_MODE": "static", **overrides})


class RotatingSource:
    """A challenge source that counts its reads (current() is the cached value, refresh() reads again)."""

    def __init__(self, value: str) -> None:
        self.stored = value
        self.cached = value
        self.refreshes = 0

    def current(self) -> str:
        return self.cached

    def refresh(self) -> str:
        self.refreshes += 1
        self.cached = self.stored
        return self.cached


def request(challenge: str | None) -> EnrollmentRequest:
    return EnrollmentRequest(transaction_id="t", csr=None, csr_der=b"", challenge=challenge, renewal=False)  # type: ignore[arg-type]


def test_a_rotated_challenge_is_accepted_at_once_and_rereads_are_rate_limited() -> None:
    now = [100.0]
    source = RotatingSource("first")
    validator = StaticValidator(source, reread_interval=30.0, clock=lambda: now[0])
    assert validator.validate(request("first")).accepted and source.refreshes == 0
    source.stored = "second"
    assert validator.validate(request("second")).accepted, "a mismatch re-reads the secret"
    assert source.refreshes == 1
    assert not validator.validate(request("first")).accepted, "the old challenge no longer works"
    for guess in ("a", "b", "c"):
        assert not validator.validate(request(guess)).accepted
    assert source.refreshes == 1, "wrong guesses within the interval do not reach the vault"
    now[0] += 31
    assert not validator.validate(request("d")).accepted
    assert source.refreshes == 2


def test_a_vault_failure_while_validating_fails_closed() -> None:
    class Unreachable(RotatingSource):
        def refresh(self) -> str:
            raise SecretError("Key Vault secret 'c' could not be read (HTTP 503)")

    validator = StaticValidator(Unreachable("first"))
    with pytest.raises(SecretError):
        validator.validate(request("guess"))  # the service turns any validator exception into a FAILURE


@pytest.fixture(scope="module")
def vault() -> Iterator[KeyVaultEmulator]:
    with EntraEmulator() as entra, KeyVaultEmulator(entra) as emulator:
        entra.register_managed_identity(MANAGED_IDENTITY, str(uuid.uuid4()))
        yield emulator


@pytest.fixture
def vault_environment(vault: KeyVaultEmulator, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    environment = {
        **vault.client_environment(),
        **vault.entra.managed_identity_environment(),
        "AZURE_CLIENT_ID": MANAGED_IDENTITY,
    }
    for name in ("AZURE_TENANT_ID", "AZURE_CLIENT_SECRET", "AZURE_FEDERATED_TOKEN_FILE", "SCEP_AZURE_CREDENTIAL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return environment


def set_secret(vault: KeyVaultEmulator, name: str, value: str) -> None:
    from azure.keyvault.secrets import SecretClient

    from scep.azure.identity import build_credential

    admin = SecretClient(vault.url, build_credential(MANAGED_IDENTITY), verify_challenge_resource=False)
    admin.set_secret(name, value)


# Every spelling of "false" turns the check off for the secret reader as for custody (one flag parser, one
# Key Vault client builder); the emulator's challenge names another host, so a reader still checking would fail.
@pytest.mark.parametrize("verify", ["false", "off", "0", "no"])
def test_static_challenge_is_read_from_key_vault_by_name_and_follows_rotation(
    vault, vault_environment, verify: str
) -> None:
    name = f"scep-challenge-{uuid.uuid4().hex[:6]}"
    set_secret(vault, name, "vault challenge one")
    settings = load_settings(
        {
            **vault_environment,
            "KEY_VAULT_VERIFY_CHALLENGE_RESOURCE": verify,
            "SCEP_CHALLENGE_MODE": "static",
            "SCEP_CHALLENGE_SECRET_NAME": name,
        }
    )
    assert config.build_key_home(settings).keys, "custody is built from the same settings"
    validator = config.build_validator(settings)
    assert isinstance(validator, StaticValidator)
    assert validator.validate(request("vault challenge one")).accepted
    set_secret(vault, name, "vault challenge two")
    assert validator.validate(request("vault challenge two")).accepted, "a mismatch re-reads the secret"
    assert not validator.validate(request("vault challenge one")).accepted
    assert not validator.validate(request(REFERENCE)).accepted


def test_a_secret_whose_value_is_a_reference_is_refused(vault, vault_environment) -> None:
    name = f"copied-reference-{uuid.uuid4().hex[:6]}"
    set_secret(vault, name, REFERENCE)
    reader = SecretReader(config.key_vault_clients(load_settings(vault_environment, for_serving=False)))
    with pytest.raises(SecretError, match="Key Vault reference"):
        reader.get(name)


def test_the_secret_cache_has_a_bounded_lifetime(vault, vault_environment) -> None:
    name = f"aging-{uuid.uuid4().hex[:6]}"
    set_secret(vault, name, "old")
    now = [0.0]
    clients = config.key_vault_clients(load_settings(vault_environment, for_serving=False))
    reader = SecretReader(clients, max_age=300, clock=lambda: now[0])
    assert reader.get(name) == "old"
    set_secret(vault, name, "new")
    now[0] = 299
    assert reader.get(name) == "old"
    now[0] = 300
    assert reader.get(name) == "new"


# ---------------------------------------------------------------------------------------------- credential choice


def test_the_azd_choice_builds_the_azure_developer_cli_credential() -> None:
    from azure.identity import AzureDeveloperCliCredential, DefaultAzureCredential

    def credential(**environment: str) -> object:
        return config.build_credential(load_settings({"SCEP_CHALLENGE": "x", **environment}))

    assert isinstance(credential(SCEP_AZURE_CREDENTIAL="azd"), AzureDeveloperCliCredential)
    assert isinstance(credential(SCEP_AZURE_CREDENTIAL="AZD", AZURE_CLIENT_ID="id"), AzureDeveloperCliCredential)
    assert isinstance(credential(SCEP_AZURE_CREDENTIAL="default"), DefaultAzureCredential)
    assert isinstance(credential(), DefaultAzureCredential)


def test_an_unknown_credential_choice_is_refused_at_start() -> None:
    with pytest.raises(ConfigError, match="SCEP_AZURE_CREDENTIAL"):
        load_settings({"SCEP_CHALLENGE": "x", "SCEP_AZURE_CREDENTIAL": "az"})
