"""The composition root: reads every setting once into one typed, immutable Settings object, fails with a
message naming the wrong setting, and builds the service once.

Every setting the product reads is listed in SETTINGS (the configuration reference in docs/configuration.md and
the infrastructure checks are held to this list). This module is the only one that reads the environment; every
other module receives the typed values it needs (tests/test_environment_scan.py holds the code to that).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

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

if TYPE_CHECKING:
    from scep.azure.intune.client import IntuneClient
    from scep.azure.intune.credential import SecretSource
    from scep.azure.intune.settings import IntuneSettings
    from scep.azure.telemetry import TelemetrySettings
    from scep.azure.vault_clients import KeyVaultClients
    from scep.challenge.webhook import WebhookHandler

log = logging.getLogger("scep.config")


class ConfigError(ValueError):
    """A setting is missing or wrong; the message names it (`setting`) and says what is expected."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting} {message}")
        self.setting = setting


@dataclass(frozen=True)
class Setting:
    name: str
    default: str
    description: str
    azure: bool = False  # provisioned by infra/ for the Azure deployment
    secret: bool = False


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "SCEP_DATA_DIR", "./.scep", "Local CA, RA and OCSP-signer PEM files, the SQLite store and the admin credential."
    ),
    Setting("SCEP_CHALLENGE", "", "Static challenge password; `scep serve` generates one when empty.", secret=True),
    Setting("SCEP_CHALLENGE_SECRET_NAME", "", "Key Vault secret holding the static challenge.", azure=True),
    Setting("SCEP_CHALLENGE_MODE", "static", "static, intune, or static,intune (both at once).", azure=True),
    Setting("SCEP_CERT_VALIDITY_DAYS", "365", "Validity of issued certificates in days (1-3650).", azure=True),
    Setting("SCEP_MIN_RSA_KEY_BITS", str(DEFAULT_MIN_RSA_BITS), "Smallest RSA device key issued (1024-4096)."),
    Setting("SCEP_ALLOW_DES", "false", "Legacy: accept single DES and MD5 (micromdm scepclient)."),
    Setting("SCEP_MAX_MESSAGE_BYTES", str(DEFAULT_MAX_MESSAGE_BYTES), "Largest PKIOperation message accepted."),
    Setting("SCEP_ALLOWED_EKUS", ",".join(DEFAULT_EKU_NAMES), "Extended key usages a CSR may ask for (names or OIDs)."),
    Setting(
        "SCEP_STORE",
        "auto",
        "sqlite, tables, or auto (tables when a table endpoint or connection string is set).",
        azure=True,
    ),
    Setting("SCEP_TABLES_ENDPOINT", "", "Table service URI for identity-based access.", azure=True),
    Setting("AzureWebJobsStorage__tableServiceUri", "", "Functions' identity-based storage convention.", azure=True),
    Setting("SCEP_TABLES_CONNECTION_STRING", "", "Table connection string (Azurite).", secret=True),
    Setting("SCEP_TABLE_PREFIX", "scep", "Prefix of the inventory tables.", azure=True),
    Setting("KEY_VAULT_URL", "", "Azure Key Vault URL: CA, RA and OCSP-signer keys live there when set.", azure=True),
    Setting("SCEP_CA_CERT_NAME", "scep-ca", "Key Vault certificate holding the CA.", azure=True),
    Setting("SCEP_RA_CERT_NAME", "scep-ra", "Key Vault certificate holding the RA.", azure=True),
    Setting("KEY_VAULT_REFRESH_SECONDS", "300", "How often a warm worker looks for new CA/RA versions."),
    Setting("SCEP_KEY_BUDGET_SECONDS", "20", "Seconds for the key operations of one PKIOperation, retries included."),
    Setting(
        "KEY_VAULT_VERIFY_CHALLENGE_RESOURCE", "true", "Only for emulators: false accepts a challenge for another host."
    ),
    Setting("AZURE_CLIENT_ID", "", "Client ID of the user-assigned managed identity.", azure=True),
    Setting("SCEP_AZURE_CREDENTIAL", "default", "Azure credential: default (DefaultAzureCredential) or azd."),
    Setting("AZURE_AUTHORITY_HOST", "", "Entra authority of the Azure credential (sovereign clouds, emulators)."),
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
    Setting(
        "SCEP_PUBLIC_BASE_URL", "", "Base URL named in certificates for the CRL, CA certificate and OCSP (empty: none; "
        "`scep serve`: its own URL).", azure=True,
    ),
    Setting("SCEP_CRL_VALIDITY_DAYS", "7", "CRL nextUpdate in days after thisUpdate (1-90); republished at half-life."),
    Setting("SCEP_OCSP_CACHE_SECONDS", "3600", "How long a signed OCSP answer is reused and cacheable (60-10800)."),
    Setting("SCEP_OCSP_SIGNATURES_PER_MINUTE", "600", "Freshly signed OCSP answers (nonce, unknown serial) per minute "
            "per worker (10-100000); more get tryLater."),
    Setting("SCEP_REVOKE_SUPERSEDED", "false", "Revoke the old certificate (reason superseded) after a RenewalReq."),
    Setting("SCEP_OCSP_CERT_NAME", "scep-ocsp", "Key Vault certificate holding the delegated OCSP signer.", azure=True),
    Setting("SCEP_ADMIN_AUTH", "credential", "Admin API sign-in: credential (local) or entra.", azure=True),
    Setting("SCEP_ADMIN_TENANT_ID", "", "Entra tenant whose tokens the admin API accepts.", azure=True),
    Setting("SCEP_ADMIN_AUDIENCE", "", "Admin app registration: client ID and Application ID URI.", azure=True),
    Setting("SCEP_ADMIN_ROLE", "SCEP.Admin", "App role an Entra token must carry for the admin API."),
    Setting("SCEP_ADMIN_AUTHORITY_HOST", "https://login.microsoftonline.com", "Entra authority of admin tokens."),
    Setting("SCEP_ADMIN_SESSION_MINUTES", "60", "Lifetime of an admin browser session (5-1440)."),
    Setting("SCEP_TELEMETRY", "auto", "Traces and metrics: auto (Azure Monitor when connected), off, console, otlp."),
    Setting("SCEP_OTLP_ENDPOINT", "http://127.0.0.1:4318", "OTLP/HTTP collector of SCEP_TELEMETRY=otlp."),
    Setting("APPLICATIONINSIGHTS_CONNECTION_STRING", "", "Application Insights to export telemetry to.", azure=True),
    Setting("APPLICATIONINSIGHTS_AUTHENTICATION_STRING", "", "ClientId=<id>;Authorization=AAD (Entra).", azure=True),
)
_DEFAULTS = {s.name: s.default for s in SETTINGS}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_LIST_SEPARATORS = re.compile(r"[\s,]+")
MODES = ("static", "intune")
STORES = ("sqlite", "tables", "auto")
CREDENTIALS = ("default", "azd")
TELEMETRY_CHOICES = ("auto", "off", "console", "otlp")
INTUNE_AUTH_MODES = ("secret", "certificate", "managed-identity", "federated")
ADMIN_AUTH_MODES = ("credential", "entra")
MIN_RSA_KEY_BITS_RANGE = (1024, 4096)  # Intune's SCEP profiles offer 1024, 2048 and 4096 bits


# --- the typed settings, grouped by concern ---


@dataclass(frozen=True)
class ServiceSettings:
    """The certificate profile and the protocol's limits."""

    data_dir: Path
    options: ServiceOptions
    max_message_bytes: int


@dataclass(frozen=True)
class IdentitySettings:
    """The app's own Azure credential (Key Vault, Table storage, Microsoft Graph)."""

    client_id: str | None  # a user-assigned managed identity
    credential: str  # one of CREDENTIALS
    authority_host: str | None


@dataclass(frozen=True)
class KeyVaultSettings:
    url: str
    ca_name: str
    ra_name: str
    ocsp_name: str
    refresh_seconds: float
    verify_challenge_resource: bool


@dataclass(frozen=True)
class StoreSettings:
    kind: str  # sqlite or tables (auto resolved)
    tables_endpoint: str
    connection_string: str = field(repr=False)
    table_prefix: str


@dataclass(frozen=True)
class ChallengeSettings:
    modes: frozenset[str]
    static: str = field(repr=False)
    static_secret_name: str


@dataclass(frozen=True)
class IntuneConfig:
    """The Intune client's settings (IntuneSettings, none of them secret) and where its secrets come from."""

    client: IntuneSettings
    client_secret: str = field(repr=False)
    client_secret_name: str
    certificate_password: str | None = field(repr=False)
    allow_renewal_without_challenge: bool
    ca_configuration: str | None
    certificate_authority: str | None


@dataclass(frozen=True)
class WebhookSettings:
    secrets: tuple[str, ...] = field(repr=False)
    secret_name: str
    ids: tuple[str, ...]

    @property
    def enabled(self) -> bool:
        return bool(self.secrets or self.secret_name)


@dataclass(frozen=True)
class AdminSettings:
    """Who may call the admin API: the local credential in the data directory, or Entra ID access tokens."""

    mode: str  # one of ADMIN_AUTH_MODES
    tenant_id: str
    audiences: tuple[str, ...]
    role: str
    authority_host: str
    session_seconds: int


@dataclass(frozen=True)
class RevocationSettings:
    """The OCSP responder (the base URL, CRL validity and renewal option are the service's options)."""

    ocsp_window: timedelta
    ocsp_signatures_per_minute: int


@dataclass(frozen=True)
class Settings:
    """Every setting of the process, parsed and checked once by load_settings."""

    service: ServiceSettings
    identity: IdentitySettings
    key_vault: KeyVaultSettings | None  # None: local PEM custody
    store: StoreSettings
    challenge: ChallengeSettings
    intune: IntuneConfig
    webhooks: WebhookSettings
    log_level: str | None  # None: the caller's default applies
    ra_renew_days: int
    admin: AdminSettings
    telemetry: TelemetrySettings
    revocation: RevocationSettings

    @property
    def data_dir(self) -> Path:
        return self.service.data_dir

    @property
    def modes(self) -> frozenset[str]:
        return self.challenge.modes

    @property
    def store_kind(self) -> str:
        return self.store.kind

    @property
    def uses_key_vault(self) -> bool:
        return self.key_vault is not None

    @property
    def handling_waits_on_network(self) -> bool:
        """Whether answering a request can wait on another service: Key Vault (keys or secrets), Table Storage or
        Intune. Local keys, SQLite and a static challenge set in the environment are CPU and disk only."""
        return self.uses_key_vault or self.store_kind == "tables" or "intune" in self.modes


# --- one parser per kind of value ---


class _Reader:
    """Reads named settings from a mapping, each kind of value by one parser; errors name the setting."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = values

    def text(self, name: str) -> str:
        value = (self._values.get(name) or "").strip()
        return value or _DEFAULTS[name]

    def optional(self, name: str) -> str | None:
        return self.text(name) or None

    def flag(self, name: str) -> bool:
        value = self.text(name).lower()
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        raise ConfigError(name, f"must be true or false, not {value!r}")

    def count(self, name: str, low: int, high: int) -> int:
        return self._number(name, low, high, int, "a whole number")

    def seconds(self, name: str, low: float, high: float) -> float:
        return self._number(name, low, high, float, "a number of seconds")

    def _number(self, name: str, low: float, high: float, parse: Callable[[str], Any], kind: str) -> Any:
        value = self.text(name)
        try:
            number = parse(value)
        except ValueError:
            raise ConfigError(name, f"must be {kind}, not {value!r}") from None
        if not low <= number <= high:
            raise ConfigError(name, f"must be between {low:g} and {high:g}, not {value}")
        return number

    def url(self, name: str) -> str:
        """An https:// URL, or empty when unset and without default."""
        value = self.text(name)
        if value and not value.lower().startswith("https://"):
            raise ConfigError(name, f"must be an https:// URL, not {value!r}")
        return value

    def items(self, name: str) -> tuple[str, ...]:
        """A list separated by commas or white space."""
        return split_list(self.text(name))

    def choice(self, name: str, choices: tuple[str, ...]) -> str:
        value = self.text(name).lower()
        if value not in choices:
            raise ConfigError(name, f"must be one of {', '.join(choices)}, not {value!r}")
        return value


def split_list(text: str) -> tuple[str, ...]:
    """The items of a list setting (or of a secret holding one): separated by commas or white space."""
    return tuple(item for item in _LIST_SEPARATORS.split(text.strip()) if item)


# --- loading ---


def load_settings(
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, str] | None = None,
    *,
    for_serving: bool = True,
) -> Settings:
    """Read and check every setting from environ (default: the process environment), with overrides (e.g. from
    the command line) taking precedence; raises ConfigError naming the first wrong one. for_serving also checks
    that what serving needs is there (a challenge, Intune's tenant and secret, a table endpoint); the
    administrative commands (`scep ca ...`) do without."""
    unknown = sorted(set(overrides or ()) - set(_DEFAULTS))
    if unknown:
        raise ConfigError(unknown[0], "is not a setting")
    values = {**(os.environ if environ is None else environ), **(overrides or {})}
    _refuse_unresolved_references(values)
    read = _Reader(values)
    settings = Settings(
        service=_service_settings(read),
        identity=IdentitySettings(
            client_id=read.optional("AZURE_CLIENT_ID"),
            credential=read.choice("SCEP_AZURE_CREDENTIAL", CREDENTIALS),
            authority_host=read.optional("AZURE_AUTHORITY_HOST"),
        ),
        key_vault=_key_vault_settings(read),
        store=_store_settings(read),
        challenge=_challenge_settings(read),
        intune=_intune_config(read),
        webhooks=WebhookSettings(
            secrets=read.items("SCEP_WEBHOOK_SECRET"),
            secret_name=read.text("SCEP_WEBHOOK_SECRET_NAME"),
            ids=read.items("SCEP_WEBHOOK_IDS"),
        ),
        log_level=_log_level(read),
        ra_renew_days=read.count("SCEP_RA_RENEW_DAYS", 1, 365),
        admin=_admin_settings(read),
        telemetry=_telemetry_settings(read),
        revocation=RevocationSettings(
            ocsp_window=timedelta(seconds=read.count("SCEP_OCSP_CACHE_SECONDS", 60, 3 * 3600)),
            ocsp_signatures_per_minute=read.count("SCEP_OCSP_SIGNATURES_PER_MINUTE", 10, 100_000),
        ),
    )
    if for_serving:
        _check_serving(settings)
    return settings


def _admin_settings(read: _Reader) -> AdminSettings:
    settings = AdminSettings(
        mode=read.choice("SCEP_ADMIN_AUTH", ADMIN_AUTH_MODES),
        tenant_id=read.text("SCEP_ADMIN_TENANT_ID"),
        audiences=read.items("SCEP_ADMIN_AUDIENCE"),
        role=read.text("SCEP_ADMIN_ROLE"),
        authority_host=read.url("SCEP_ADMIN_AUTHORITY_HOST").rstrip("/"),
        session_seconds=read.count("SCEP_ADMIN_SESSION_MINUTES", 5, 1440) * 60,
    )
    if settings.mode == "entra":
        if not re.fullmatch(r"[0-9a-fA-F-]{36}|[A-Za-z0-9.-]+\.[A-Za-z]+", settings.tenant_id):
            raise ConfigError("SCEP_ADMIN_TENANT_ID", "must be the tenant's ID (a GUID) with SCEP_ADMIN_AUTH=entra")
        if not settings.audiences:
            raise ConfigError("SCEP_ADMIN_AUDIENCE", "is required with SCEP_ADMIN_AUTH=entra")
    return settings


def _log_level(read: _Reader) -> str | None:
    level = read.text("SCEP_LOG_LEVEL").lower()
    if level and level not in LEVELS:
        raise ConfigError("SCEP_LOG_LEVEL", f"must be one of {', '.join(LEVELS)}, not {level!r}")
    return level or None


def _telemetry_settings(read: _Reader) -> TelemetrySettings:
    """SCEP_TELEMETRY: auto exports to Application Insights when APPLICATIONINSIGHTS_CONNECTION_STRING is set, and
    nowhere otherwise; off, console and otlp say it outright."""
    from scep.azure import telemetry

    choice = read.choice("SCEP_TELEMETRY", TELEMETRY_CHOICES)
    connection_string = read.text("APPLICATIONINSIGHTS_CONNECTION_STRING")
    if connection_string and "instrumentationkey=" not in connection_string.lower():
        raise ConfigError("APPLICATIONINSIGHTS_CONNECTION_STRING", "has no InstrumentationKey=: copy the whole string")
    authentication = read.text("APPLICATIONINSIGHTS_AUTHENTICATION_STRING")
    try:
        entra, client_id = telemetry.parse_authentication_string(authentication)
    except ValueError as error:
        raise ConfigError("APPLICATIONINSIGHTS_AUTHENTICATION_STRING", str(error)) from None
    endpoint = read.text("SCEP_OTLP_ENDPOINT")
    if not endpoint.lower().startswith(("http://", "https://")):
        raise ConfigError("SCEP_OTLP_ENDPOINT", f"must be an http:// or https:// URL, not {endpoint!r}")
    if choice == "auto":
        choice = telemetry.AZURE_MONITOR if connection_string else telemetry.OFF
    return telemetry.TelemetrySettings(choice, endpoint, connection_string, client_id, entra)


def _refuse_unresolved_references(values: Mapping[str, str]) -> None:
    """App Service leaves `@Microsoft.KeyVault(...)` as the value of a reference it cannot resolve; that text
    is public, so it must never serve as a setting (least of all as a challenge)."""
    from scep.appsettings import is_key_vault_reference

    for setting in SETTINGS:
        if is_key_vault_reference(values.get(setting.name) or ""):
            raise ConfigError(
                setting.name,
                "is an unresolved Key Vault reference (@Microsoft.KeyVault(...)): the platform could not read "
                "the secret (missing, disabled, or the identity's role not yet in effect)",
            )


def _service_settings(read: _Reader) -> ServiceSettings:
    profile = Profile(
        validity_days=read.count("SCEP_CERT_VALIDITY_DAYS", 1, 3650),
        min_rsa_bits=read.count("SCEP_MIN_RSA_KEY_BITS", *MIN_RSA_KEY_BITS_RANGE),
        allowed_ekus=_allowed_ekus(read.items("SCEP_ALLOWED_EKUS")),
        public_base_url=_public_base_url(read),
    )
    return ServiceSettings(
        data_dir=Path(read.text("SCEP_DATA_DIR")).expanduser(),
        options=ServiceOptions(
            allow_legacy=read.flag("SCEP_ALLOW_DES"),
            profile=profile,
            key_budget_seconds=float(read.count("SCEP_KEY_BUDGET_SECONDS", 1, 120)),
            revoke_superseded=read.flag("SCEP_REVOKE_SUPERSEDED"),
            crl_validity=timedelta(days=read.count("SCEP_CRL_VALIDITY_DAYS", 1, 90)),
        ),
        max_message_bytes=read.count("SCEP_MAX_MESSAGE_BYTES", 4096, 1024 * 1024),
    )


def _public_base_url(read: _Reader) -> str | None:
    """http:// or https:// with a host and nothing after the path: the URLs in certificates are built on it."""
    value = read.text("SCEP_PUBLIC_BASE_URL").rstrip("/")
    if not value:
        return None
    parts = urlsplit(value)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError("SCEP_PUBLIC_BASE_URL", f"must be an http:// or https:// URL with a host, not {value!r}")
    return value


def _allowed_ekus(items: tuple[str, ...]) -> frozenset:
    found = set()
    for item in items:
        if item in EKU_NAMES:
            found.add(EKU_NAMES[item])
            continue
        try:
            found.add(ObjectIdentifier(item))
        except ValueError:
            raise ConfigError("SCEP_ALLOWED_EKUS", f"holds {item!r}, neither a known name nor an OID") from None
    return frozenset(found) or DEFAULT_ALLOWED_EKUS


def _key_vault_settings(read: _Reader) -> KeyVaultSettings | None:
    url = read.url("KEY_VAULT_URL")
    settings = KeyVaultSettings(
        url=url,
        ca_name=read.text("SCEP_CA_CERT_NAME"),
        ra_name=read.text("SCEP_RA_CERT_NAME"),
        ocsp_name=read.text("SCEP_OCSP_CERT_NAME"),
        refresh_seconds=float(read.count("KEY_VAULT_REFRESH_SECONDS", 1, 86400)),
        verify_challenge_resource=read.flag("KEY_VAULT_VERIFY_CHALLENGE_RESOURCE"),
    )
    return settings if url else None


def _store_settings(read: _Reader) -> StoreSettings:
    endpoint = read.url("SCEP_TABLES_ENDPOINT") or read.url("AzureWebJobsStorage__tableServiceUri")
    connection_string = read.text("SCEP_TABLES_CONNECTION_STRING")
    kind = read.choice("SCEP_STORE", STORES)
    if kind == "auto":
        kind = "tables" if endpoint or connection_string else "sqlite"
    prefix = read.text("SCEP_TABLE_PREFIX")
    if kind == "tables":
        from scep.azure.tables import TABLE_PREFIX

        if not TABLE_PREFIX.fullmatch(prefix):
            raise ConfigError("SCEP_TABLE_PREFIX", "must be 1-51 letters and digits, starting with a letter")
    return StoreSettings(kind, endpoint, connection_string, prefix)


def _challenge_settings(read: _Reader) -> ChallengeSettings:
    modes = frozenset(item.lower() for item in read.items("SCEP_CHALLENGE_MODE"))
    if not modes or not modes <= set(MODES):
        raise ConfigError("SCEP_CHALLENGE_MODE", "must be static, intune or static,intune")
    return ChallengeSettings(modes, read.text("SCEP_CHALLENGE"), read.text("SCEP_CHALLENGE_SECRET_NAME"))


def _intune_config(read: _Reader) -> IntuneConfig:
    from scep.azure.intune.settings import AuthMode, IntuneSettings

    client = IntuneSettings(
        tenant_id=read.text("INTUNE_TENANT_ID"),
        client_id=read.optional("INTUNE_CLIENT_ID"),
        auth=AuthMode(read.choice("INTUNE_AUTH", INTUNE_AUTH_MODES)),
        authority_host=read.url("INTUNE_AUTHORITY_HOST"),
        graph_url=read.url("INTUNE_GRAPH_URL"),
        resource_url=read.url("INTUNE_RESOURCE_URL"),
        client_certificate_path=read.optional("INTUNE_CLIENT_CERTIFICATE_PATH"),
        managed_identity_client_id=read.optional("AZURE_CLIENT_ID"),
        token_exchange_audience=read.text("INTUNE_TOKEN_EXCHANGE_AUDIENCE"),
        connect_timeout=read.seconds("INTUNE_CONNECT_TIMEOUT", 0.1, 300),
        read_timeout=read.seconds("INTUNE_TIMEOUT", 0.1, 300),
        validate_retries=read.count("INTUNE_VALIDATE_RETRIES", 0, 5),
    )
    return IntuneConfig(
        client=client,
        client_secret=read.text("INTUNE_CLIENT_SECRET"),
        client_secret_name=read.text("INTUNE_CLIENT_SECRET_NAME"),
        certificate_password=read.optional("INTUNE_CLIENT_CERTIFICATE_PASSWORD"),
        allow_renewal_without_challenge=read.flag("INTUNE_ALLOW_RENEWAL_WITHOUT_CHALLENGE"),
        ca_configuration=read.optional("INTUNE_CA_CONFIGURATION"),
        certificate_authority=read.optional("INTUNE_CERTIFICATE_AUTHORITY"),
    )


# --- what serving needs ---


def _check_serving(settings: Settings) -> None:
    if "static" in settings.modes:
        _check_static_challenge(settings)
    if "intune" in settings.modes:
        check_intune(settings)
    if settings.webhooks.secret_name:
        _needs_key_vault(settings, "SCEP_WEBHOOK_SECRET_NAME")
    if settings.store.kind == "tables" and not (settings.store.tables_endpoint or settings.store.connection_string):
        raise ConfigError(
            "SCEP_TABLES_ENDPOINT",
            "(or AzureWebJobsStorage__tableServiceUri, or SCEP_TABLES_CONNECTION_STRING) is required with "
            "SCEP_STORE=tables",
        )


def _check_static_challenge(settings: Settings) -> None:
    challenge = settings.challenge
    if not challenge.static and not challenge.static_secret_name:
        raise ConfigError(
            "SCEP_CHALLENGE", "(or SCEP_CHALLENGE_SECRET_NAME) is required when SCEP_CHALLENGE_MODE includes static"
        )
    if challenge.static and challenge.static_secret_name:
        raise ConfigError("SCEP_CHALLENGE", "and SCEP_CHALLENGE_SECRET_NAME are both set: set one, not both")
    if challenge.static_secret_name:
        _needs_key_vault(settings, "SCEP_CHALLENGE_SECRET_NAME")


def _needs_key_vault(settings: Settings, setting: str) -> None:
    if not settings.uses_key_vault:
        raise ConfigError(setting, "needs KEY_VAULT_URL (the vault that holds the secret)")


def check_intune(settings: Settings) -> None:
    """What the Intune client needs for its INTUNE_AUTH: tenant, app registration, certificate or secret."""
    client, auth = settings.intune.client, settings.intune.client.auth.value
    if not client.tenant_id and auth != "managed-identity":
        raise ConfigError("INTUNE_TENANT_ID", f"is required with INTUNE_AUTH={auth}")
    if not client.client_id and auth != "managed-identity":
        raise ConfigError("INTUNE_CLIENT_ID", f"is required with INTUNE_AUTH={auth}")
    if auth == "certificate" and not client.client_certificate_path:
        raise ConfigError("INTUNE_CLIENT_CERTIFICATE_PATH", "is required with INTUNE_AUTH=certificate")
    if auth == "secret":
        if not (settings.intune.client_secret or settings.intune.client_secret_name):
            raise ConfigError(
                "INTUNE_CLIENT_SECRET", "(or INTUNE_CLIENT_SECRET_NAME) is required with INTUNE_AUTH=secret"
            )
        if not settings.intune.client_secret:
            _needs_key_vault(settings, "INTUNE_CLIENT_SECRET_NAME")


# --- building the backends ---


def build_credential(settings: Settings) -> Any:
    """The app's own Azure credential, as SCEP_AZURE_CREDENTIAL, AZURE_CLIENT_ID and AZURE_AUTHORITY_HOST say."""
    from scep.azure.identity import build_credential as build

    identity = settings.identity
    return build(identity.client_id, choice=identity.credential, authority_host=identity.authority_host)


def key_vault_clients(settings: Settings) -> KeyVaultClients:
    """The builder of every Key Vault client (custody and secrets), with the vault's pipeline settings."""
    from scep.azure.vault_clients import KeyVaultClients, VaultPipeline

    if settings.key_vault is None:
        raise ConfigError("KEY_VAULT_URL", "is required to use Azure Key Vault")
    pipeline = VaultPipeline(verify_challenge_resource=settings.key_vault.verify_challenge_resource)
    return KeyVaultClients(settings.key_vault.url, build_credential(settings), pipeline)


def key_vault_secret(settings: Settings, secret_name: str) -> SecretSource:
    """A secret read by name from the app's Key Vault at run time (cached, re-read on refresh())."""
    from scep.azure.intune.credential import SecretSource
    from scep.azure.vault_secrets import SecretReader

    return SecretSource.from_key_vault(SecretReader(key_vault_clients(settings)), secret_name)


def build_key_home(settings: Settings) -> KeyHome:
    if settings.key_vault is not None:
        from scep.azure.keyvault import KeyVaultHome

        return KeyVaultHome(
            key_vault_clients(settings),
            ca_name=settings.key_vault.ca_name,
            ra_name=settings.key_vault.ra_name,
            ocsp_name=settings.key_vault.ocsp_name,
            refresh_interval=settings.key_vault.refresh_seconds,
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


def build_store(settings: Settings) -> Store:
    store = settings.store
    if store.kind == "tables":
        from scep.azure.tables import TableStore

        if store.connection_string:
            return TableStore.from_connection_string(store.connection_string, table_prefix=store.table_prefix)
        return TableStore(store.tables_endpoint, build_credential(settings), table_prefix=store.table_prefix)
    from scep.store.sqlite import SqliteStore

    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return SqliteStore(settings.data_dir / "scep.db")


def build_validator(settings: Settings) -> ChallengeValidator:
    modes = settings.modes
    static = _static_validator(settings) if "static" in modes else None
    if "intune" not in modes:
        assert static is not None
        return static
    from scep.azure.intune.validator import IntuneValidator

    intune = settings.intune
    validator = IntuneValidator(
        build_intune_client(settings),
        allow_renewal_without_challenge=intune.allow_renewal_without_challenge,
        ca_configuration=intune.ca_configuration,
        certificate_authority=intune.certificate_authority,
    )
    if static is None:
        return validator
    from scep.challenge.composite import CompositeValidator

    return CompositeValidator([static, validator])


def _static_validator(settings: Settings) -> StaticValidator:
    """The fixed SCEP_CHALLENGE, or the Key Vault secret SCEP_CHALLENGE_SECRET_NAME read at run time."""
    challenge = settings.challenge
    if not challenge.static_secret_name:
        return StaticValidator(challenge.static)
    return StaticValidator(key_vault_secret(settings, challenge.static_secret_name))


def build_intune_client(settings: Settings) -> IntuneClient:
    """The Intune client INTUNE_AUTH describes; ConfigError naming the setting when something it needs is missing."""
    from scep.azure.intune.credential import SecretSource
    from scep.azure.intune.credential import build_intune_client as build

    check_intune(settings)
    intune = settings.intune
    secret_source = None
    if intune.client.auth.value == "secret":
        secret_source = (
            SecretSource.fixed(intune.client_secret)
            if intune.client_secret
            else key_vault_secret(settings, intune.client_secret_name)
        )
    return build(intune.client, secret_source, certificate_password=intune.certificate_password)


def build_webhooks(settings: Settings, validator: ChallengeValidator) -> WebhookHandler | None:
    """The step-ca webhook handler, or None when no webhook secret is configured."""
    webhooks = settings.webhooks
    if not webhooks.enabled:
        return None
    from scep.challenge.webhook import build_webhook_handler

    secrets, setting = webhooks.secrets, "SCEP_WEBHOOK_SECRET"
    if not secrets:
        setting = "SCEP_WEBHOOK_SECRET_NAME"
        secrets = split_list(key_vault_secret(settings, webhooks.secret_name).current())
    try:
        return build_webhook_handler(secrets, validator, webhook_ids=webhooks.ids, setting=setting)
    except ValueError as error:  # its message starts with the setting's name
        raise ConfigError(setting, "is not usable: " + str(error).removeprefix(f"{setting}: ")) from None


def build_service(settings: Settings) -> ScepService:
    home = build_key_home(settings)
    ensure_local_ca(settings, home)
    options = replace(
        settings.service.options,
        key_custody="keyvault" if settings.uses_key_vault else "local",
        store_kind=settings.store_kind,
    )
    return ScepService(home, build_store(settings), build_validator(settings), options)


def configure_telemetry(settings: Settings) -> str:
    """Install the telemetry exporter SCEP_TELEMETRY and APPLICATIONINSIGHTS_* select, once per process (each
    Functions worker, each gunicorn worker after the fork); returns the exporter in effect."""
    from scep.azure.identity import build_credential as build
    from scep.azure.telemetry import configure

    identity = settings.identity

    def credential(client_id: str | None) -> Any:
        client_id = client_id or identity.client_id
        return build(client_id, choice=identity.credential, authority_host=identity.authority_host)

    return configure(settings.telemetry, credential)


# --- the process-wide accessors ---

_service: ScepService | None = None
_settings: Settings | None = None
_webhooks: WebhookHandler | bool | None = None
_lock = threading.RLock()


def settings() -> Settings:
    """The process's settings, read from the environment and checked once (or those given to reset())."""
    global _settings
    if _settings is None:
        with _lock:
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


def webhooks() -> WebhookHandler | None:
    """The process's step-ca webhook handler (None when not configured), built once."""
    global _webhooks
    if _webhooks is None:
        with _lock:
            if _webhooks is None:
                _webhooks = build_webhooks(settings(), service().validator) or False
    return _webhooks or None


def reset(new_settings: Settings | None = None) -> None:
    """Forget the cached service and webhooks, and the settings: read again on next use, or new_settings (a server
    that built its settings from the environment and its command line hands them to the process this way)."""
    global _service, _settings, _webhooks
    with _lock:
        _service = None
        _settings = new_settings
        _webhooks = None


def log_level(settings: Settings) -> str | None:
    """SCEP_LOG_LEVEL in lower case; None when unset (the caller's default applies)."""
    return settings.log_level


def ra_renew_days() -> int:
    return settings().ra_renew_days


def max_message_bytes() -> int:
    return settings().service.max_message_bytes
