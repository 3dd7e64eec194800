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

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

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


def authority_host(environ: Mapping[str, str] | None = None) -> str | None:
    """The configured AZURE_AUTHORITY_HOST (a URL or a bare host name), or None for the public cloud."""
    value = (environ if environ is not None else os.environ).get("AZURE_AUTHORITY_HOST", "").strip()
    return value or None


def _host_name(authority: str) -> str:
    parsed = urlparse(authority if "://" in authority else f"https://{authority}")
    return (parsed.hostname or "").lower()


def needs_instance_discovery_disabled(environ: Mapping[str, str] | None = None) -> bool:
    """True when AZURE_AUTHORITY_HOST names a host Microsoft's instance discovery would not know."""
    authority = authority_host(environ)
    return authority is not None and _host_name(authority) not in MICROSOFT_AUTHORITY_HOSTS


def authority_options(authority: str) -> dict[str, Any]:
    """azure-identity keyword arguments for an Entra authority, with instance discovery off for unknown hosts."""
    options: dict[str, Any] = {"authority": authority}
    if _host_name(authority) not in MICROSOFT_AUTHORITY_HOSTS:
        options["disable_instance_discovery"] = True
    return options


def _authority_kwargs(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    authority = authority_host(environ)
    return authority_options(authority) if authority is not None else {}


CREDENTIAL_SETTING = "SCEP_AZURE_CREDENTIAL"
CREDENTIAL_CHOICES = ("default", "azd")


def credential_choice(environ: Mapping[str, str] | None = None) -> str:
    """The SCEP_AZURE_CREDENTIAL choice (default when unset); ValueError naming the setting when unknown."""
    value = (environ if environ is not None else os.environ).get(CREDENTIAL_SETTING, "").strip().lower() or "default"
    if value not in CREDENTIAL_CHOICES:
        raise ValueError(f"{CREDENTIAL_SETTING} must be one of {', '.join(CREDENTIAL_CHOICES)}, not {value!r}")
    return value


def build_credential(client_id: str | None = None) -> TokenCredential:
    """The credential SCEP_AZURE_CREDENTIAL chooses. default: DefaultAzureCredential, with client_id (or
    AZURE_CLIENT_ID) naming a user-assigned managed identity. azd: the Azure Developer CLI's signed-in account."""
    if credential_choice() == "azd":
        from azure.identity import AzureDeveloperCliCredential

        return AzureDeveloperCliCredential()
    from azure.identity import DefaultAzureCredential

    chosen_client_id = client_id or os.environ.get("AZURE_CLIENT_ID") or None
    kwargs = _authority_kwargs()
    if chosen_client_id:
        kwargs["managed_identity_client_id"] = chosen_client_id
        kwargs["workload_identity_client_id"] = chosen_client_id
    return DefaultAzureCredential(**kwargs)
