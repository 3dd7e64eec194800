"""Everything Azure: identity, Key Vault custody and secrets, Table Storage, the Intune client."""
