"""Secrets read from Azure Key Vault (for example the Intune application's client secret).

Values are cached per process. A caller whose credential was refused re-reads the secret with refresh(),
so a secret rotated in the vault takes effect without restarting the app. Values never reach logs.
"""

from __future__ import annotations

import threading
from typing import Any

from .keys import CustodyError


class SecretError(CustodyError):
    """A secret could not be read (missing, disabled, access denied, vault unreachable)."""


class SecretReader:
    """Cached access to the latest version of named Key Vault secrets."""

    def __init__(
        self,
        vault_url: str,
        credential: Any = None,
        verify_challenge_resource: bool = True,
        *,
        retry_total: int = 3,
        retry_backoff_factor: float = 0.5,
        retry_backoff_max: float = 4.0,
    ) -> None:
        if not vault_url.lower().startswith("https://"):
            raise ValueError("KEY_VAULT_URL must be an https:// URL")
        if credential is None:
            from .keys.azure_credentials import build_credential

            credential = build_credential()
        self.vault_url = vault_url.rstrip("/")
        self._credential = credential
        self._client_kwargs = {
            "verify_challenge_resource": verify_challenge_resource,
            "retry_total": retry_total,
            "retry_backoff_factor": retry_backoff_factor,
            "retry_backoff_max": retry_backoff_max,
        }
        self._client: Any = None
        self._values: dict[str, str] = {}
        self._lock = threading.Lock()

    def _secrets(self) -> Any:
        if self._client is None:
            from azure.keyvault.secrets import SecretClient

            self._client = SecretClient(self.vault_url, self._credential, **self._client_kwargs)
        return self._client

    def get(self, name: str) -> str:
        """The secret's value, read from the vault once and then served from memory."""
        with self._lock:
            cached = self._values.get(name)
        if cached is not None:
            return cached
        return self.refresh(name)

    def refresh(self, name: str) -> str:
        """Read the latest version again (after the secret was refused somewhere) and cache it."""
        from azure.core.exceptions import AzureError

        try:
            secret = self._secrets().get_secret(name)
        except (AzureError, ValueError) as error:  # ValueError: the SDK rejected the vault's challenge
            status = getattr(error, "status_code", None)
            detail = f"HTTP {status}" if status else type(error).__name__
            raise SecretError(f"Key Vault secret '{name}' could not be read ({detail})") from error
        if not secret.value:
            raise SecretError(f"Key Vault secret '{name}' is empty")
        with self._lock:
            self._values[name] = secret.value
        return secret.value
