"""Settings: a wrong one fails at start with a message naming it; the reference documents every one."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from scep.config import SETTINGS, ConfigError, key_vault_clients, load_settings

REPO = Path(__file__).resolve().parents[1]
BASE = {"SCEP_CHALLENGE": "secret"}
TABLES = {"SCEP_TABLES_ENDPOINT": "https://account.table.core.windows.net"}  # Azure table names apply


@pytest.mark.parametrize(
    "overrides,named",
    [
        ({"SCEP_CERT_VALIDITY_DAYS": "a year"}, "SCEP_CERT_VALIDITY_DAYS"),
        ({"SCEP_CERT_VALIDITY_DAYS": "0"}, "SCEP_CERT_VALIDITY_DAYS"),
        ({"SCEP_ALLOW_DES": "maybe"}, "SCEP_ALLOW_DES"),
        ({"SCEP_CHALLENGE_MODE": "ldap"}, "SCEP_CHALLENGE_MODE"),
        ({"SCEP_CHALLENGE": ""}, "SCEP_CHALLENGE"),
        ({"SCEP_MAX_MESSAGE_BYTES": "10"}, "SCEP_MAX_MESSAGE_BYTES"),
        ({"SCEP_ALLOWED_EKUS": "clientAuth,teleportation"}, "SCEP_ALLOWED_EKUS"),
        ({"SCEP_STORE": "postgres"}, "SCEP_STORE"),
        ({"SCEP_STORE": "tables"}, "SCEP_TABLES_ENDPOINT"),
        ({**TABLES, "SCEP_TABLE_PREFIX": "9lives"}, "SCEP_TABLE_PREFIX"),
        ({**TABLES, "SCEP_TABLE_PREFIX": "scep-ca"}, "SCEP_TABLE_PREFIX"),
        ({**TABLES, "SCEP_TABLE_PREFIX": "x" * 52}, "SCEP_TABLE_PREFIX"),
        ({"KEY_VAULT_URL": "http://vault.example"}, "KEY_VAULT_URL"),
        ({"KEY_VAULT_REFRESH_SECONDS": "-1"}, "KEY_VAULT_REFRESH_SECONDS"),
        ({"SCEP_CHALLENGE_MODE": "intune"}, "INTUNE_TENANT_ID"),
        ({"SCEP_CHALLENGE_MODE": "intune", "INTUNE_TENANT_ID": "t", "INTUNE_AUTH": "telepathy"}, "INTUNE_AUTH"),
        ({"KEY_VAULT_VERIFY_CHALLENGE_RESOURCE": "perhaps"}, "KEY_VAULT_VERIFY_CHALLENGE_RESOURCE"),
        ({"SCEP_AZURE_CREDENTIAL": "cli"}, "SCEP_AZURE_CREDENTIAL"),
        ({"SCEP_LOG_LEVEL": "loud"}, "SCEP_LOG_LEVEL"),
        ({"INTUNE_CONNECT_TIMEOUT": "0"}, "INTUNE_CONNECT_TIMEOUT"),
        ({"INTUNE_VALIDATE_RETRIES": "6"}, "INTUNE_VALIDATE_RETRIES"),
        ({"INTUNE_ALLOW_RENEWAL_WITHOUT_CHALLENGE": "sometimes"}, "INTUNE_ALLOW_RENEWAL_WITHOUT_CHALLENGE"),
        ({"SCEP_WEBHOOK_SECRET_NAME": "hooks"}, "SCEP_WEBHOOK_SECRET_NAME"),
    ],
)
def test_wrong_setting_is_named(overrides, named):
    with pytest.raises(ConfigError, match=named) as caught:
        load_settings({**BASE, **overrides})
    assert caught.value.setting == named


def test_settings_are_typed_and_immutable():
    environment = {"SCEP_CHALLENGE": "hunter2", "SCEP_WEBHOOK_SECRET": "a, b c", "SCEP_CERT_VALIDITY_DAYS": " 90 "}
    settings = load_settings(environment)
    assert settings.webhooks.secrets == ("a", "b", "c") and settings.challenge.static == "hunter2"
    assert settings.service.options.profile.validity_days == 90
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.log_level = "debug"  # type: ignore[misc]
    assert "hunter2" not in repr(settings) and "'a'" not in repr(settings), "secrets stay out of the representation"


def test_overrides_take_precedence_and_are_checked():
    settings = load_settings({**BASE, "SCEP_DATA_DIR": "/from/env"}, overrides={"SCEP_DATA_DIR": "/from/cli"})
    assert settings.data_dir == Path("/from/cli")
    with pytest.raises(ConfigError, match="SCEP_CERT_VALIDITY_DAYS"):
        load_settings(BASE, overrides={"SCEP_CERT_VALIDITY_DAYS": "never"})
    with pytest.raises(ConfigError, match="SCEP_NO_SUCH_THING"):
        load_settings(BASE, overrides={"SCEP_NO_SUCH_THING": "x"})


@pytest.mark.parametrize("spelling,verify", [("off", False), ("0", False), ("no", False), ("on", True), ("", True)])
def test_one_flag_parser_sets_every_key_vault_client(spelling, verify):
    environment = {**BASE, "KEY_VAULT_URL": "https://vault.example", "KEY_VAULT_VERIFY_CHALLENGE_RESOURCE": spelling}
    assert key_vault_clients(load_settings(environment)).pipeline.verify_challenge_resource is verify


def test_azure_identity_settings():
    environment = {**BASE, "AZURE_AUTHORITY_HOST": "https://127.0.0.1:1", "AZURE_CLIENT_ID": "mi"}
    identity = load_settings(environment).identity
    assert (identity.authority_host, identity.client_id) == ("https://127.0.0.1:1", "mi")
    assert identity.credential == "default"


def test_administrative_commands_do_without_what_serving_needs():
    settings = load_settings({"SCEP_CHALLENGE_MODE": "intune"}, for_serving=False)
    assert settings.modes == {"intune"}
    with pytest.raises(ConfigError, match="INTUNE_TENANT_ID"):
        load_settings({"SCEP_CHALLENGE_MODE": "intune"})


def test_defaults_are_valid():
    settings = load_settings(BASE)
    assert settings.modes == {"static"} and settings.store_kind == "sqlite" and not settings.uses_key_vault


def test_only_local_keys_sqlite_and_a_static_challenge_never_wait_on_another_service():
    def waits(**environment: str) -> bool:
        return load_settings({**BASE, **environment}, for_serving=False).handling_waits_on_network

    assert not waits()
    assert waits(KEY_VAULT_URL="https://vault.example.net")
    assert waits(**TABLES)
    assert waits(SCEP_CHALLENGE_MODE="static,intune")


def test_store_auto_selects_tables_from_any_endpoint():
    for name in ("SCEP_TABLES_ENDPOINT", "AzureWebJobsStorage__tableServiceUri", "SCEP_TABLES_CONNECTION_STRING"):
        assert load_settings({**BASE, name: "https://account.table.core.windows.net"}).store_kind == "tables"


def test_reference_documents_every_setting():
    reference = (REPO / "docs" / "configuration.md").read_text()
    missing = [s.name for s in SETTINGS if f"`{s.name}`" not in reference]
    assert not missing


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_serve_refuses_to_start_on_a_bad_setting(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "SCEP_DATA_DIR": str(tmp_path), "SCEP_CERT_VALIDITY_DAYS": "forever"}
    completed = _run("import sys; from scep.tools.cli import main; sys.exit(main(['serve', '--port', '0']))", env)
    assert completed.returncode == 2
    assert "SCEP_CERT_VALIDITY_DAYS" in completed.stderr and "Traceback" not in completed.stderr


def test_function_app_fails_at_import_naming_the_setting(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "SCEP_DATA_DIR": str(tmp_path), "SCEP_CHALLENGE": "x", "SCEP_ALLOW_DES": "perhaps"}
    completed = _run("import function_app", env)
    assert completed.returncode != 0 and "SCEP_ALLOW_DES" in completed.stderr


def test_secrets_are_marked():
    secret = {s.name for s in SETTINGS if s.secret}
    assert {"SCEP_CHALLENGE", "INTUNE_CLIENT_SECRET", "SCEP_WEBHOOK_SECRET"} <= secret
