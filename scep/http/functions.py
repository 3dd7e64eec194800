"""The Azure Functions adapters: every route of web.ROUTES registered as an HTTP function of the blueprint, each
calling the process's one `web.ScepHttp` (backend.HTTP), and the timers: daily maintenance (expiry, RA and OCSP-signer
renewal), hourly CRL publication and Intune revocation requests every 15 minutes.

Routes carry their own `api/` prefix (host.json sets routePrefix to ""), so that the paths SCEP clients use by
habit, such as /cgi-bin/pkiclient.exe, are served too.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import azure.functions as func

from scep.http import web
from scep.http.backend import HTTP, run_intune_revocations, run_maintenance, run_publication

bp = func.Blueprint()

# Daily at 03:17 UTC (NCRONTAB: second minute hour day month day-of-week). The host runs one occurrence across
# all instances (a blob lease in AzureWebJobsStorage) and, with use_monitor, catches up a missed one.
MAINTENANCE_SCHEDULE = "0 17 3 * * *"
# Hourly at minute 7: CRLs republished at half-life, withheld certificates revoked (a revocation publishes at once).
PUBLICATION_SCHEDULE = "0 7 * * * *"
# Every 15 minutes: Intune's revocation requests (nothing happens unless SCEP_CHALLENGE_MODE includes intune).
INTUNE_REVOCATION_SCHEDULE = "0 */15 * * * *"


def request_of(req: func.HttpRequest) -> web.Request:
    url = urlsplit(req.url)
    return web.Request(req.method, url.path, req.params, req.headers, req.get_body() or b"", url.scheme or "http")


def response_of(reply: web.HttpReply) -> func.HttpResponse:
    # The Content-Type header is set whole: given only a mimetype, azure.functions' HttpResponseConverter.encode
    # appends "; charset=<charset>" to every text/* type, and a second one to a type that already has one.
    mimetype = reply.content_type.partition(";")[0].strip()
    headers = {**reply.headers, "Content-Type": reply.content_type}
    return func.HttpResponse(body=reply.body, status_code=reply.status, headers=headers, mimetype=mimetype)


def _register(route: web.Route) -> None:
    def handler(req: func.HttpRequest) -> func.HttpResponse:
        return response_of(HTTP.call(route, request_of(req)))

    handler.__name__ = route.name
    # Admin routes need a function key before the app's own admin check runs; the others are anonymous.
    level = func.AuthLevel.FUNCTION if route.admin else func.AuthLevel.ANONYMOUS
    register = bp.route(route=route.path, methods=list(route.methods), auth_level=level)
    bp.function_name(route.name)(register(handler))


for _route in HTTP.routes:
    _register(_route)


@bp.function_name("maintenance")
@bp.timer_trigger(schedule=MAINTENANCE_SCHEDULE, arg_name="timer", run_on_startup=False, use_monitor=True)
def maintenance_daily(timer: func.TimerRequest) -> None:
    run_maintenance()


@bp.function_name("crl_publication")
@bp.timer_trigger(schedule=PUBLICATION_SCHEDULE, arg_name="timer", run_on_startup=False, use_monitor=True)
def publication_hourly(timer: func.TimerRequest) -> None:
    run_publication()


@bp.function_name("intune_revocations")
@bp.timer_trigger(schedule=INTUNE_REVOCATION_SCHEDULE, arg_name="timer", run_on_startup=False, use_monitor=True)
def intune_revocations(timer: func.TimerRequest) -> None:
    run_intune_revocations()
