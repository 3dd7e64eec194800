"""Microsoft Intune as the challenge validator: `settings` (what the client is told; imports nothing heavy, so
local-mode settings can be loaded without the Azure SDK), `client` (the service's HTTP API), `credential` (how
the client signs in), `validator`, `revocation`, `check` and `grant`.

This package's own import stays light: import the module you need.
"""
