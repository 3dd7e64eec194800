"""The HTTP functions: thin adapters from Azure Functions requests to the framework-free SCEP core.

Routes carry their own `api/` prefix (host.json sets routePrefix to ""), so that the paths SCEP clients use by
habit, such as /cgi-bin/pkiclient.exe, are served too.
"""

from __future__ import annotations

import json

import azure.functions as func

from scep import config
from scep.core import maintenance
from scep.core.service import ScepService
from scep.http import web
from scep.keys import CaKeys, CustodyError

bp = func.Blueprint()

# Daily at 03:17 UTC (NCRONTAB: second minute hour day month day-of-week). The host runs one occurrence across
# all instances (a blob lease in AzureWebJobsStorage) and, with use_monitor, catches up a missed one.
MAINTENANCE_SCHEDULE = "0 17 3 * * *"

SCEP_ROUTES = {
    "scep": "api/scep",
    "scep_pkiclient": "api/scep/pkiclient.exe",
    "scep_cgi_bin": "cgi-bin/pkiclient.exe",
    "scep_mscep": "certsrv/mscep/mscep.dll",
    "scep_mscep_pkiclient": "certsrv/mscep/mscep.dll/pkiclient.exe",
}


def _response(reply: web.HttpReply) -> func.HttpResponse:
    # The Content-Type header is set whole: given only a mimetype, azure.functions' HttpResponseConverter.encode
    # appends "; charset=<charset>" to every text/* type, and a second one to a type that already has one.
    mimetype = reply.content_type.partition(";")[0].strip()
    headers = {**reply.headers, "Content-Type": reply.content_type}
    return func.HttpResponse(body=reply.body, status_code=reply.status, headers=headers, mimetype=mimetype)


_reported_keys: CaKeys | None = None


def _service() -> ScepService:
    """The process's service; when it first serves, and after every key change, a CA or RA near or past its
    expiry is reported (maintenance.report_expiry logs each certificate once per process)."""
    global _reported_keys
    service = config.service()
    try:
        keys = service.custody.keys()
    except CustodyError:
        return service  # the request that needs the keys answers and logs the failure
    if keys is not _reported_keys:
        _reported_keys = keys
        maintenance.report_expiry(keys)
    return service


def _scep(req: func.HttpRequest) -> func.HttpResponse:
    reply = web.handle_scep(
        _service(), req.method, req.params, req.get_body() or b"", config.max_message_bytes()
    )
    return _response(reply)


def _register_scep_route(name: str, route: str) -> None:
    def handler(req: func.HttpRequest) -> func.HttpResponse:
        return _scep(req)

    handler.__name__ = name
    bp.function_name(name)(bp.route(route=route, methods=["GET", "POST"], auth_level=func.AuthLevel.ANONYMOUS)(handler))


for _name, _route in SCEP_ROUTES.items():
    _register_scep_route(_name, _route)


@bp.function_name("health")
@bp.route(route="api/health", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def health(req: func.HttpRequest) -> func.HttpResponse:
    return _response(web.health(_service()))


@bp.function_name("ca_pem")
@bp.route(route="api/ca.pem", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def ca_pem(req: func.HttpRequest) -> func.HttpResponse:
    return _response(web.ca_download(_service(), "pem"))


@bp.function_name("ca_der")
@bp.route(route="api/ca.der", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def ca_der(req: func.HttpRequest) -> func.HttpResponse:
    return _response(web.ca_download(_service(), "der"))


@bp.function_name("ca_crt")
@bp.route(route="api/ca.crt", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def ca_crt(req: func.HttpRequest) -> func.HttpResponse:
    return _response(web.ca_download(_service(), "der"))


def _webhook(req: func.HttpRequest, kind: str) -> func.HttpResponse:
    handler = config.webhooks()
    if handler is None:
        return _response(web.text(404, "validation webhooks are not configured (SCEP_WEBHOOK_SECRET)"))
    body = req.get_body() or b""
    if len(body) > config.max_message_bytes():
        return _response(web.text(413, "request too large"))
    handle = handler.handle_challenge if kind == "challenge" else handler.handle_notify
    status, payload = handle(body, dict(req.headers))
    return _response(web.HttpReply(status, json.dumps(payload).encode("utf-8"), "application/json"))


@bp.function_name("webhook_scepchallenge")
@bp.route(route="api/webhook/scepchallenge", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
def webhook_scepchallenge(req: func.HttpRequest) -> func.HttpResponse:
    return _webhook(req, "challenge")


@bp.function_name("webhook_notify")
@bp.route(route="api/webhook/notify", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
def webhook_notify(req: func.HttpRequest) -> func.HttpResponse:
    return _webhook(req, "notify")


@bp.function_name("maintenance")
@bp.timer_trigger(schedule=MAINTENANCE_SCHEDULE, arg_name="timer", run_on_startup=False, use_monitor=True)
def maintenance_daily(timer: func.TimerRequest) -> None:
    run_maintenance()


def run_maintenance() -> None:
    """Renew the RA when it is due (SCEP_RA_RENEW_DAYS) and report a CA or RA near its expiry; the timer above
    runs it in Azure, `scep serve` in one of its processes."""
    maintenance.run_daily(config.service(), config.ra_renew_days())
