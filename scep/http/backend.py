"""The process's `web.ScepHttp`, built on the composition root (config): the one request-handling object that the
Azure Functions adapters (functions.py) and the WSGI application (wsgi.py) both call."""

from __future__ import annotations

from scep import config
from scep.challenge.webhook import WebhookHandler
from scep.core import maintenance
from scep.core.service import ScepService
from scep.http import admin_api, web
from scep.keys import CaKeys, CustodyError


class ConfiguredBackend:
    """web.Backend from config: one service per process, settings checked once."""

    def __init__(self) -> None:
        self._reported_keys: CaKeys | None = None

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

    def admin(self, action: str, request: web.Request) -> web.HttpReply:
        return admin_api.handle(action, request, self.service)


HTTP = web.ScepHttp(ConfiguredBackend())


def run_maintenance() -> None:
    """Renew the RA when it is due (SCEP_RA_RENEW_DAYS) and report a CA or RA near its expiry; the Functions timer
    runs it in Azure, one worker of `scep serve` at start and then daily."""
    maintenance.run_daily(config.service(), config.ra_renew_days())
