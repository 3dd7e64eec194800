"""Wire-level emulators of the Azure services the product talks to (Entra ID, Key Vault, Intune)."""
