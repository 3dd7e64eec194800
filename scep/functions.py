"""The HTTP functions: thin adapters from Azure Functions requests to the framework-free SCEP core.

Routes carry their own `api/` prefix (host.json sets routePrefix to ""), so that the paths SCEP clients use by
habit, such as /cgi-bin/pkiclient.exe, are served too.
"""

from __future__ import annotations

import json

import azure.functions as func

from scep import config, web

bp = func.Blueprint()

SCEP_ROUTES = {
    "scep": "api/scep",
    "scep_pkiclient": "api/scep/pkiclient.exe",
    "scep_cgi_bin": "cgi-bin/pkiclient.exe",
    "scep_mscep": "certsrv/mscep/mscep.dll",
    "scep_mscep_pkiclient": "certsrv/mscep/mscep.dll/pkiclient.exe",
}


def _response(reply: web.HttpReply) -> func.HttpResponse:
    return func.HttpResponse(
        body=reply.body, status_code=reply.status, headers=reply.headers, mimetype=reply.content_type
    )


def _scep(req: func.HttpRequest) -> func.HttpResponse:
    reply = web.handle_scep(
        config.service(), req.method, req.params, req.get_body() or b"", config.max_message_bytes()
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
    return _response(web.health(config.service()))


@bp.function_name("ca_pem")
@bp.route(route="api/ca.pem", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def ca_pem(req: func.HttpRequest) -> func.HttpResponse:
    return _response(web.ca_download(config.service(), "pem"))


@bp.function_name("ca_der")
@bp.route(route="api/ca.der", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def ca_der(req: func.HttpRequest) -> func.HttpResponse:
    return _response(web.ca_download(config.service(), "der"))


@bp.function_name("ca_crt")
@bp.route(route="api/ca.crt", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def ca_crt(req: func.HttpRequest) -> func.HttpResponse:
    return _response(web.ca_download(config.service(), "der"))


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
