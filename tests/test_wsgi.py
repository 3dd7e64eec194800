"""The WSGI application (scep/http/wsgi.py) in process, and the proof that it and the Azure Functions adapters run
the same request handling: both are built from web.ROUTES and call the one web.ScepHttp object."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import azure.functions as func
import pytest

from scep import config
from scep.http import backend, web
from scep.http.wsgi import DISCARD_LIMIT, WsgiApp, create_app
from tests.conftest import CHALLENGE
from tests.test_functions import TIMERS, registered_functions

MAX_MESSAGE_BYTES = 8192


@pytest.fixture(scope="module")
def configured(tmp_path_factory) -> Iterator[None]:
    patch = pytest.MonkeyPatch()
    patch.setenv("SCEP_DATA_DIR", str(tmp_path_factory.mktemp("data")))
    patch.setenv("SCEP_CHALLENGE", CHALLENGE)
    patch.setenv("SCEP_MAX_MESSAGE_BYTES", str(MAX_MESSAGE_BYTES))
    config.reset()
    yield
    config.reset()
    patch.undo()


@pytest.fixture(scope="module")
def app(configured) -> WsgiApp:
    return create_app()


@pytest.fixture(scope="module")
def functions(configured) -> dict[str, Any]:
    """Every Azure Functions function of function_app.py by name, as the host calls it."""
    return {function.get_function_name(): function.get_user_function() for function in registered_functions()}


class Stream(io.BytesIO):
    """wsgi.input that counts what the application read."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.consumed = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.consumed += len(data)
        return data


def environ(method: str, path: str, query: str = "", body: bytes = b"", **extra: Any) -> dict[str, Any]:
    return {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query, "wsgi.input": Stream(body),
            "CONTENT_LENGTH": str(len(body)) if body else "", **extra}


def call(app: WsgiApp, env: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    answer: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        answer["status"], answer["headers"] = int(status.split()[0]), dict(headers)

    body = b"".join(app(env, start_response))
    assert answer["headers"]["Content-Length"] == str(len(body))
    return answer["status"], answer["headers"], body


def test_every_route_is_served_with_its_methods(app):
    paths = {route.path for route in web.ROUTES}
    assert {"api/scep", "api/scep/pkiclient.exe", "cgi-bin/pkiclient.exe", "certsrv/mscep/mscep.dll",
            "certsrv/mscep/mscep.dll/pkiclient.exe", "api/health", "api/ca.pem", "api/ca.der", "api/ca.crt",
            "api/webhook/scepchallenge", "api/webhook/notify", "status"} <= paths
    for route in web.ROUTES:
        if route.path.startswith("api/webhook") or route.admin or "{" in route.path:
            continue  # POST only, answered 404 while webhooks are not configured; admin routes: test_admin_api;
            # templates (CRL, CA by id, OCSP GET): test_revocation_http
        status, _, _ = call(app, environ("GET", "/" + route.path, "operation=GetCACaps"))
        assert status == 200, route.path


def test_literal_paths_match_case_insensitively_with_a_trailing_slash(app):
    assert call(app, environ("GET", "/CGI-BIN/PKIClient.exe/", "operation=GetCACaps"))[0] == 200


def test_unknown_path_is_404_and_wrong_method_is_405_with_allow(app):
    assert call(app, environ("GET", "/api/nowhere"))[0] == 404
    status, headers, _ = call(app, environ("DELETE", "/api/scep"))
    assert (status, headers["Allow"]) == (405, "GET, POST")
    status, headers, _ = call(app, environ("POST", "/api/health", body=b"x"))
    assert (status, headers["Allow"]) == (405, "GET")


def test_query_plus_is_a_space_and_the_first_value_wins(app):
    captured: list[web.Request] = []

    def echo(_: web.Backend, request: web.Request) -> web.HttpReply:
        captured.append(request)
        return web.text(200, "ok")

    echoing = WsgiApp(web.ScepHttp(backend.HTTP.backend, (web.Route("echo", "echo", ("GET",), echo),)))
    call(echoing, environ("GET", "/echo", "message=a+b%2Bc&message=second&empty=",
                          HTTP_X_SMALLSTEP_SIGNATURE="sig", CONTENT_TYPE="text/plain"))
    (request,) = captured
    assert request.params == {"message": "a b+c", "empty": ""}
    assert request.headers["X-Smallstep-Signature"] == "sig" and request.headers["Content-Type"] == "text/plain"


def test_body_at_the_limit_is_read_and_handled(app):
    status, _, body = call(app, environ("POST", "/api/scep", "operation=PKIOperation", b"\x30" * MAX_MESSAGE_BYTES))
    assert status == 400 and b"malformed" in body


def test_declared_body_over_the_limit_is_413_and_read_to_the_end(app):
    env = environ("POST", "/api/scep", "operation=PKIOperation", b"x" * (5 * 1024 * 1024))
    status, _, body = call(app, env)
    assert (status, body) == (413, f"message larger than {MAX_MESSAGE_BYTES} bytes\n".encode())
    assert env["wsgi.input"].consumed == 5 * 1024 * 1024  # so that a client still sending can read the 413


def test_discarding_stops_at_the_discard_limit(app):
    env = environ("POST", "/api/scep", "operation=PKIOperation", b"x" * (DISCARD_LIMIT + 4096))
    assert call(app, env)[0] == 413
    assert env["wsgi.input"].consumed == DISCARD_LIMIT


def test_chunked_body_over_the_limit_is_413(app):
    env = environ("POST", "/api/scep", "operation=PKIOperation", **{"wsgi.input_terminated": True})
    env["wsgi.input"] = Stream(b"y" * (MAX_MESSAGE_BYTES * 3))
    assert call(app, env)[0] == 413
    assert env["wsgi.input"].consumed == MAX_MESSAGE_BYTES * 3


def test_webhooks_unconfigured_are_404(app):
    status, _, body = call(app, environ("POST", "/api/webhook/notify", body=b"{}"))
    assert status == 404 and b"SCEP_WEBHOOK_SECRET" in body


# --- the same request handling as the Functions host ---------------------------------------------------------


def test_both_adapters_are_built_from_one_table_and_one_handler_object(app, functions):
    assert app.http is backend.HTTP and backend.HTTP.routes is web.ROUTES
    http_functions = {name for name in functions if name not in TIMERS}
    assert http_functions == {route.name for route in web.ROUTES}


def functions_reply(functions, route: web.Route, method: str, params: dict[str, str], body: bytes):
    request = func.HttpRequest(method, f"http://localhost/{route.path}", params=params, body=body)
    response = functions[route.name](request)
    return response.status_code, response.headers["Content-Type"], response.get_body()


def wsgi_reply(app, route: web.Route, method: str, params: dict[str, str], body: bytes):
    query = "&".join(f"{name}={value}" for name, value in params.items())
    status, headers, answer = call(app, environ(method, "/" + route.path, query, body))
    return status, headers["Content-Type"], answer


@pytest.mark.parametrize(
    "method,params,body",
    [
        ("GET", {"operation": "GetCACaps"}, b""),
        ("GET", {"operation": "GetCACert"}, b""),
        ("GET", {"operation": "GetNextCACert"}, b""),
        ("GET", {"operation": "Bogus"}, b""),
        ("GET", {}, b""),
        ("GET", {"operation": "PKIOperation", "message": "%%%"}, b""),
        ("POST", {"operation": "PKIOperation"}, b"\x30\x82\xff\xff" + b"\x00" * 100),
        ("POST", {"operation": "PKIOperation"}, b"x" * (MAX_MESSAGE_BYTES + 1)),
    ],
)
def test_the_same_request_gets_the_same_reply_through_both_adapters(app, functions, monkeypatch, method, params,
                                                                       body):
    handled: list[tuple[web.ScepHttp, web.Route]] = []
    real_call = web.ScepHttp.call

    def spy(self: web.ScepHttp, route: web.Route, request: web.Request) -> web.HttpReply:
        handled.append((self, route))
        return real_call(self, route, request)

    monkeypatch.setattr(web.ScepHttp, "call", spy)
    for route in web.ROUTES[:5]:  # the SCEP paths
        through_functions = functions_reply(functions, route, method, params, body)
        through_wsgi = wsgi_reply(app, route, method, params, body)
        assert through_functions == through_wsgi, route.path
    if len(body) <= MAX_MESSAGE_BYTES:  # an oversized body never reaches the handler under WSGI
        assert handled == [(backend.HTTP, route) for route in web.ROUTES[:5] for _ in range(2)]


@pytest.mark.parametrize("name", ["health", "ca_pem", "ca_der", "ca_crt"])
def test_downloads_and_health_are_the_same_through_both_adapters(app, functions, name):
    (route,) = [route for route in web.ROUTES if route.name == name]
    assert functions_reply(functions, route, "GET", {}, b"") == wsgi_reply(app, route, "GET", {}, b"")
    if name == "health":
        assert json.loads(wsgi_reply(app, route, "GET", {}, b"")[2])["status"] == "ok"
