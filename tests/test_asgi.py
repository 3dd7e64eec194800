"""The ASGI application (scep/http/asgi.py) in process, and the proof that it and the Azure Functions adapters run
the same request handling: both are built from web.ROUTES and call the one web.ScepHttp object."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import azure.functions as func
import pytest

from scep import config
from scep.http import backend, web
from scep.http.asgi import DISCARD_LIMIT, AsgiApp, create_app
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
def app(configured) -> AsgiApp:
    return create_app()


@pytest.fixture(scope="module")
def functions(configured) -> dict[str, Any]:
    """Every Azure Functions function of function_app.py by name, as the host calls it."""
    return {function.get_function_name(): function.get_user_function() for function in registered_functions()}


class Body:
    """The receive callable of one request: its body in chunks, counting what the application took."""

    def __init__(self, data: bytes = b"", chunk: int = 64 * 1024, disconnect_after: int | None = None) -> None:
        self.chunks = [data[start : start + chunk] for start in range(0, len(data), chunk)] or [b""]
        self.left = len(self.chunks) if disconnect_after is None else disconnect_after
        self.consumed = 0

    async def __call__(self) -> dict[str, Any]:
        if self.left == 0:
            if not self.chunks:  # a server's receive would wait here until the client goes away
                raise AssertionError("the application waits for more after the whole body")
            return {"type": "http.disconnect"}
        self.left -= 1
        chunk = self.chunks.pop(0)
        self.consumed += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": bool(self.chunks)}


def scope(method: str, path: str, query: str = "", headers: dict[str, str] | None = None) -> dict[str, Any]:
    raw_headers = [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
    return {"type": "http", "method": method, "path": path, "query_string": query.encode(), "headers": raw_headers,
            "scheme": "http"}


def sent_messages(app: AsgiApp, request: dict[str, Any], body: Body) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(request, body, send))
    return sent


def call(app: AsgiApp, request: dict[str, Any], body: Body | None = None) -> tuple[int, dict[str, str], bytes]:
    start, content = sent_messages(app, request, body or Body())
    headers = {name.decode().title(): value.decode() for name, value in start["headers"]}
    assert headers["Content-Length"] == str(len(content["body"]))
    return start["status"], headers, content["body"]


def test_every_route_is_served_with_its_methods(app):
    paths = {route.path for route in web.ROUTES}
    assert {"api/scep", "api/scep/pkiclient.exe", "cgi-bin/pkiclient.exe", "certsrv/mscep/mscep.dll",
            "certsrv/mscep/mscep.dll/pkiclient.exe", "api/health", "api/ca.pem", "api/ca.der", "api/ca.crt",
            "api/webhook/scepchallenge", "api/webhook/notify", "status"} <= paths
    for route in web.ROUTES:
        if route.path.startswith("api/webhook") or route.admin or "{" in route.path:
            continue  # POST only, answered 404 while webhooks are not configured; admin routes: test_admin_api;
            # templates (CRL, CA by id, OCSP GET): test_revocation_http
        status, _, _ = call(app, scope("GET", "/" + route.path, "operation=GetCACaps"))
        assert status == 200, route.path


def test_literal_paths_match_case_insensitively_with_a_trailing_slash(app):
    assert call(app, scope("GET", "/CGI-BIN/PKIClient.exe/", "operation=GetCACaps"))[0] == 200


def test_unknown_path_is_404_and_wrong_method_is_405_with_allow(app):
    assert call(app, scope("GET", "/api/nowhere"))[0] == 404
    status, headers, _ = call(app, scope("DELETE", "/api/scep"))
    assert (status, headers["Allow"]) == (405, "GET, POST")
    status, headers, _ = call(app, scope("POST", "/api/health"), Body(b"x"))
    assert (status, headers["Allow"]) == (405, "GET")


@pytest.mark.parametrize("threads,on_the_loop", [(0, True), (2, False)])
def test_requests_are_handled_on_the_loop_or_on_threads(threads, on_the_loop):
    handled_on: list[str] = []

    def where(_: web.Backend, request: web.Request) -> web.HttpReply:
        handled_on.append(threading.current_thread().name)
        return web.text(200, "ok")

    app = AsgiApp(web.ScepHttp(backend.HTTP.backend, (web.Route("where", "where", ("GET",), where),)), threads)
    assert call(app, scope("GET", "/where"))[0] == 200
    assert (handled_on == [threading.current_thread().name]) is on_the_loop
    assert handled_on[0].startswith("scep-request") is not on_the_loop


def test_the_local_app_handles_on_the_loop(app):
    assert not config.settings().handling_waits_on_network and app.handler_threads is None


def test_query_plus_is_a_space_and_the_first_value_wins(app):
    captured: list[web.Request] = []

    def echo(_: web.Backend, request: web.Request) -> web.HttpReply:
        captured.append(request)
        return web.text(200, "ok")

    echoing = AsgiApp(web.ScepHttp(backend.HTTP.backend, (web.Route("echo", "echo", ("GET",), echo),)))
    headers = {"X-Smallstep-Signature": "sig", "Content-Type": "text/plain"}
    call(echoing, scope("GET", "/echo", "message=a+b%2Bc&message=second&empty=", headers))
    (request,) = captured
    assert request.params == {"message": "a b+c", "empty": ""}
    assert request.headers["X-Smallstep-Signature"] == "sig" and request.headers["Content-Type"] == "text/plain"


def test_body_at_the_limit_is_read_and_handled(app):
    request = scope("POST", "/api/scep", "operation=PKIOperation")
    status, _, body = call(app, request, Body(b"\x30" * MAX_MESSAGE_BYTES, chunk=1000))
    assert status == 400 and b"malformed" in body


def test_body_over_the_limit_is_413_and_read_to_the_end(app):
    body = Body(b"x" * (5 * 1024 * 1024))
    status, _, answer = call(app, scope("POST", "/api/scep", "operation=PKIOperation"), body)
    assert (status, answer) == (413, f"message larger than {MAX_MESSAGE_BYTES} bytes\n".encode())
    assert body.consumed == 5 * 1024 * 1024  # so that a client still sending can read the 413


def test_head_gets_the_headers_of_the_answer_and_no_body(app):
    start, content = sent_messages(app, scope("HEAD", "/api/health"), Body())
    assert dict(start["headers"])[b"Content-Length"] != b"0" and content["body"] == b""


def test_a_whole_body_just_over_the_limit_is_413_at_once(app):
    body = Body(b"x" * (MAX_MESSAGE_BYTES + 1), chunk=MAX_MESSAGE_BYTES * 2)
    assert call(app, scope("POST", "/api/scep", "operation=PKIOperation"), body)[0] == 413


def test_discarding_stops_at_the_discard_limit(app):
    body = Body(b"x" * (DISCARD_LIMIT + 4096))
    assert call(app, scope("POST", "/api/scep", "operation=PKIOperation"), body)[0] == 413
    assert body.consumed == DISCARD_LIMIT


def test_a_client_gone_before_its_body_ended_gets_no_answer(app):
    body = Body(b"\x30" * 3000, chunk=1000, disconnect_after=2)
    assert sent_messages(app, scope("POST", "/api/scep", "operation=PKIOperation"), body) == []


def test_lifespan_startup_and_shutdown_are_acknowledged(app):
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

    async def receive() -> dict[str, Any]:
        return next(messages)

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app({"type": "lifespan"}, receive, send))
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]


def test_webhooks_unconfigured_are_404(app):
    status, _, body = call(app, scope("POST", "/api/webhook/notify"), Body(b"{}"))
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


def asgi_reply(app, route: web.Route, method: str, params: dict[str, str], body: bytes):
    query = "&".join(f"{name}={value}" for name, value in params.items())
    status, headers, answer = call(app, scope(method, "/" + route.path, query), Body(body))
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
        through_asgi = asgi_reply(app, route, method, params, body)
        assert through_functions == through_asgi, route.path
    if len(body) <= MAX_MESSAGE_BYTES:  # an oversized body never reaches the handler under ASGI
        assert handled == [(backend.HTTP, route) for route in web.ROUTES[:5] for _ in range(2)]


@pytest.mark.parametrize("name", ["health", "ca_pem", "ca_der", "ca_crt"])
def test_downloads_and_health_are_the_same_through_both_adapters(app, functions, name):
    (route,) = [route for route in web.ROUTES if route.name == name]
    assert functions_reply(functions, route, "GET", {}, b"") == asgi_reply(app, route, "GET", {}, b"")
    if name == "health":
        assert json.loads(asgi_reply(app, route, "GET", {}, b"")[2])["status"] == "ok"
