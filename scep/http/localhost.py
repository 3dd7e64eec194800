"""Serve a Functions app's own HTTP functions over plain HTTP, without Azure Functions Core Tools.

`scep serve` and `func start` run the same `func.FunctionApp`: this module reads the HTTP-triggered
functions the app registered (directly or through blueprints), routes requests to them the way the
Functions host does, and answers with what they return.

How it behaves, and where it knowingly follows the Functions host:

- URLs are `/{routePrefix}/{route}`; `routePrefix` comes from host.json `extensions.http.routePrefix`
  (default "api", "" for none). Literal segments match case-insensitively. Route templates may hold
  parameters: `{name}`, `{name?}`, `{name=default}`, `{name:int}` (constraints int, long, bool, alpha, guid)
  and a trailing catch-all `{*rest}`. A route of None means the function's name.
- A path that matches but not with the request's method gets 405 with an Allow header; no match gets 404.
- The query string becomes `req.params`, first value per key. Like the host (ASP.NET), `+` is decoded to a
  space; a base64 value sent unescaped therefore arrives with spaces where it had `+`.
- Functions whose auth level is not anonymous need `x-functions-key: <key>` or `?code=<key>` matching the
  server's `function_key`; with no key configured they answer 401.
- Request bodies are bounded (`max_body_bytes`, checked before reading: 413), need Content-Length or
  chunked transfer coding on POST/PUT/PATCH (411), and must arrive within the connection timeout.
- An exception escaping a function is logged with its traceback and answered with a bare 500.
- HTTP/1.1 keep-alive; every reply carries Content-Length.
- `workers` > 1 pre-forks that many processes that accept on one shared listening socket, each serving
  connections on threads; the parent restarts a child that dies and stops them all on SIGTERM/SIGINT.
- A reply's Content-Type is the function's own header when it sets one; otherwise its mimetype, followed by
  "; charset=<charset>" for text/* types, as azure.functions' HttpResponseConverter.encode writes it.
- `background`, when given, runs in one process of the tree on a daemon thread: once at start, then every
  `background_interval` seconds (a job the Functions host would run from a timer trigger). With pre-forked
  workers it runs in the first worker, and in its replacement when that one dies: the supervisor forks and
  therefore runs no threads of its own. An exception it raises is logged and the next run still happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hmac
import importlib
import inspect
import json
import logging
import os
import re
import selectors
import signal
import socket
import socketserver
import sys
import threading
import time
import urllib.parse
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import azure.functions as func
from azure.functions.decorators.http import HttpTrigger

logger = logging.getLogger(__name__)

DEFAULT_ROUTE_PREFIX = "api"
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
DEFAULT_CONNECTION_TIMEOUT = 30.0
DEFAULT_BACKLOG = 1024
DEFAULT_BACKGROUND_INTERVAL = 24 * 3600.0

_POLL_SECONDS = 0.5
_SUPERVISE_SECONDS = 0.2
_STOP_GRACE_SECONDS = 10.0
_QUICK_DEATH_SECONDS = 1.0
_MAX_RESPAWN_DELAY = 5.0
_LINGER_SECONDS = 1.0
_LINGER_MAX_BYTES = 256 * 1024
_MAX_CHUNK_LINE = 1024
_MAX_HEADER_LINE = 65536
_MAX_HEADERS = 100
_MAX_TRAILER_LINES = 64
_MAX_QUERY_FIELDS = 1000
_METHODS_NEEDING_LENGTH = frozenset({"POST", "PUT", "PATCH"})
_RESPONSE_HEADERS_WE_SET = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})
_NO_BODY_STATUSES = frozenset({204, 304})
_DIGITS = re.compile(r"[0-9]{1,18}")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")
_REASONS = {status.value: status.phrase for status in HTTPStatus}


# --------------------------------------------------------------------------------------------- loading


def load_function_app(spec: str = "function_app:app", app_dir: Path | None = None) -> tuple[Any, str]:
    """Import `module:attribute` from `app_dir` (default: the current directory) and read its host.json.

    Returns the FunctionApp and the route prefix ("" when the app has none).
    """
    directory = Path(app_dir) if app_dir is not None else Path.cwd()
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"function app spec {spec!r} must look like 'module:attribute'")
    directory_text = str(directory.resolve())
    if directory_text not in sys.path:
        sys.path.insert(0, directory_text)
    app = getattr(importlib.import_module(module_name), attribute, None)
    if not isinstance(app, func.FunctionRegister):
        raise TypeError(f"{spec} is not an azure.functions.FunctionApp (got {type(app).__name__})")
    return app, read_route_prefix(directory / "host.json")


def read_route_prefix(host_json: Path) -> str:
    """`extensions.http.routePrefix` from host.json, "api" when the file or the setting is absent."""
    try:
        settings = json.loads(host_json.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        return DEFAULT_ROUTE_PREFIX
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {host_json}: {error}") from error
    prefix = settings.get("extensions", {}).get("http", {}).get("routePrefix", DEFAULT_ROUTE_PREFIX)
    if not isinstance(prefix, str):
        raise ValueError(f"{host_json}: extensions.http.routePrefix must be a string")
    return prefix.strip("/")


_functions_by_app: weakref.WeakKeyDictionary[Any, list[Any]] = weakref.WeakKeyDictionary()
_functions_lock = threading.Lock()


def app_functions(app: Any) -> list[Any]:
    """`app.get_functions()`, remembered: a FunctionApp refuses to list its functions twice."""
    with _functions_lock:
        functions = _functions_by_app.get(app)
        if functions is None:
            functions = _functions_by_app[app] = app.get_functions()
        return functions


# --------------------------------------------------------------------------------------------- routing

_CONSTRAINTS = {
    "int": r"-?[0-9]+",
    "long": r"-?[0-9]+",
    "bool": r"(?:true|false)",
    "alpha": r"[A-Za-z]+",
    "guid": r"\{?[0-9A-Fa-f]{8}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{12}\}?",
}
_PARAMETER = re.compile(r"\{(?P<star>\*{1,2})?(?P<name>[A-Za-z_]\w*)(?::(?P<constraint>\w+))?"
                        r"(?P<optional>\?)?(?:=(?P<default>[^}]*))?\}")
# Segment kinds, best first, for the host's precedence: literal beats parameter beats catch-all.
_LITERAL, _COMPLEX, _CONSTRAINED, _PLAIN, _OPTIONAL, _CATCH_ALL = range(6)


@dataclass(frozen=True)
class _Route:
    function_name: str
    template: str
    methods: frozenset[str] | None
    anonymous: bool
    pattern: re.Pattern[str]
    literal_path: str | None
    rank: tuple[int, ...]
    defaults: tuple[tuple[str, str], ...]
    call: Callable[[func.HttpRequest], Any]

    def allows(self, method: str) -> bool:
        return self.methods is None or method in self.methods


def _segment_regex(segment: str) -> tuple[str, int]:
    whole = _PARAMETER.fullmatch(segment)
    if whole and not whole["star"] and not whole["optional"] and whole["default"] is None:
        return _parameter_group(whole, "[^/]+"), _CONSTRAINED if whole["constraint"] else _PLAIN
    pieces, position, kind = [], 0, _LITERAL
    for found in _PARAMETER.finditer(segment):
        if found["star"] or found["optional"] or found["default"] is not None:
            raise ValueError(f"route segment {segment!r}: optional and catch-all parameters must stand alone")
        pieces.append(re.escape(segment[position:found.start()]))
        pieces.append(_parameter_group(found, "[^/]+?"))
        position, kind = found.end(), _COMPLEX
    if "{" in segment[position:] or "}" in segment[position:]:
        raise ValueError(f"route segment {segment!r} is not a valid route template")
    pieces.append(re.escape(segment[position:]))
    return "".join(pieces), kind


def _parameter_group(found: re.Match[str], default_pattern: str) -> str:
    constraint = found["constraint"]
    if constraint is None:
        return f"(?P<{found['name']}>{default_pattern})"
    if constraint.lower() not in _CONSTRAINTS:
        raise ValueError(f"route constraint {constraint!r} is not supported by this server")
    return f"(?P<{found['name']}>{_CONSTRAINTS[constraint.lower()]})"


def _compile_route(prefix: str, template: str) -> tuple[re.Pattern[str], str | None, tuple[int, ...], dict]:
    """Regex for `/{prefix}/{template}`, the lower-cased path when it has no parameters, and its rank."""
    segments = [s for s in prefix.split("/") if s] + [s for s in template.strip("/").split("/") if s]
    pattern, rank, defaults = "", [], {}
    for index, segment in enumerate(segments):
        whole = _PARAMETER.fullmatch(segment)
        if whole and (whole["star"] or whole["optional"] or whole["default"] is not None):
            if index != len(segments) - 1:
                raise ValueError(f"route {template!r}: {segment} must be the last segment")
            if whole["default"] is not None:
                defaults[whole["name"]] = whole["default"]
            group = f"(?P<{whole['name']}>.*)" if whole["star"] else _parameter_group(whole, "[^/]+")
            pattern += f"(?:/{group})?"
            rank.append(_CATCH_ALL if whole["star"] else _OPTIONAL)
            continue
        regex, kind = _segment_regex(segment)
        pattern += "/" + regex
        rank.append(kind)
    literal = None
    if all(kind == _LITERAL for kind in rank):
        literal = "/" + "/".join(segments).lower()
    try:
        compiled = re.compile(f"^{pattern}/?$", re.IGNORECASE)
    except re.error as error:
        raise ValueError(f"route {template!r}: {error}") from error
    return compiled, literal, tuple(rank), defaults


def _function_caller(function: Any, trigger: Any, name: str) -> Callable[[func.HttpRequest], Any]:
    user_function = function.get_user_function()
    request_argument = trigger.name
    context_argument = None
    for parameter in inspect.signature(user_function).parameters.values():
        if parameter.name == request_argument:
            continue
        if parameter.name == "context" or parameter.annotation in (func.Context, "func.Context"):
            context_argument = parameter.name
        elif parameter.default is inspect.Parameter.empty:
            raise ValueError(f"function {name}: argument {parameter.name!r} needs a binding this server "
                             "cannot provide (only the HTTP request and the invocation context)")
    try:
        directory = os.path.dirname(os.path.abspath(inspect.getsourcefile(user_function) or "."))
    except TypeError:
        directory = os.getcwd()
    is_async = inspect.iscoroutinefunction(user_function)

    def call(request: func.HttpRequest) -> Any:
        arguments = {request_argument: request}
        if context_argument:
            arguments[context_argument] = _InvocationContext(name, directory)
        result = user_function(**arguments)
        return _run_coroutine(result) if is_async else result

    return call


class _Router:
    """Every HTTP function of the app, matched like the Functions host does."""

    def __init__(self, functions: Iterable[Any], route_prefix: str) -> None:
        routes = []
        for function in functions:
            trigger = function.get_trigger()
            if not isinstance(trigger, HttpTrigger):
                continue
            routes.append(self._route(function, trigger, route_prefix.strip("/")))
        routes.sort(key=lambda route: route.rank)
        self.routes: tuple[_Route, ...] = tuple(routes)
        self._literal: dict[str, list[_Route]] = {}
        for route in routes:
            if route.literal_path is not None:
                self._literal.setdefault(route.literal_path, []).append(route)
        self._patterned = tuple(route for route in routes if route.literal_path is None)

    @staticmethod
    def _route(function: Any, trigger: Any, prefix: str) -> _Route:
        name = function.get_function_name()
        template = trigger.route if trigger.route is not None else name
        pattern, literal, rank, defaults = _compile_route(prefix, template)
        methods = None
        if trigger.methods:
            methods = frozenset(str(getattr(method, "value", method)).upper() for method in trigger.methods)
        auth_level = getattr(trigger.auth_level, "value", trigger.auth_level)
        return _Route(function_name=name, template=template, methods=methods,
                      anonymous=str(auth_level).lower() == "anonymous", pattern=pattern,
                      literal_path=literal, rank=rank, defaults=tuple(defaults.items()),
                      call=_function_caller(function, trigger, name))

    def match(self, method: str, path: str) -> tuple[_Route | None, dict[str, str], list[str]]:
        """(route, route parameters, []) on a match, (None, {}, allowed methods) otherwise."""
        key = path.lower().rstrip("/") or "/"
        candidates = self._literal.get(key, ())
        for route in candidates:
            if route.allows(method):
                return route, {}, []
        allowed: set[str] = set()
        for route in candidates:
            allowed |= route.methods or set()
        for route in self._patterned:
            found = route.pattern.match(path)
            if found is None:
                continue
            if route.allows(method):
                parameters = {name: value for name, value in found.groupdict().items() if value is not None}
                for name, default in route.defaults:
                    parameters.setdefault(name, default)
                return route, parameters, []
            allowed |= route.methods or set()
        return None, {}, sorted(allowed)


def _decode_path(raw_path: str) -> str:
    # Percent-decode the path but keep an encoded slash inside a segment, as ASP.NET routing does.
    if "%" not in raw_path:
        return raw_path
    protected = raw_path.replace("%2F", "%252F").replace("%2f", "%252f")
    return urllib.parse.unquote(protected, errors="strict")


class _InvocationContext(func.Context):
    """The parts of the host's invocation context that make sense without the host."""

    def __init__(self, function_name: str, function_directory: str) -> None:
        self._invocation_id = str(uuid.uuid4())
        self._function_name = function_name
        self._function_directory = function_directory
        self._thread_local_storage = threading.local()
        self._thread_local_storage.invocation_id = self._invocation_id

    @property
    def invocation_id(self) -> str:
        return self._invocation_id

    @property
    def thread_local_storage(self) -> Any:
        return self._thread_local_storage

    @property
    def function_name(self) -> str:
        return self._function_name

    @property
    def function_directory(self) -> str:
        return self._function_directory

    @property
    def trace_context(self) -> Any:
        return None

    @property
    def retry_context(self) -> Any:
        return None


_event_loops = threading.local()


def _run_coroutine(coroutine: Any) -> Any:
    loop = getattr(_event_loops, "loop", None)
    if loop is None:
        loop = _event_loops.loop = asyncio.new_event_loop()
    return loop.run_until_complete(coroutine)


def _as_http_response(result: Any) -> Any:
    if isinstance(result, func.HttpResponse) or hasattr(result, "get_body") and hasattr(result, "status_code"):
        return result
    if isinstance(result, str):
        return func.HttpResponse(result)
    if isinstance(result, (bytes, bytearray)):
        return func.HttpResponse(bytes(result), mimetype="application/octet-stream")
    if result is None:
        return func.HttpResponse(status_code=204)
    raise TypeError(f"a function returned {type(result).__name__}, not an HttpResponse")


# --------------------------------------------------------------------------------------------- HTTP


class _Refusal(Exception):
    """The request is answered with an error before any function sees it."""

    def __init__(self, status: int, text: str, *, close: bool = False, headers: tuple[str, ...] = ()) -> None:
        super().__init__(text)
        self.status, self.text, self.close, self.headers = status, text, close, headers


class _ClientGone(Exception):
    """The client stopped sending before the request was complete."""


_date_cache: tuple[int, str] = (0, "")


def _http_date() -> str:
    global _date_cache
    now = int(time.time())
    cached_second, cached_text = _date_cache
    if cached_second != now:
        cached_text = email.utils.formatdate(now, usegmt=True)
        _date_cache = (now, cached_text)
    return cached_text


class _RequestHeaders:
    """Request header fields: the part of email.message.Message the handler uses, parsed much faster."""

    __slots__ = ("_pairs", "_values")

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self._pairs = pairs
        self._values: dict[str, list[str]] = {}
        for name, value in pairs:
            self._values.setdefault(name.lower(), []).append(value)

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self._values.get(name.lower())
        return values[0] if values else default

    def get_all(self, name: str, default: list[str] | None = None) -> list[str] | None:
        values = self._values.get(name.lower())
        return list(values) if values else default

    def items(self) -> list[tuple[str, str]]:
        return list(self._pairs)

    def joined(self) -> dict[str, str]:
        """Lower-cased names, repeated fields joined with ", " as the Functions host presents them."""
        return {name: values[0] if len(values) == 1 else ", ".join(values) for name, values in self._values.items()}


def _read_header_fields(rfile: Any) -> _RequestHeaders:
    pairs: list[tuple[str, str]] = []
    while True:
        line = rfile.readline(_MAX_HEADER_LINE + 1)
        if len(line) > _MAX_HEADER_LINE:
            raise _Refusal(431, "Header line too long", close=True)
        if line in (b"\r\n", b"\n", b""):
            return _RequestHeaders(pairs)
        if len(pairs) >= _MAX_HEADERS:
            raise _Refusal(431, "Too many header fields", close=True)
        name, colon, value = line.partition(b":")
        # No folded lines, no space before the colon: ambiguities that enable request smuggling.
        if not colon or not name or name != name.strip() or line[:1] in (b" ", b"\t"):
            raise _Refusal(400, "Bad header field", close=True)
        pairs.append((name.decode("latin-1"), value.strip().decode("latin-1")))


class _FunctionsRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"  # so that errors about the request line still get a status line
    disable_nagle_algorithm = True
    error_message_format = "%(code)d %(message)s\n"
    error_content_type = "text/plain; charset=utf-8"
    server: _ThreadingServer

    def setup(self) -> None:
        self.timeout = self.server.connection_timeout
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    def parse_request(self) -> bool:
        """The request line, then the header fields with `_read_header_fields` (HTTP/1.0 and 1.1 only)."""
        self.command = None
        self.request_version = self.default_request_version
        self.close_connection = True
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        if not words:
            return False
        if len(words) != 3:
            self.send_error(400, "Bad request line")
            return False
        command, path, version = words
        major, dot, minor = version[5:].partition(".")
        if (not version.startswith("HTTP/") or not dot or not major.isdigit() or not minor.isdigit()
                or len(major) > 3 or len(minor) > 3):
            self.send_error(400, "Bad request version")
            return False
        if int(major) != 1:
            self.send_error(505, "HTTP version not supported")
            return False
        self.command, self.path, self.request_version = command, path, version
        self.close_connection = int(minor) == 0
        if path.startswith("//"):
            self.path = "/" + path.lstrip("/")
        try:
            self.headers = _read_header_fields(self.rfile)
        except _Refusal as refusal:
            self._refuse(refusal)
            return False
        connection = (self.headers.get("Connection") or "").lower()
        if connection == "close":
            self.close_connection = True
        elif connection == "keep-alive":
            self.close_connection = False
        if int(minor) >= 1 and (self.headers.get("Expect") or "").lower() == "100-continue":
            return self.handle_expect_100()
        return True

    def handle_expect_100(self) -> bool:
        try:
            self._check_declared_length()
        except _Refusal as refusal:
            self._refuse(refusal)
            return False
        return super().handle_expect_100()

    def _dispatch(self) -> None:
        server = self.server
        server.request_started()
        started = time.perf_counter()
        status = 0
        try:
            status = self._answer()
        except (TimeoutError, ConnectionError, _ClientGone):
            self.close_connection = True
        finally:
            server.request_finished()
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug('%s "%s %s" %d %.1fms', self.client_address[0], self.command,
                         self.path.partition("?")[0], status, (time.perf_counter() - started) * 1000)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _dispatch

    def _answer(self) -> int:
        if self.server.stopping:
            self.close_connection = True
        try:
            body = self._read_body()
            route, request = self._build_request(body)
        except _Refusal as refusal:
            self._refuse(refusal)
            return refusal.status
        try:
            response = _as_http_response(route.call(request))
        except Exception:
            logger.exception("function %s raised", route.function_name)
            return self._send_text(500, "Internal Server Error")
        return self._send_response(response, route.function_name)

    # ------------------------------------------------------------------ the request

    def _check_declared_length(self) -> int | None:
        lengths = self.headers.get_all("Content-Length") or []
        if self.headers.get("Transfer-Encoding") is not None:
            if lengths:
                raise _Refusal(400, "Content-Length and Transfer-Encoding together", close=True)
            return None
        if not lengths:
            return None
        if len(set(lengths)) != 1 or not _DIGITS.fullmatch(lengths[0].strip()):
            raise _Refusal(400, "Bad Content-Length", close=True)
        length = int(lengths[0])
        if length > self.server.max_body_bytes:
            raise _Refusal(413, "Request body too large", close=True)
        return length

    def _read_body(self) -> bytes:
        length = self._check_declared_length()
        transfer_encodings = self.headers.get_all("Transfer-Encoding")
        if transfer_encodings is not None:
            if len(transfer_encodings) != 1 or transfer_encodings[0].strip().lower() != "chunked":
                raise _Refusal(501, "Transfer-Encoding not supported", close=True)
            return self._read_chunked()
        if length is None:
            if self.command in _METHODS_NEEDING_LENGTH:
                raise _Refusal(411, "Length Required", close=True)
            return b""
        body = self.rfile.read(length) if length else b""
        if len(body) != length:
            raise _ClientGone()
        return body

    def _read_chunked(self) -> bytes:
        limit, total, chunks = self.server.max_body_bytes, 0, []
        while True:
            size = self._read_chunk_size()
            if size == 0:
                self._skip_trailers()
                return b"".join(chunks)
            total += size
            if total > limit:
                raise _Refusal(413, "Request body too large", close=True)
            chunk = self.rfile.read(size)
            if len(chunk) != size:
                raise _ClientGone()
            chunks.append(chunk)
            if self.rfile.readline(_MAX_CHUNK_LINE) not in (b"\r\n", b"\n"):
                raise _Refusal(400, "Bad chunked encoding", close=True)

    def _read_chunk_size(self) -> int:
        line = self.rfile.readline(_MAX_CHUNK_LINE)
        if not line:
            raise _ClientGone()
        size_text = line.split(b";", 1)[0].strip()
        if not line.endswith(b"\n") or not _HEX.fullmatch(size_text):
            raise _Refusal(400, "Bad chunked encoding", close=True)
        return int(size_text, 16)

    def _skip_trailers(self) -> None:
        for _ in range(_MAX_TRAILER_LINES):
            line = self.rfile.readline(_MAX_CHUNK_LINE)
            if not line:
                raise _ClientGone()
            if line in (b"\r\n", b"\n"):
                return
        raise _Refusal(400, "Too many trailer fields", close=True)

    def _build_request(self, body: bytes) -> tuple[_Route, func.HttpRequest]:
        target = self.path
        if not target.startswith("/"):
            parts = urllib.parse.urlsplit(target)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise _Refusal(400, "Bad request target")
            target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        raw_path, _, query = target.partition("#")[0].partition("?")
        try:
            path = _decode_path(raw_path)
        except UnicodeDecodeError as error:
            raise _Refusal(400, "Bad request path") from error
        route, route_params, allowed = self.server.router.match(self.command, path)
        if route is None:
            if allowed:
                raise _Refusal(405, "Method Not Allowed", headers=(f"Allow: {', '.join(allowed)}\r\n",))
            raise _Refusal(404, "Not Found")
        params = self._query_params(query)
        headers = self.headers.joined()
        if not route.anonymous:
            self._check_function_key(params, headers)
        url = f"http://{headers.get('host') or self.server.authority}{target}"
        return route, func.HttpRequest(self.command, url, headers=headers, params=params,
                                       route_params=route_params, body=body)

    @staticmethod
    def _query_params(query: str) -> dict[str, str]:
        params: dict[str, str] = {}
        if not query:
            return params
        try:
            pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, max_num_fields=_MAX_QUERY_FIELDS)
        except ValueError as error:
            raise _Refusal(400, "Too many query parameters") from error
        for key, value in pairs:
            params.setdefault(key, value)
        return params

    def _check_function_key(self, params: dict[str, str], headers: dict[str, str]) -> None:
        expected = self.server.function_key
        presented = headers.get("x-functions-key") or params.get("code") or ""
        if not expected or not hmac.compare_digest(presented.encode(), expected.encode()):
            raise _Refusal(401, "Unauthorized")

    # ------------------------------------------------------------------ the reply

    def _send_response(self, response: Any, function_name: str) -> int:
        status = response.status_code
        if not isinstance(status, int) or not 200 <= status <= 599:
            logger.error("function %s returned status %r", function_name, status)
            return self._send_text(500, "Internal Server Error")
        headers, has_content_type = [], False
        for name, value in response.headers.items():
            lower = name.lower()
            if lower in _RESPONSE_HEADERS_WE_SET:
                continue
            has_content_type = has_content_type or lower == "content-type"
            headers.append(f"{name}: {value}\r\n")
        if not has_content_type:
            mimetype = response.mimetype
            content_type = f"{mimetype}; charset={response.charset}" if mimetype.startswith("text/") else mimetype
            headers.append(f"Content-Type: {content_type}\r\n")
        try:
            self._write(status, headers, response.get_body() or b"")
        except UnicodeEncodeError:
            logger.error("function %s returned a header that is not ISO-8859-1", function_name)
            return self._send_text(500, "Internal Server Error")
        return status

    def _send_text(self, status: int, text: str, extra_headers: Iterable[str] = ()) -> int:
        headers = ["Content-Type: text/plain; charset=utf-8\r\n", *extra_headers]
        self._write(status, headers, (text + "\n").encode())
        return status

    def _write(self, status: int, headers: list[str], body: bytes) -> None:
        if status in _NO_BODY_STATUSES:
            body = b""
        head = [f"{self.protocol_version} {status} {_REASONS.get(status, '')}\r\n", *headers,
                f"Date: {_http_date()}\r\n"]
        if status not in _NO_BODY_STATUSES:
            head.append(f"Content-Length: {len(body)}\r\n")
        if self.close_connection:
            head.append("Connection: close\r\n")
        elif self.request_version == "HTTP/1.0":
            head.append("Connection: keep-alive\r\n")
        head.append("\r\n")
        data = "".join(head).encode("latin-1")
        self.wfile.write(data if self.command == "HEAD" else data + body)

    def _refuse(self, refusal: _Refusal) -> None:
        if refusal.close:
            self.close_connection = True
        self._send_text(refusal.status, refusal.text, refusal.headers)
        if refusal.close:
            self._linger()

    def _linger(self) -> None:
        # Answer first, then drain a little: closing with unread data would reset the connection and
        # the client could lose the answer it has not read yet.
        try:
            self.connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + _LINGER_SECONDS
            drained = 0
            while drained < _LINGER_MAX_BYTES:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.connection.settimeout(remaining)
                data = self.rfile.read1(65536)
                if not data:
                    break
                drained += len(data)
        except OSError:
            pass


class _ThreadingServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """A threading HTTP server on an already listening socket."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, listening: socket.socket, router: _Router, *, authority: str, max_body_bytes: int,
                 connection_timeout: float, function_key: str | None) -> None:
        socketserver.BaseServer.__init__(self, listening.getsockname()[:2], _FunctionsRequestHandler)
        self.socket = listening
        self.address_family = listening.family
        self.router = router
        self.authority = authority
        self.max_body_bytes = max_body_bytes
        self.connection_timeout = connection_timeout
        self.function_key = function_key
        self.stopping = False
        self._active = 0
        self._active_lock = threading.Lock()

    def accept_one(self) -> None:
        """Accept a waiting connection, if this process wins it, and serve it on a thread."""
        try:
            connection, address = self.socket.accept()
        except (BlockingIOError, InterruptedError):
            return  # another worker accepted it
        except OSError as error:
            logger.error("accept failed: %s", error)
            time.sleep(0.1)  # e.g. out of file descriptors: do not spin
            return
        try:
            self.process_request(connection, address)
        except Exception:
            self.handle_error(connection, address)
            self.shutdown_request(connection)

    def request_started(self) -> None:
        with self._active_lock:
            self._active += 1

    def request_finished(self) -> None:
        with self._active_lock:
            self._active -= 1

    def wait_idle(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self._active > 0 and time.monotonic() < deadline:
            time.sleep(0.05)

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            logger.debug("connection from %s ended: %s", client_address[0], error)
        else:
            logger.exception("error while serving %s", client_address[0])


# --------------------------------------------------------------------------------------------- server


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listening = socket.socket(family, socket.SOCK_STREAM)
    try:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind((host, port))
        listening.listen(backlog)
        # Several processes accept on this socket: the ones that lose the race must not block in accept().
        listening.setblocking(False)
    except BaseException:
        listening.close()
        raise
    return listening


def _authority(host: str, port: int) -> str:
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class LocalFunctionsServer:
    """Serves a FunctionApp's HTTP functions; binds in the constructor so `url` is known at once."""

    def __init__(self, app: Any, route_prefix: str = DEFAULT_ROUTE_PREFIX, host: str = "127.0.0.1",
                 port: int = 7071, workers: int | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 *, function_key: str | None = None, connection_timeout: float = DEFAULT_CONNECTION_TIMEOUT,
                 backlog: int = DEFAULT_BACKLOG, background: Callable[[], Any] | None = None,
                 background_interval: float = DEFAULT_BACKGROUND_INTERVAL) -> None:
        if workers is None:
            workers = os.cpu_count() or 1
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if max_body_bytes < 0:
            raise ValueError("max_body_bytes must not be negative")
        self.route_prefix = route_prefix.strip("/")
        self.router = _Router(app_functions(app), self.route_prefix)
        self.workers = workers
        self._socket = _listen(host, port, backlog)
        self.host, self.port = host, self._socket.getsockname()[1]
        self.url = f"http://{_authority(host, self.port)}"
        self._server_options = {"authority": _authority(host, self.port), "max_body_bytes": max_body_bytes,
                                "connection_timeout": connection_timeout, "function_key": function_key}
        self._stopping = False
        self._serving = False
        self._finished = threading.Event()
        self._in_process_server: _ThreadingServer | None = None
        self._serving_thread: threading.Thread | None = None
        self._background = background
        self._background_interval = background_interval

    @property
    def api_url(self) -> str:
        """`url` followed by the route prefix: where the functions' routes start."""
        return f"{self.url}/{self.route_prefix}" if self.route_prefix else self.url

    def routes(self) -> list[tuple[str, str, list[str] | None]]:
        """(function name, URL path, methods or None for all) for every served function."""
        prefix = f"/{self.route_prefix}" if self.route_prefix else ""
        return [(route.function_name, f"{prefix}/{route.template.strip('/')}",
                 sorted(route.methods) if route.methods is not None else None) for route in self.router.routes]

    def serve_forever(self) -> None:
        """Serve until SIGTERM/SIGINT (in the main thread) or `close()`; then return normally."""
        if self._stopping or self._serving:
            raise RuntimeError("serve_forever runs once per server")
        self._serving = True
        try:
            if self.workers == 1:
                self._serve_in_process()
            else:
                self._supervise()
        finally:
            self._socket.close()
            self._finished.set()

    def close(self, timeout: float = _STOP_GRACE_SECONDS + 5) -> None:
        """Stop serving (from another thread) and release the port; waits for `serve_forever` to return."""
        self._stopping = True
        server = self._in_process_server
        if server is not None:
            server.stopping = True
        if not self._serving:
            self._socket.close()
        elif threading.current_thread() is not self._serving_thread:
            self._finished.wait(timeout)

    # ------------------------------------------------------------------ one process

    def _serve_in_process(self) -> None:
        self._serving_thread = threading.current_thread()
        server = self._new_server()
        self._in_process_server = server
        self._start_background()
        with _StopSignals(self._request_stop):
            self._serve_loop(server, parent_pid=None)

    def _start_background(self) -> None:
        if self._background is not None:
            threading.Thread(target=self._run_background, name="background-job", daemon=True).start()

    def _run_background(self) -> None:
        assert self._background is not None
        while not self._stopping:
            try:
                self._background()
            except Exception:
                logger.exception("background job failed; it runs again in %.0f s", self._background_interval)
            self._sleep_unless_stopping(self._background_interval)

    def _new_server(self) -> _ThreadingServer:
        return _ThreadingServer(self._socket, self.router, **self._server_options)

    def _request_stop(self) -> None:
        self._stopping = True
        if self._in_process_server is not None:
            self._in_process_server.stopping = True

    def _serve_loop(self, server: _ThreadingServer, parent_pid: int | None) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(server.socket, selectors.EVENT_READ)
            while not self._stopping:
                if selector.select(_POLL_SECONDS):
                    server.accept_one()
                if parent_pid is not None and os.getppid() != parent_pid:
                    logger.warning("worker %d: supervisor is gone, stopping", os.getpid())
                    break
        server.stopping = True
        server.wait_idle(_STOP_GRACE_SECONDS)

    # ------------------------------------------------------------------ pre-forked workers

    def _supervise(self) -> None:
        self._serving_thread = threading.current_thread()
        children: dict[int, _Child] = {}
        respawn_delay = 0.0
        with _StopSignals(self._request_stop):
            for slot in range(self.workers):
                self._spawn(children, slot)
            while not self._stopping:
                time.sleep(_SUPERVISE_SECONDS)
                if self._stopping:
                    break  # the children got the same signal: their exits are expected
                for gone in self._reap(children):
                    respawn_delay = self._respawn_delay(gone.started, respawn_delay)
                    self._sleep_unless_stopping(respawn_delay)
                    if not self._stopping:
                        self._spawn(children, gone.slot)
            self._stop_children(children)

    def _spawn(self, children: dict[int, _Child], slot: int) -> None:
        stop_signals = {signal.SIGTERM, signal.SIGINT}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
        try:
            pid = os.fork()
            if pid == 0:
                self._child_main(slot)  # never returns
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
        children[pid] = _Child(slot, time.monotonic())
        logger.debug("started worker %d", pid)

    def _child_main(self, slot: int) -> None:
        exit_code = 1
        try:
            parent_pid = os.getppid()
            self._in_process_server = None
            self._stopping = False
            server = self._new_server()
            self._in_process_server = server
            for signal_number in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signal_number, lambda *_: self._request_stop())
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
            if slot == 0:
                self._start_background()
            self._serve_loop(server, parent_pid)
            exit_code = 0
        except BaseException:
            logger.exception("worker %d failed", os.getpid())
        finally:
            logging.shutdown()
            os._exit(exit_code)

    @staticmethod
    def _reap(children: dict[int, _Child]) -> Iterator[_Child]:
        for pid in list(children):
            try:
                finished, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                finished, status = pid, 0
            if finished:
                gone = children.pop(pid)
                logger.warning("worker %d exited unexpectedly (%s); starting another",
                               pid, _describe_exit(status))
                yield gone

    @staticmethod
    def _respawn_delay(started: float, previous: float) -> float:
        if time.monotonic() - started >= _QUICK_DEATH_SECONDS:
            return 0.0
        return min(max(previous * 2, _SUPERVISE_SECONDS), _MAX_RESPAWN_DELAY)

    def _sleep_unless_stopping(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < deadline:
            time.sleep(min(_SUPERVISE_SECONDS, deadline - time.monotonic()))

    @staticmethod
    def _stop_children(children: dict[int, _Child]) -> None:
        for pid in children:
            _signal_quietly(pid, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_GRACE_SECONDS + 2
        while children and time.monotonic() < deadline:
            for pid in list(children):
                try:
                    finished, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    finished = pid
                if finished:
                    children.pop(pid)
            time.sleep(0.05)
        for pid in children:
            logger.warning("worker %d did not stop in time; killing it", pid)
            _signal_quietly(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


@dataclass(frozen=True)
class _Child:
    slot: int  # the worker's place in the tree; slot 0 runs the background job
    started: float


def _describe_exit(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def _signal_quietly(pid: int, signal_number: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal_number)


class _StopSignals:
    """SIGTERM and SIGINT call `stop` while serving, when serving in the main thread."""

    def __init__(self, stop: Callable[[], None]) -> None:
        self._stop = stop
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signal_number in (signal.SIGTERM, signal.SIGINT):
                self._previous[signal_number] = signal.signal(signal_number, self._handle)
        return self

    def _handle(self, signal_number: int, frame: Any) -> None:
        self._stop()

    def __exit__(self, *exc_info: Any) -> None:
        for signal_number, handler in self._previous.items():
            signal.signal(signal_number, handler)
