"""The one builder of Azure Key Vault SDK clients: every client of a vault (certificates, keys, secrets,
cryptography) gets the same credential and the same pipeline settings, so KEY_VAULT_VERIFY_CHALLENGE_RESOURCE,
the retries and the timeouts apply to custody and to secrets alike, over one connection pool.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class VaultPipeline:
    """azure-core pipeline settings of every Key Vault client.

    verify_challenge_resource: the SDK checks that the vault's authentication challenge names a resource on the
    vault's own domain; only emulators need it off (KEY_VAULT_VERIFY_CHALLENGE_RESOURCE=false).
    """

    verify_challenge_resource: bool = True
    retry_total: int = 3
    retry_backoff_factor: float = 0.5
    retry_backoff_max: float = 4.0
    connection_timeout: float = 10.0
    read_timeout: float = 30.0


class KeyVaultClients:
    """Builds, once each, the SDK clients of one vault; cryptography clients per key."""

    def __init__(self, vault_url: str, credential: Any, pipeline: VaultPipeline | None = None) -> None:
        if not vault_url.lower().startswith("https://"):
            raise ValueError("KEY_VAULT_URL must be an https:// URL")
        self.vault_url = vault_url.rstrip("/")
        self.credential = credential
        self.pipeline = pipeline or VaultPipeline()
        self._options: dict[str, Any] | None = None
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()

    @property
    def timeouts(self) -> tuple[float, float]:
        return self.pipeline.connection_timeout, self.pipeline.read_timeout

    def _client_options(self) -> dict[str, Any]:
        if self._options is None:
            import requests
            from azure.core.pipeline.transport import RequestsTransport

            # One connection pool for every client: the warm path reuses TLS connections to the vault.
            session = requests.Session()
            session.mount("https://", requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=32))
            pipeline = self.pipeline
            self._options = {
                "verify_challenge_resource": pipeline.verify_challenge_resource,
                "retry_total": pipeline.retry_total,
                "retry_backoff_factor": pipeline.retry_backoff_factor,
                "retry_backoff_max": pipeline.retry_backoff_max,
                "transport": RequestsTransport(
                    session=session,
                    session_owner=False,
                    connection_timeout=pipeline.connection_timeout,
                    read_timeout=pipeline.read_timeout,
                ),
            }
        return self._options

    def _cached(self, kind: str, make: Any) -> Any:
        with self._lock:
            if kind not in self._clients:
                self._clients[kind] = make(self.vault_url, self.credential, **self._client_options())
            return self._clients[kind]

    def certificates(self) -> Any:
        from azure.keyvault.certificates import CertificateClient

        return self._cached("certificates", CertificateClient)

    def keys(self) -> Any:
        from azure.keyvault.keys import KeyClient

        return self._cached("keys", KeyClient)

    def secrets(self) -> Any:
        from azure.keyvault.secrets import SecretClient

        return self._cached("secrets", SecretClient)

    def cryptography(self, key: Any, *, retry_total: int | None = None) -> Any:
        """A CryptographyClient for key (a KeyVaultKey or key id); retry_total overrides the pipeline's."""
        from azure.keyvault.keys.crypto import CryptographyClient

        with self._lock:
            options = self._client_options()
        if retry_total is not None:
            options = {**options, "retry_total": retry_total}
        return CryptographyClient(key, self.credential, **options)
