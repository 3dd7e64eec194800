"""Secrets read from Azure Key Vault (the static challenge, the Intune client secret, the webhook secret).

Values are cached per process for at most `max_age` seconds, so a secret rotated in the vault takes effect
without restarting the app; a caller whose secret was refused re-reads it at once with refresh().
Values never reach logs.

App Service and Functions leave the literal `@Microsoft.KeyVault(...)` text as a setting's value when they
cannot resolve a Key Vault reference ("If a reference isn't resolved properly, the reference string is used
instead", Microsoft: "Use Key Vault references as app settings in Azure App Service and Azure Functions").
Such a value is predictable, so it is never accepted as a secret: not from a setting (config refuses it at
start), and not from the vault either.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from scep.appsettings import is_key_vault_reference
from scep.azure.errors import translated
from scep.keys import CustodyError, SecretNotFound

if TYPE_CHECKING:
    from scep.azure.vault_clients import KeyVaultClients

DEFAULT_MAX_AGE_SECONDS = 300.0


class SecretError(CustodyError):
    """A secret could not be read (disabled, access denied, vault unreachable, not a real value).

    A secret that does not exist (HTTP 404) raises SecretMissing, a SecretError that is also the custody
    interface's SecretNotFound."""


class SecretMissing(SecretError, SecretNotFound):
    """The secret does not exist (HTTP 404): a caller below the Azure layer (the static challenge) catches it as
    SecretNotFound and tells "absent" from vault trouble without looking at the SDK's error."""


class SecretReader:
    """Cached access to the latest version of named Key Vault secrets."""

    def __init__(
        self,
        clients: KeyVaultClients,
        *,
        max_age: float = DEFAULT_MAX_AGE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.vault_url = clients.vault_url
        self._clients = clients
        self._max_age = max_age
        self._clock = clock
        self._values: dict[str, tuple[str, float]] = {}  # name -> (value, when it was read)
        self._lock = threading.Lock()

    def get(self, name: str) -> str:
        """The secret's value: from memory while younger than max_age, otherwise read from the vault again."""
        with self._lock:
            cached = self._values.get(name)
        if cached is not None and self._clock() - cached[1] < self._max_age:
            return cached[0]
        return self.refresh(name)

    def refresh(self, name: str) -> str:
        """Read the latest version now (after the secret was refused somewhere) and cache it."""

        def unreadable(kind: type[SecretError]) -> Callable[[str], SecretError]:
            return lambda detail: kind(f"Key Vault secret '{name}' could not be read ({detail})")

        with translated(unreadable(SecretError), not_found=unreadable(SecretMissing)):
            secret = self._clients.secrets().get_secret(name)
        if not secret.value:
            raise SecretError(f"Key Vault secret '{name}' is empty")
        if is_key_vault_reference(secret.value):
            raise SecretError(f"Key Vault secret '{name}' holds the text of a Key Vault reference, not a secret")
        with self._lock:
            self._values[name] = (secret.value, self._clock())
        return secret.value
