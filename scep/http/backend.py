"""The process's `web.ScepHttp`, built on the composition root (config): the one request-handling object that the
Azure Functions adapters (functions.py) and the ASGI application (asgi.py) both call."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from scep import config
from scep.challenge.webhook import WebhookHandler
from scep.core import maintenance, revocation
from scep.core.ocsp import OcspResponder
from scep.core.service import ScepService
from scep.http import admin_api, web
from scep.http.revocation import build_responder
from scep.keys import CaKeys, CustodyError, KeyHome

if TYPE_CHECKING:
    from scep.azure.intune.revocation import CycleReport


class ConfiguredBackend:
    """web.Backend from config: one service per process, settings checked once."""

    def __init__(self) -> None:
        self._reported_keys: CaKeys | None = None
        self._ocsp: tuple[ScepService, OcspResponder] | None = None

    def service(self) -> ScepService:
        """The process's service; when it first serves, and after every key change, a CA or RA near or past its
        expiry is reported (maintenance.report_expiry logs each certificate once per process)."""
        service = config.service()
        try:
            keys = service.custody.keys()
        except CustodyError:
            return service  # the request that needs the keys answers and logs the failure
        if keys is not self._reported_keys:
            self._reported_keys = keys
            maintenance.report_expiry(keys)
        return service

    def max_message_bytes(self) -> int:
        return config.max_message_bytes()

    def webhooks(self) -> WebhookHandler | None:
        return config.webhooks()

    def ocsp(self) -> OcspResponder:
        """The process's OCSP responder (its cache lives as long as the service it answers for)."""
        service = self.service()
        if self._ocsp is None or self._ocsp[0] is not service:
            settings = config.settings().revocation
            responder = build_responder(
                service.store, home_of(service), settings.ocsp_window, settings.ocsp_signatures_per_minute
            )
            self._ocsp = (service, responder)
        return self._ocsp[1]

    def admin(self, action: str, request: web.Request) -> web.HttpReply:
        return admin_api.handle(action, request, self.service)


HTTP = web.ScepHttp(ConfiguredBackend())


def run_maintenance() -> None:
    """Renew the RA when it is due (SCEP_RA_RENEW_DAYS) and report a CA or RA near its expiry; the Functions timer
    runs it in Azure, one worker of `scep serve` at start and then daily."""
    maintenance.run_daily(config.service(), config.ra_renew_days())


def run_publication() -> revocation.PublicationReport:
    """Revoke withheld certificates and publish every CRL that is due; the Functions timer runs it hourly in Azure,
    the maintenance worker of `scep serve` at start and then hourly."""
    service = config.service()
    generations = revocation.signing_generations(home_of(service))
    return revocation.publish_due(service.store, generations, validity=service.options.crl_validity)


def run_intune_revocations() -> CycleReport | None:
    """One cycle of Intune's revocation requests when SCEP_CHALLENGE_MODE includes intune (None otherwise); the
    Functions timer runs it every 15 minutes in Azure, the maintenance worker of `scep serve` likewise."""
    settings = config.settings()
    if "intune" not in settings.modes:
        return None
    from scep.azure.intune.revocation import run_cycle

    service = config.service()
    client = config.build_intune_client(settings)
    try:
        home, validity = home_of(service), service.options.crl_validity
        return run_cycle(client, service.store, lambda: revocation.publish_now(service.store, home, validity))
    finally:
        client.close()


def home_of(service: ScepService) -> KeyHome:
    return cast(KeyHome, service.custody)  # config builds every service on a KeyHome
