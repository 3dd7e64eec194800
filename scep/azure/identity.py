"""Microsoft Entra credentials for Key Vault, Table storage and the Intune API, built in one place.

In Azure the Functions app runs as a user-assigned managed identity (AZURE_CLIENT_ID selects it). On a
developer machine DefaultAzureCredential falls back to the Azure CLI or environment credentials.

SCEP_AZURE_CREDENTIAL chooses the credential explicitly: `default` (DefaultAzureCredential, above) or `azd`
(AzureDeveloperCliCredential: whoever `azd auth login` signed in). The post-provision hook sets `azd`, because
DefaultAzureCredential tries the Azure CLI before azd, and `az` may be signed in as someone else, or not at all.

AZURE_AUTHORITY_HOST may point at a sovereign cloud or at a local Entra emulator. MSAL validates any
authority host it does not know against login.microsoftonline.com ("instance discovery"); for a host that
is not one of Microsoft's own, that check is turned off so that nothing is sent to a real endpoint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:  # only an annotation: telemetry configuration imports this module in local mode too
    from azure.core.credentials import TokenCredential

MICROSOFT_AUTHORITY_HOSTS = frozenset(
    {
        "login.microsoftonline.com",
        "login.microsoft.com",
        "login.windows.net",
        "sts.windows.net",
        "login.microsoftonline.us",
        "login.chinacloudapi.cn",
        "login.partner.microsoftonline.cn",
        "login.microsoftonline.de",
    }
)


def _host_name(authority: str) -> str:
    parsed = urlparse(authority if "://" in authority else f"https://{authority}")
    return (parsed.hostname or "").lower()


def needs_instance_discovery_disabled(authority: str | None) -> bool:
    """True when the authority (AZURE_AUTHORITY_HOST) names a host Microsoft's instance discovery would not know."""
    return authority is not None and _host_name(authority) not in MICROSOFT_AUTHORITY_HOSTS


def authority_options(authority: str) -> dict[str, Any]:
    """azure-identity keyword arguments for an Entra authority, with instance discovery off for unknown hosts."""
    options: dict[str, Any] = {"authority": authority}
    if needs_instance_discovery_disabled(authority):
        options["disable_instance_discovery"] = True
    return options


def build_credential(
    client_id: str | None = None, *, choice: str = "default", authority_host: str | None = None
) -> TokenCredential:
    """The credential SCEP_AZURE_CREDENTIAL (choice) names. default: DefaultAzureCredential, with client_id
    (AZURE_CLIENT_ID) naming a user-assigned managed identity and authority_host (AZURE_AUTHORITY_HOST) the
    Entra authority. azd: the Azure Developer CLI's signed-in account."""
    if choice == "azd":
        from azure.identity import AzureDeveloperCliCredential

        return AzureDeveloperCliCredential()
    from azure.identity import DefaultAzureCredential

    kwargs = authority_options(authority_host) if authority_host else {}
    if client_id:
        kwargs["managed_identity_client_id"] = client_id
        kwargs["workload_identity_client_id"] = client_id
    return DefaultAzureCredential(**kwargs)
