"""`scep challenge init`: store the static challenge in Key Vault once, with a random value, and never replace it.

The post-provision hooks run it after every `azd provision`, so a static deployment has a challenge from its
first deployment on, and a redeployment keeps the one devices are configured with. The value is printed only
with --show. Key Vault has no create-if-absent for secrets: the secret is read first (404: absent), then set.
"""

from __future__ import annotations

import argparse
import secrets
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from scep import config
from scep.azure.errors import translated
from scep.azure.vault_secrets import SecretError

CHALLENGE_BYTES = 32  # 256 random bits, 43 URL-safe characters: easy to paste into an MDM profile
DEFAULT_SECRET_NAME = "scep-challenge"


@dataclass(frozen=True)
class Challenge:
    created: bool
    value: str


def new_challenge() -> str:
    return secrets.token_urlsafe(CHALLENGE_BYTES)


# What to do when the vault refuses. A name whose secret sits in soft-delete answers 409 Conflict ("... is currently
# in a deleted but recoverable state, and its name cannot be reused"; azure-sdk-for-python issue 9743).
_HINTS = {
    403: "the signed-in identity needs Key Vault Secrets Officer on the vault (or the secret is disabled)",
    409: "a deleted secret of that name is waiting in the vault's soft-delete; recover it or pick another name",
}


def ensure_challenge(client: Any, name: str) -> Challenge:
    """The secret's value if it exists; otherwise a new random value, stored first. client: a SecretClient."""
    from azure.core.exceptions import ResourceNotFoundError

    with _secret_errors(name, "could not be read"):
        try:
            return Challenge(False, client.get_secret(name).value)
        except ResourceNotFoundError:
            pass  # absent: create it below
    value = new_challenge()
    with _secret_errors(name, "could not be created"):
        client.set_secret(name, value, content_type="text/plain")
    return Challenge(True, value)


def _secret_errors(name: str, what: str) -> AbstractContextManager[None]:
    return translated(lambda detail: SecretError(f"Key Vault secret '{name}' {what} ({detail})"), _HINTS)


def add_challenge_parser(commands: Any) -> None:
    challenge = commands.add_parser("challenge", help="the static challenge kept in Key Vault")
    challenge_commands = challenge.add_subparsers(title="challenge commands")
    init = challenge_commands.add_parser("init", help="create the challenge secret with a random value if absent")
    init.add_argument("--name", help=f"secret name (default: SCEP_CHALLENGE_SECRET_NAME, else {DEFAULT_SECRET_NAME})")
    init.add_argument("--show", action="store_true", help="print the challenge (new or existing) on stdout")
    init.set_defaults(run=_init)


def _init(args: argparse.Namespace) -> int:
    settings = config.load_settings(for_serving=False)
    name = args.name or settings.challenge.static_secret_name or DEFAULT_SECRET_NAME
    vault = config.key_vault_clients(settings)  # ConfigError naming KEY_VAULT_URL when it is not set
    challenge = ensure_challenge(vault.secrets(), name)
    state = "created with a random value" if challenge.created else "already exists: left unchanged"
    print(f"static challenge secret '{name}' in {vault.vault_url}: {state}")
    if args.show:
        print(challenge.value)
    return 0
