"""The composition root: reads settings, fails with a message naming the wrong setting, builds the service once.

Every setting the product reads is listed in SETTINGS (the configuration reference in docs/configuration.md and
the infrastructure checks are held to this list).
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.x509 import ObjectIdentifier

from scep.challenge import ChallengeValidator
from scep.challenge.static import StaticValidator
from scep.core.ca import CaOptions, init_root
from scep.core.issuer import DEFAULT_ALLOWED_EKUS, DEFAULT_EKU_NAMES, DEFAULT_MIN_RSA_BITS, EKU_NAMES, Profile
from scep.core.service import ScepService, ServiceOptions
from scep.http.web import DEFAULT_MAX_MESSAGE_BYTES
from scep.keys import KeyHome, Slot
from scep.logs import LEVELS
from scep.store import Store

log = logging.getLogger("scep.config")


class ConfigError(Exception):
    """A setting is missing or wrong; the message names it and says what is expected."""


@dataclass(frozen=True)
class Setting:
    name: str
    default: str
    description: str
    azure: bool = False  # provisioned by infra/ for the Azure deployment
    secret: bool = False


SETTINGS: tuple[Setting, ...] = (
    Setting("SCEP_DATA_DIR", "./.scep", "Local CA/RA PEM files and the SQLite store (embedded default)."),
    Setting("SCEP_CHALLENGE", "", "Static challenge password; `scep serve` generates one when empty.", secret=True),
    Setting("SCEP_CHALLENGE_SECRET_NAME", "", "Key Vault secret holding the static challenge.", azure=True),
    Setting("SCEP_CHALLENGE_MODE", "static", "static, intune, or static,intune (both at once).", azure=True),
    Setting("SCEP_CERT_VALIDITY_DAYS", "365", "Validity of issued certificates in days (1-3650).", azure=True),
    Setting("SCEP_MIN_RSA_KEY_BITS", str(DEFAULT_MIN_RSA_BITS), "Smallest RSA device key issued (1024-4096)."),
    Setting("SCEP_ALLOW_DES", "false", "Legacy: accept single DES and MD5 (micromdm scepclient)."),
    Setting("SCEP_MAX_MESSAGE_BYTES", str(DEFAULT_MAX_MESSAGE_BYTES), "Largest PKIOperation message accepted."),
    Setting("SCEP_ALLOWED_EKUS", ",".join(DEFAULT_EKU_NAMES), "Extended key usages a CSR may ask for (names or OIDs)."),
    Setting("SCEP_STORE", "auto", "sqlite, tables, or auto (tables when a table endpoint is set).", azure=True),
    Setting("SCEP_TABLES_ENDPOINT", "", "Table service URI for identity-based access.", azure=True),
    Setting("AzureWebJobsStorage__tableServiceUri", "", "Functions' identity-based storage convention.", azure=True),
    Setting("SCEP_TABLES_CONNECTION_STRING", "", "Table connection string (Azurite).", secret=True),
    Setting("SCEP_TABLE_PREFIX", "scep", "Prefix of the inventory tables.", azure=True),
    Setting("KEY_VAULT_URL", "", "Azure Key Vault URL: CA and RA keys live there when set.", azure=True),
    Setting("SCEP_CA_CERT_NAME", "scep-ca", "Key Vault certificate holding the CA.", azure=True),
    Setting("SCEP_RA_CERT_NAME", "scep-ra", "Key Vault certificate holding the RA.", azure=True),
    Setting("KEY_VAULT_REFRESH_SECONDS", "300", "How often a warm worker looks for new CA/RA versions."),
    Setting("SCEP_KEY_BUDGET_SECONDS", "20", "Seconds for the key operations of one PKIOperation, retries included."),
    Setting(
        "KEY_VAULT_VERIFY_CHALLENGE_RESOURCE", "true", "Only for emulators: false accepts a challenge for another host."
    ),
    Setting("AZURE_CLIENT_ID", "", "Client ID of the user-assigned managed identity.", azure=True),
    Setting("SCEP_AZURE_CREDENTIAL", "default", "Azure credential: default (DefaultAzureCredential) or azd."),
    Setting("INTUNE_TENANT_ID", "", "Entra tenant of the Intune service.", azure=True),
    Setting("INTUNE_CLIENT_ID", "", "App registration used for Intune (empty with managed-identity).", azure=True),
    Setting("INTUNE_AUTH", "secret", "secret, certificate, managed-identity or federated.", azure=True),
    Setting("INTUNE_CLIENT_SECRET", "", "Client secret of the Intune app registration.", secret=True),
    Setting("INTUNE_CLIENT_SECRET_NAME", "", "Key Vault secret holding the Intune client secret.", azure=True),
    Setting("INTUNE_CLIENT_CERTIFICATE_PATH", "", "PEM with the app registration's certificate and key."),
    Setting("INTUNE_AUTHORITY_HOST", "https://login.microsoftonline.com", "Entra authority (sovereign clouds)."),
    Setting("INTUNE_GRAPH_URL", "https://graph.microsoft.com", "Microsoft Graph endpoint (service discovery)."),
    Setting("INTUNE_RESOURCE_URL", "https://api.manage.microsoft.com/", "Intune API resource."),
    Setting("INTUNE_CLIENT_CERTIFICATE_PASSWORD", "", "Password of that PEM, if any.", secret=True),
    Setting("INTUNE_TOKEN_EXCHANGE_AUDIENCE", "api://AzureADTokenExchange", "Audience of federated assertions."),
    Setting("INTUNE_TIMEOUT", "15", "Seconds to wait for an Intune answer."),
    Setting("INTUNE_CONNECT_TIMEOUT", "5", "Seconds to wait for a connection to Intune."),
    Setting("INTUNE_VALIDATE_RETRIES", "2", "Extra tries of validateRequest after connection errors and 5xx."),
    Setting("INTUNE_ALLOW_RENEWAL_WITHOUT_CHALLENGE", "false", "Intune mode: accept RenewalReq without challenge."),
    Setting("INTUNE_CA_CONFIGURATION", "", "caConfiguration reported to Intune (default: the product name)."),
    Setting("INTUNE_CERTIFICATE_AUTHORITY", "", "certificateAuthority reported to Intune (default: the CA subject)."),
    Setting("SCEP_WEBHOOK_SECRET", "", "Shared secret of the step-ca validation webhooks.", secret=True),
    Setting("SCEP_WEBHOOK_SECRET_NAME", "", "Key Vault secret holding the webhook secret.", azure=True),
    Setting("SCEP_WEBHOOK_IDS", "", "Optional: the X-Smallstep-Webhook-ID values served."),
    Setting("SCEP_LOG_LEVEL", "", "debug, info, warning or error (empty: warning for `scep`, the host's in Azure)."),
    Setting("SCEP_RA_RENEW_DAYS", "30", "Renew the RA automatically when it expires within this many days (1-365)."),
)
_DEFAULTS = {s.name: s.default for s in SETTINGS}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
MODES = {"static", "intune"}
MIN_RSA_KEY_BITS_RANGE = (1024, 4096)  # Intune's SCEP profiles offer 1024, 2048 and 4096 bits


@dataclass(frozen=True)
class Settings:
    values: Mapping[str, str]

    def get(self, name: str) -> str:
        value = self.values.get(name)
        return value.strip() if value is not None and value.strip() else _DEFAULTS[name]

    def flag(self, name: str) -> bool:
        value = self.get(name).lower()
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        raise ConfigError(f"{name} must be true or false, not {value!r}")

    def integer(self, name: str, low: int, high: int) -> int:
        value = self.get(name)
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"{name} must be a whole number, not {value!r}") from None
        if not low <= number <= high:
            raise ConfigError(f"{name} must be between {low} and {high}, not {number}")
        return number

    @property
    def modes(self) -> set[str]:
        modes = {m.strip().lower() for m in self.get("SCEP_CHALLENGE_MODE").split(",") if m.strip()}
        if not modes or not modes <= MODES:
            raise ConfigError("SCEP_CHALLENGE_MODE must be static, intune or static,intune")
        return modes

    @property
    def data_dir(self) -> Path:
        return Path(self.get("SCEP_DATA_DIR")).expanduser()

    @property
    def uses_key_vault(self) -> bool:
        return bool(self.get("KEY_VAULT_URL"))

    @property
    def store_kind(self) -> str:
        kind = self.get("SCEP_STORE").lower()
        if kind == "auto":
            sources = ("SCEP_TABLES_ENDPOINT", "SCEP_TABLES_CONNECTION_STRING", "AzureWebJobsStorage__tableServiceUri")
            tables = any(self.get(n) for n in sources)
            return "tables" if tables else "sqlite"
        if kind not in ("sqlite", "tables"):
            raise ConfigError("SCEP_STORE must be sqlite, tables or auto")
        return kind


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and check every setting; raises ConfigError naming the first wrong one."""
    settings = Settings(dict(os.environ if environ is None else environ))
    _refuse_unresolved_references(settings)
    settings.integer("SCEP_CERT_VALIDITY_DAYS", 1, 3650)
    settings.integer("SCEP_MIN_RSA_KEY_BITS", *MIN_RSA_KEY_BITS_RANGE)
    settings.integer("SCEP_MAX_MESSAGE_BYTES", 4096, 1024 * 1024)
    settings.flag("SCEP_ALLOW_DES")
    settings.flag("KEY_VAULT_VERIFY_CHALLENGE_RESOURCE")
    settings.integer("KEY_VAULT_REFRESH_SECONDS", 1, 86400)
    settings.integer("SCEP_KEY_BUDGET_SECONDS", 1, 120)
    settings.integer("SCEP_RA_RENEW_DAYS", 1, 365)
    log_level(settings)
    if settings.uses_key_vault and not settings.get("KEY_VAULT_URL").startswith("https://"):
        raise ConfigError("KEY_VAULT_URL must be an https:// URL, such as https://my-vault.vault.azure.net")
    allowed_ekus(settings)
    _check_azure_credential(settings)
    modes = settings.modes
    if "static" in modes:
        _check_static_challenge(settings)
    if "intune" in modes:
        _check_intune_settings(settings)
    if settings.store_kind == "tables":
        _check_tables_settings(settings)
    return settings


def _refuse_unresolved_references(settings: Settings) -> None:
    """App Service leaves `@Microsoft.KeyVault(...)` as the value of a reference it cannot resolve; that text
    is public, so it must never serve as a setting (least of all as a challenge)."""
    from scep.azure.vault_secrets import is_key_vault_reference

    for setting in SETTINGS:
        if is_key_vault_reference(settings.values.get(setting.name) or ""):
            raise ConfigError(
                f"{setting.name} is an unresolved Key Vault reference (@Microsoft.KeyVault(...)): the platform "
                "could not read the secret (missing, disabled, or the identity's role not yet in effect)"
            )


def _check_azure_credential(settings: Settings) -> None:
    from scep.azure.identity import credential_choice

    try:
        credential_choice(settings.values)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _check_static_challenge(settings: Settings) -> None:
    challenge, secret_name = settings.get("SCEP_CHALLENGE"), settings.get("SCEP_CHALLENGE_SECRET_NAME")
    if not challenge and not secret_name:
        raise ConfigError(
            "SCEP_CHALLENGE (or SCEP_CHALLENGE_SECRET_NAME) is required when SCEP_CHALLENGE_MODE includes static"
        )
    if challenge and secret_name:
        raise ConfigError("set SCEP_CHALLENGE or SCEP_CHALLENGE_SECRET_NAME, not both")
    if secret_name and not settings.uses_key_vault:
        raise ConfigError("SCEP_CHALLENGE_SECRET_NAME needs KEY_VAULT_URL (the vault that holds the secret)")


def _check_tables_settings(settings: Settings) -> None:
    if not _tables_source(settings):
        raise ConfigError(
            "SCEP_STORE=tables needs SCEP_TABLES_ENDPOINT, AzureWebJobsStorage__tableServiceUri "
            "or SCEP_TABLES_CONNECTION_STRING"
        )
    from scep.azure.tables import TABLE_PREFIX

    if not TABLE_PREFIX.fullmatch(settings.get("SCEP_TABLE_PREFIX")):
        raise ConfigError("SCEP_TABLE_PREFIX must be 1-51 letters and digits, starting with a letter")


def _check_intune_settings(settings: Settings) -> None:
    from scep.azure.intune.client import IntuneConfigError, IntuneSettings

    if not settings.get("INTUNE_TENANT_ID"):
        raise ConfigError("INTUNE_TENANT_ID is required when SCEP_CHALLENGE_MODE includes intune")
    try:
        IntuneSettings.from_env(settings.values)
    except IntuneConfigError as error:
        raise ConfigError(str(error)) from None


def allowed_ekus(settings: Settings) -> frozenset:
    found = set()
    for item in (part.strip() for part in settings.get("SCEP_ALLOWED_EKUS").split(",")):
        if not item:
            continue
        if item in EKU_NAMES:
            found.add(EKU_NAMES[item])
            continue
        try:
            found.add(ObjectIdentifier(item))
        except ValueError:
            raise ConfigError(f"SCEP_ALLOWED_EKUS: {item!r} is neither a known name nor an OID") from None
    return frozenset(found) or DEFAULT_ALLOWED_EKUS


# --- building the backends ---


def build_key_home(settings: Settings) -> KeyHome:
    if settings.uses_key_vault:
        from scep.azure.identity import build_credential
        from scep.azure.keyvault import KeyVaultHome

        return KeyVaultHome(
            settings.get("KEY_VAULT_URL"),
            ca_name=settings.get("SCEP_CA_CERT_NAME"),
            ra_name=settings.get("SCEP_RA_CERT_NAME"),
            credential=build_credential(settings.get("AZURE_CLIENT_ID") or None),
            verify_challenge_resource=settings.flag("KEY_VAULT_VERIFY_CHALLENGE_RESOURCE"),
            refresh_interval=float(settings.integer("KEY_VAULT_REFRESH_SECONDS", 1, 86400)),
        )
    from scep.keys.local import LocalHome

    return LocalHome(settings.data_dir)


def ensure_local_ca(settings: Settings, home: KeyHome) -> bool:
    """Create the embedded root CA and RA on first start (once, even with several workers). True if created."""
    if settings.uses_key_vault or (home.exists(Slot.CA) and home.exists(Slot.RA)):
        return False
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(settings.data_dir / ".init.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if home.exists(Slot.CA) and home.exists(Slot.RA):
            return False
        init_root(home, CaOptions(), force=False)
        return True


def _tables_source(settings: Settings) -> str:
    return (
        settings.get("SCEP_TABLES_CONNECTION_STRING")
        or settings.get("SCEP_TABLES_ENDPOINT")
        or settings.get("AzureWebJobsStorage__tableServiceUri")
    )


def build_store(settings: Settings) -> Store:
    if settings.store_kind == "tables":
        from scep.azure.tables import TableStore

        prefix = settings.get("SCEP_TABLE_PREFIX")
        connection_string = settings.get("SCEP_TABLES_CONNECTION_STRING")
        if connection_string:
            return TableStore.from_connection_string(connection_string, table_prefix=prefix)
        from scep.azure.identity import build_credential

        credential = build_credential(settings.get("AZURE_CLIENT_ID") or None)
        return TableStore(_tables_source(settings), credential, table_prefix=prefix)
    from scep.store.sqlite import SqliteStore

    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return SqliteStore(settings.data_dir / "scep.db")


def build_validator(settings: Settings) -> ChallengeValidator:
    modes = settings.modes
    static = _static_validator(settings) if "static" in modes else None
    if "intune" not in modes:
        assert static is not None
        return static
    from scep.azure.intune.validator import build_intune_validator

    try:
        intune = build_intune_validator(settings)
    except ValueError as error:  # IntuneConfigError names the setting
        raise ConfigError(str(error)) from None
    if static is None:
        return intune
    from scep.challenge.composite import CompositeValidator

    return CompositeValidator([static, intune])


def _static_validator(settings: Settings) -> StaticValidator:
    """The fixed SCEP_CHALLENGE, or the Key Vault secret SCEP_CHALLENGE_SECRET_NAME read at run time."""
    secret_name = settings.get("SCEP_CHALLENGE_SECRET_NAME")
    if not secret_name:
        return StaticValidator(settings.get("SCEP_CHALLENGE"))
    from scep.azure.intune import key_vault_secret_source

    return StaticValidator(key_vault_secret_source(settings.values, secret_name, "SCEP_CHALLENGE_SECRET_NAME"))


def build_intune_client(settings: Settings):
    from scep.azure.intune import build_intune_client as build

    try:
        return build(settings)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def build_webhooks(settings: Settings, validator: ChallengeValidator):
    """The step-ca webhook handler, or None when no webhook secret is configured."""
    if not (settings.get("SCEP_WEBHOOK_SECRET") or settings.get("SCEP_WEBHOOK_SECRET_NAME")):
        return None
    from scep.challenge.webhook import build_webhook_handler

    try:
        return build_webhook_handler(settings, validator)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def build_service(settings: Settings) -> ScepService:
    home = build_key_home(settings)
    ensure_local_ca(settings, home)
    options = ServiceOptions(
        allow_legacy=settings.flag("SCEP_ALLOW_DES"),
        profile=Profile(
            validity_days=settings.integer("SCEP_CERT_VALIDITY_DAYS", 1, 3650),
            min_rsa_bits=settings.integer("SCEP_MIN_RSA_KEY_BITS", *MIN_RSA_KEY_BITS_RANGE),
            allowed_ekus=allowed_ekus(settings),
        ),
        key_budget_seconds=float(settings.integer("SCEP_KEY_BUDGET_SECONDS", 1, 120)),
    )
    return ScepService(home, build_store(settings), build_validator(settings), options)


_service: ScepService | None = None
_settings: Settings | None = None
_webhooks = None
_lock = threading.RLock()


def settings() -> Settings:
    """The process's settings, checked once."""
    global _settings
    if _settings is None:
        _settings = load_settings()
    return _settings


def service() -> ScepService:
    """The process's service, built once (Functions keeps the worker warm)."""
    global _service
    if _service is None:
        with _lock:
            if _service is None:
                _service = build_service(settings())
    return _service


def webhooks():
    """The process's step-ca webhook handler (None when not configured), built once."""
    global _webhooks
    if _webhooks is None:
        with _lock:
            if _webhooks is None:
                _webhooks = build_webhooks(settings(), service().validator) or False
    return _webhooks or None


def reset() -> None:
    """Forget the cached settings, service and webhooks (after the environment changed)."""
    global _service, _settings, _webhooks
    with _lock:
        _service = None
        _settings = None
        _webhooks = None


def log_level(settings: Settings) -> str | None:
    """SCEP_LOG_LEVEL in lower case; None when unset (the caller's default applies)."""
    level = settings.get("SCEP_LOG_LEVEL").lower()
    if level and level not in LEVELS:
        raise ConfigError(f"SCEP_LOG_LEVEL must be one of {', '.join(LEVELS)}, not {level!r}")
    return level or None


def ra_renew_days() -> int:
    return settings().integer("SCEP_RA_RENEW_DAYS", 1, 365)


def max_message_bytes() -> int:
    return settings().integer("SCEP_MAX_MESSAGE_BYTES", 4096, 1024 * 1024)
