"""What the hosting platform does to app settings, known at the bottom so every layer can guard against it.

App Service and Functions leave the literal `@Microsoft.KeyVault(...)` text as a setting's value when they
cannot resolve a Key Vault reference ("If a reference isn't resolved properly, the reference string is used
instead", Microsoft: "Use Key Vault references as app settings in Azure App Service and Azure Functions").
That text is predictable, so nothing accepts it as a secret.
"""

from __future__ import annotations

KEY_VAULT_REFERENCE_PREFIX = "@microsoft.keyvault("


def is_key_vault_reference(value: str) -> bool:
    """True for the text of a Key Vault reference (`@Microsoft.KeyVault(`, any case), resolved or not."""
    return value.lstrip().lower().startswith(KEY_VAULT_REFERENCE_PREFIX)
