"""The product as a WSGI application: what `scep serve` runs on gunicorn, and what a user runs on any WSGI server
behind their own reverse proxy (docs/serving.md):

    gunicorn -c python:scep.http.serving 'scep.http.wsgi:create_app()'

It turns a WSGI environ into a `web.Request` and hands it to the same `web.ScepHttp` object the Azure Functions
adapters call (backend.HTTP). The server parses HTTP; this module only bounds the body it reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any, BinaryIO
from urllib.parse import parse_qsl

from scep import config, logs
from scep.http import backend, web

READ_CHUNK = 64 * 1024
# A body over the limit is read and dropped up to this size before the 413 goes out: a client that is still sending
# (urllib sends the whole body before it reads; curl stops at an early answer) would otherwise meet a closed
# socket, and a close with unread data resets the connection, losing the 413 the client had not read yet.
DISCARD_LIMIT = 16 * 1024 * 1024
_ENVIRON_HEADERS = {"CONTENT_TYPE": "Content-Type", "CONTENT_LENGTH": "Content-Length"}

StartResponse = Callable[..., Any]


class WsgiApp:
    """A WSGI application over one `web.ScepHttp`."""

    def __init__(self, http: web.ScepHttp) -> None:
        self.http = http

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        reply = self.reply(environ)
        headers = [("Content-Type", reply.content_type), ("Content-Length", str(len(reply.body)))]
        headers += list(reply.headers.items())
        start_response(f"{reply.status} {HTTPStatus(reply.status).phrase}", headers)
        return [reply.body]

    def reply(self, environ: dict[str, Any]) -> web.HttpReply:
        limit = self.http.backend.max_message_bytes()
        body = read_body(environ, limit)
        if body is None:
            return web.too_large(limit)
        return self.http.handle(request_of(environ, body))


def request_of(environ: dict[str, Any], body: bytes) -> web.Request:
    params: dict[str, str] = {}
    for name, value in parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True):
        params.setdefault(name, value)  # the first value of a repeated name, as on the Functions host
    return web.Request(environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO", "/"), params,
                       headers_of(environ), body, environ.get("wsgi.url_scheme", "http"))


def headers_of(environ: dict[str, Any]) -> dict[str, str]:
    headers = {}
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            headers[key[5:].replace("_", "-").title()] = value
        elif key in _ENVIRON_HEADERS:
            headers[_ENVIRON_HEADERS[key]] = value
    return headers


def read_body(environ: dict[str, Any], limit: int) -> bytes | None:
    """The request body, or None when it is larger than `limit` (what was sent is then read and dropped, up to
    DISCARD_LIMIT, so the client can read the 413)."""
    stream: BinaryIO = environ["wsgi.input"]
    declared = environ.get("CONTENT_LENGTH") or ""
    if declared:
        length = int(declared)  # the server refuses a malformed Content-Length before the application runs
        if length > limit:
            _discard(stream, min(length, DISCARD_LIMIT))
            return None
        return stream.read(length)
    if not environ.get("wsgi.input_terminated"):
        return b""  # no Content-Length and no chunked body: PEP 3333 says there is nothing to read
    body = stream.read(limit + 1)
    if len(body) > limit:
        _discard(stream, DISCARD_LIMIT)
        return None
    return body


def _discard(stream: BinaryIO, at_most: int) -> None:
    left = at_most
    while left > 0:
        data = stream.read(min(READ_CHUNK, left))
        if not data:
            return
        left -= len(data)


def create_app() -> WsgiApp:
    """The product's WSGI application. Settings are checked here: a wrong one stops the worker at start, with a
    message naming it. Records of the product's loggers (and gunicorn's) are cleaned, at SCEP_LOG_LEVEL. Telemetry is
    configured here, in each worker after the fork: exporter threads do not survive a fork."""
    logs.configure_console(config.log_level(config.settings()) or "warning")
    config.configure_telemetry(config.settings())
    return WsgiApp(backend.HTTP)
