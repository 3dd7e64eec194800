"""Entra ID and Key Vault emulators with a managed identity, and the settings that point the product at them."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from tests.emulators.entra import EntraEmulator
from tests.emulators.keyvault import KeyVaultEmulator
from tests.serverproc import run_cli


@contextmanager
def emulated_vault(**settings: str) -> Iterator[tuple[KeyVaultEmulator, dict[str, str]]]:
    """The running vault and the environment for `scep` commands: the vault's URL and CA bundle, a managed identity
    (AZURE_CLIENT_ID) the vault accepts, and settings on top."""
    with EntraEmulator() as entra, KeyVaultEmulator(entra) as vault:
        client_id = str(uuid.uuid4())
        entra.register_managed_identity(client_id, str(uuid.uuid4()))
        yield vault, {
            **vault.client_environment(),
            **entra.managed_identity_environment(),
            "AZURE_CLIENT_ID": client_id,
            **settings,
        }


def unique_certificate_names() -> dict[str, str]:
    """CA and RA certificate names of their own, so tests sharing an emulator never meet each other's keys."""
    unique = uuid.uuid4().hex[:8]
    return {"SCEP_CA_CERT_NAME": f"ca-{unique}", "SCEP_RA_CERT_NAME": f"ra-{unique}"}


def init_ca(environment: dict[str, str], subject: str) -> None:
    created = run_cli(environment, "ca", "init", "--subject", subject)
    assert created.returncode == 0, created.stdout + created.stderr
