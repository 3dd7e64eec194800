"""Entra ID and Key Vault emulators with a managed identity, and the settings that point the product at them."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from cryptography import x509

from scep.core.issuer import ca_id
from tests.emulators.entra import EntraEmulator
from tests.emulators.keyvault import KeyVaultEmulator
from tests.serverproc import ScepServer, run_cli


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


def wait_for_first_crl(server: ScepServer, ca: x509.Certificate) -> None:
    """`scep serve` publishes its first CRL in the background at start (one CA signature): wait until it is
    served, so that key operations counted afterwards are the enrollments' own."""
    url = f"{server.url}/api/crl/{ca_id(ca)}.crl"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except urllib.error.HTTPError as error:
            if error.code != 404:
                raise
        time.sleep(0.2)
    raise AssertionError(f"no CRL at {url} within 30 s\n" + server.output_tail())
