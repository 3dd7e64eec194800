"""What the Intune client is told: its settings and how it signs in, without the client's HTTP and Azure SDK
dependencies, so that loading settings in local mode costs no memory for them (docs/serving.md, "Memory")."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from scep import PRODUCT, __version__

INTUNE_APP_ID = "0000000a-0000-0000-c000-000000000000"  # the Intune service principal Graph lists endpoints of
DEFAULT_AUTHORITY_HOST = "https://login.microsoftonline.com"
DEFAULT_GRAPH_URL = "https://graph.microsoft.com"
DEFAULT_RESOURCE_URL = "https://api.manage.microsoft.com/"
DEFAULT_TOKEN_EXCHANGE_AUDIENCE = "api://AzureADTokenExchange"


class AuthMode(str, Enum):
    SECRET = "secret"
    CERTIFICATE = "certificate"
    MANAGED_IDENTITY = "managed-identity"
    FEDERATED = "federated"


class IntuneConfigError(ValueError):
    """A setting is missing or wrong; `setting` names it."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting


@dataclass(frozen=True)
class IntuneSettings:
    """Everything the Intune client needs to know, none of it secret."""

    tenant_id: str
    client_id: str | None = None
    auth: AuthMode = AuthMode.SECRET
    authority_host: str = DEFAULT_AUTHORITY_HOST
    graph_url: str = DEFAULT_GRAPH_URL
    resource_url: str = DEFAULT_RESOURCE_URL
    client_certificate_path: str | None = None
    managed_identity_client_id: str | None = None  # a user-assigned identity; None = system-assigned
    token_exchange_audience: str = DEFAULT_TOKEN_EXCHANGE_AUDIENCE
    connect_timeout: float = 5.0
    read_timeout: float = 15.0
    validate_retries: int = 2
    user_agent: str = f"{PRODUCT}/{__version__}"

    @property
    def intune_scope(self) -> str:
        # Microsoft's libraries append "/.default" to the resource URL as is: with the default resource
        # (trailing slash) the scope has a double slash, which is what Entra expects for this API.
        return self.resource_url + "/.default"

    @property
    def graph_scope(self) -> str:
        return self.graph_url.rstrip("/") + "/.default"

    @property
    def discovery_url(self) -> str:
        return f"{self.graph_url.rstrip('/')}/v1.0/servicePrincipals/appId={INTUNE_APP_ID}/endpoints"
