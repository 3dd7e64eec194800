"""A missing secret is told apart from vault trouble by type: the Key Vault secret reader raises the custody
interface's SecretNotFound for an HTTP 404 (through the one Azure error translator), and the static challenge,
which sits below the Azure layer, catches that type instead of inspecting the SDK's error."""

from __future__ import annotations

import logging
import uuid

import pytest

from scep import config
from scep.azure.vault_secrets import SecretError, SecretReader
from scep.challenge.static import StaticValidator
from scep.config import load_settings
from scep.keys import CustodyError, SecretNotFound
from tests import test_secrets_fail_closed as shared
from tests.test_secrets_fail_closed import RotatingSource, request

vault = shared.vault
vault_environment = shared.vault_environment


def reader_for(environment: dict[str, str]) -> SecretReader:
    return SecretReader(config.key_vault_clients(load_settings(environment, for_serving=False)))


def test_the_reader_raises_secret_not_found_for_an_absent_secret(vault, vault_environment) -> None:
    reader = reader_for(vault_environment)
    name = f"absent-{uuid.uuid4().hex[:6]}"
    with pytest.raises(SecretNotFound, match=f"'{name}' could not be read \\(HTTP 404") as raised:
        reader.get(name)
    assert isinstance(raised.value, SecretError), "still a SecretError for the reader's Azure-side callers"


def test_the_reader_reports_other_vault_failures_as_errors_not_absence(vault, vault_environment) -> None:
    outsider, outsider_object = str(uuid.uuid4()), str(uuid.uuid4())
    vault.entra.register_managed_identity(outsider, outsider_object)
    vault.forbid(outsider_object)
    reader = reader_for({**vault_environment, "AZURE_CLIENT_ID": outsider})
    with pytest.raises(SecretError, match="HTTP 403") as raised:
        reader.get("anything")
    assert not isinstance(raised.value, SecretNotFound)


class Absent(RotatingSource):
    def current(self) -> str:
        raise SecretNotFound("Key Vault secret 'challenge' could not be read (HTTP 404: not found)")


class Unreachable(RotatingSource):
    def current(self) -> str:
        raise CustodyError("Key Vault secret 'challenge' could not be read (ServiceRequestError: refused)")


def test_static_refuses_without_raising_when_the_secret_is_absent(caplog: pytest.LogCaptureFixture) -> None:
    validator = StaticValidator(Absent("unused"))
    with caplog.at_level(logging.ERROR, logger="scep.challenge.static"):
        verdict = validator.validate(request("guess"))
    assert not verdict.accepted and verdict.fail_info is not None
    assert any("scep challenge init" in record.getMessage() for record in caplog.records)


def test_static_lets_other_custody_failures_propagate() -> None:
    with pytest.raises(CustodyError):  # the service turns it into a FAILURE and logs it
        StaticValidator(Unreachable("unused")).validate(request("guess"))
