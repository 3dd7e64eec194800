"""The product as an ASGI application: what `scep serve` runs on gunicorn's ASGI worker, and what a user runs behind
their own reverse proxy (docs/serving.md):

    gunicorn -c python:scep.http.serving 'scep.http.asgi:create_app()'

It turns an ASGI HTTP scope into a `web.Request` and hands it to the same `web.ScepHttp` object the Azure Functions
adapters call (backend.HTTP). The server parses HTTP; this module only bounds the body it reads.

With local keys, SQLite and a static challenge the handling is synchronous CPU and disk work (RSA, DER, the store)
and runs on the worker's event loop: a worker answers one request at a time, as one interpreter lock would let it
anyway, while the loop reads the other connections' requests without a thread per connection, so a client that
stalls halfway holds nothing. When answering can wait on another service (Key Vault, Table Storage, Intune:
`Settings.handling_waits_on_network`), requests are handed to HANDLER_THREADS threads, so that one request waiting
for Intune does not hold the others back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qsl

from scep import config, logs
from scep.http import backend, web

# A body over the limit is read and dropped up to this size before the 413 goes out: a client that is still sending
# (urllib sends the whole body before it reads; curl stops at an early answer) would otherwise meet a closed
# socket, and a close with unread data resets the connection, losing the 413 the client had not read yet.
DISCARD_LIMIT = 16 * 1024 * 1024
HANDLER_THREADS = 8  # per worker, when answering can wait on another service

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class ClientGone(Exception):
    """The client disconnected before its request was read: there is no one to answer."""


class AsgiApp:
    """An ASGI application over one `web.ScepHttp`: requests handled on the event loop, or on `threads` threads."""

    def __init__(self, http: web.ScepHttp, threads: int = 0) -> None:
        self.http = http
        self.handler_threads = ThreadPoolExecutor(threads, thread_name_prefix="scep-request") if threads else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
        elif scope["type"] == "http":
            try:
                reply = await self.reply(scope, receive)
            except ClientGone:
                return
            await _respond(send, reply, with_body=scope["method"] != "HEAD")

    async def reply(self, scope: Scope, receive: Receive) -> web.HttpReply:
        limit = self.http.backend.max_message_bytes()
        body = await read_body(receive, limit)
        if body is None:
            return web.too_large(limit)
        request = request_of(scope, body)
        if self.handler_threads is None:
            return self.http.handle(request)
        return await asyncio.get_running_loop().run_in_executor(self.handler_threads, self.http.handle, request)


async def _lifespan(receive: Receive, send: Send) -> None:
    """Nothing to start or stop per worker (gunicorn's hooks run the jobs): acknowledge both."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _respond(send: Send, reply: web.HttpReply, with_body: bool) -> None:
    """The reply; a HEAD gets the headers a GET would (RFC 9110 section 9.3.2) and no body. Header names go out in
    the case NDES and the Functions host write them (Content-Type): HTTP says case does not matter, but a device
    client written against them may compare it."""
    headers = [(b"Content-Type", reply.content_type.encode("latin-1")),
               (b"Content-Length", str(len(reply.body)).encode("ascii"))]
    headers += [(name.encode("latin-1"), value.encode("latin-1")) for name, value in reply.headers.items()]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body if with_body else b""})


def request_of(scope: Scope, body: bytes) -> web.Request:
    params: dict[str, str] = {}
    query = scope.get("query_string", b"").decode("latin-1")
    for name, value in parse_qsl(query, keep_blank_values=True):
        params.setdefault(name, value)  # the first value of a repeated name, as on the Functions host
    return web.Request(scope["method"], scope["path"], params, headers_of(scope), body, scope.get("scheme", "http"))


def headers_of(scope: Scope) -> dict[str, str]:
    """Header names in the Title-Case the Functions host uses; a repeated header's values joined by commas."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers", ()):
        name, value = raw_name.decode("latin-1").title(), raw_value.decode("latin-1")
        headers[name] = f"{headers[name]},{value}" if name in headers else value
    return headers


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body, or None when it is larger than `limit` (what was sent is then read and dropped, up to
    DISCARD_LIMIT, so the client can read the 413)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        more = message.get("more_body", False)
        if size > limit:
            if more:
                await _discard(receive, size)
            return None
        chunks.append(chunk)
        if not more:
            return b"".join(chunks)


async def _discard(receive: Receive, size: int) -> None:
    """Take what the client is still sending, up to DISCARD_LIMIT in all."""
    more = True
    while more and size < DISCARD_LIMIT:
        message = await receive()
        if message["type"] != "http.request":
            return
        size += len(message.get("body", b""))
        more = message.get("more_body", False)


def create_app() -> AsgiApp:
    """The product's ASGI application. Settings are checked here: a wrong one stops the worker at start, with a
    message naming it. Records of the product's loggers (and gunicorn's) are cleaned, at SCEP_LOG_LEVEL. Telemetry is
    configured here, in each worker after the fork: exporter threads do not survive a fork."""
    settings = config.settings()
    logs.configure_console(config.log_level(settings) or "warning")
    config.configure_telemetry(settings)
    return AsgiApp(backend.HTTP, HANDLER_THREADS if settings.handling_waits_on_network else 0)
