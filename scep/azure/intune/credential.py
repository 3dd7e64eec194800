"""The credential the Intune client signs in with, and the client built on it.

`build_intune_credential(settings, secret_source)` makes the azure-identity credential that INTUNE_AUTH asks
for; `build_intune_client` hands it to `IntuneClient(settings, credential)`, which makes the calls.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from azure.core.credentials import AccessToken, TokenCredential
from azure.core.exceptions import ClientAuthenticationError

from scep.azure.identity import authority_options
from scep.azure.intune.client import IntuneClient
from scep.azure.intune.settings import AuthMode, IntuneConfigError, IntuneSettings
from scep.azure.vault_secrets import SecretReader

logger = logging.getLogger("scep.azure.intune")


# Secrets that can change without a restart


@dataclass
class SecretSource:
    """Where a client secret comes from: `current()` is the value to use, `refresh()` re-reads it after
    an authentication failure (so a rotated secret is picked up without a restart)."""

    current: Callable[[], str]
    refresh: Callable[[], str]

    @classmethod
    def fixed(cls, value: str) -> SecretSource:
        return cls(lambda: value, lambda: value)

    @classmethod
    def from_key_vault(cls, reader: SecretReader, name: str) -> SecretSource:
        """A Key Vault secret, read once and again on refresh()."""
        return cls(lambda: reader.get(name), lambda: reader.refresh(name))


class RotatingSecretCredential:
    """ClientSecretCredential that re-reads its secret once when Entra ID refuses it, then tries again."""

    REFRESH_INTERVAL_SECONDS = 30.0

    def __init__(self, tenant_id: str, client_id: str, source: SecretSource, **options: Any) -> None:
        self._tenant_id = tenant_id
        self._client_id = client_id
        self._source = source
        self._options = options
        self._lock = threading.Lock()
        self._secret: str | None = None
        self._inner: Any = None  # built on first use, so building the app reads no secret yet
        self._last_refresh = float("-inf")

    def _make(self, secret: str) -> Any:
        from azure.identity import ClientSecretCredential

        return ClientSecretCredential(self._tenant_id, self._client_id, secret, **self._options)

    def _current(self) -> Any:
        with self._lock:
            if self._inner is None:
                self._secret = self._source.current()
                self._inner = self._make(self._secret)
            return self._inner

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        try:
            return self._current().get_token(*scopes, **kwargs)
        except ClientAuthenticationError:
            if not self._reload():
                raise
        return self._current().get_token(*scopes, **kwargs)

    def get_token_info(self, *scopes: str, options: Any = None) -> Any:
        try:
            return self._current().get_token_info(*scopes, options=options)
        except ClientAuthenticationError:
            if not self._reload():
                raise
        return self._current().get_token_info(*scopes, options=options)

    def _reload(self) -> bool:
        """Read the secret again; True when it changed (and the inner credential was replaced)."""
        with self._lock:
            now = time.monotonic()
            if now - self._last_refresh < self.REFRESH_INTERVAL_SECONDS:
                return False
            self._last_refresh = now
            try:
                fresh = self._source.refresh()
            except Exception as error:  # the original authentication error is the one to report
                logger.warning("Could not read the Intune client secret again: %s", type(error).__name__)
                return False
            if fresh == self._secret:
                return False
            old, self._secret, self._inner = self._inner, fresh, self._make(fresh)
        if old is not None:
            old.close()
        return True

    def close(self) -> None:
        with self._lock:
            inner, self._inner = self._inner, None
        if inner is not None:
            inner.close()


def build_intune_credential(
    settings: IntuneSettings,
    secret_source: SecretSource | None = None,
    *,
    certificate_password: str | None = None,
) -> TokenCredential:
    """The azure-identity credential for settings.auth.

    secret: ClientSecretCredential fed by secret_source (required); certificate: CertificateCredential from
    settings.client_certificate_path (PEM or PKCS#12 holding certificate and key, certificate_password if the
    file is encrypted); managed-identity: ManagedIdentityCredential (user-assigned when
    settings.managed_identity_client_id is set); federated: ClientAssertionCredential of the app registration
    whose assertion is a managed-identity token for the token-exchange audience.
    """
    from azure.identity import CertificateCredential, ClientAssertionCredential, ManagedIdentityCredential

    authority = authority_options(settings.authority_host)
    if settings.auth is AuthMode.SECRET:
        if secret_source is None:
            raise IntuneConfigError("INTUNE_CLIENT_SECRET", "INTUNE_AUTH=secret needs a client secret")
        return RotatingSecretCredential(settings.tenant_id, _client_id(settings), secret_source, **authority)
    if settings.auth is AuthMode.CERTIFICATE:
        if not settings.client_certificate_path:
            raise IntuneConfigError("INTUNE_CLIENT_CERTIFICATE_PATH", "required with INTUNE_AUTH=certificate")
        return CertificateCredential(
            settings.tenant_id,
            _client_id(settings),
            certificate_path=settings.client_certificate_path,
            password=certificate_password,
            **authority,
        )
    managed_identity = ManagedIdentityCredential(client_id=settings.managed_identity_client_id)
    if settings.auth is AuthMode.MANAGED_IDENTITY:
        return managed_identity
    exchange_scope = settings.token_exchange_audience.rstrip("/") + "/.default"
    return ClientAssertionCredential(
        settings.tenant_id,
        _client_id(settings),
        lambda: managed_identity.get_token(exchange_scope).token,
        authority=settings.authority_host,
    )


def _client_id(settings: IntuneSettings) -> str:
    if not settings.client_id:
        raise IntuneConfigError("INTUNE_CLIENT_ID", f"required with INTUNE_AUTH={settings.auth.value}")
    return settings.client_id


def build_intune_client(
    settings: IntuneSettings, secret_source: SecretSource | None = None, *, certificate_password: str | None = None
) -> IntuneClient:
    """An IntuneClient signing in as settings.auth says (see build_intune_credential)."""
    credential = build_intune_credential(settings, secret_source, certificate_password=certificate_password)
    return IntuneClient(settings, credential)
