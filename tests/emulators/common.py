"""A small threaded HTTPS server that the wire-level emulators (Entra ID, Key Vault, Intune) build on.

Every emulator in a process shares one throwaway certificate authority, so a single CA bundle file
(`ca_bundle_path`) can be handed to REQUESTS_CA_BUNDLE / SSL_CERT_FILE for all of them. Servers listen on
127.0.0.1 with port 0 (a free port) unless told otherwise.

A subclass registers routes (method + regular expression on the path) and may override `before_request`
to inject faults or enforce authentication. Every request is logged (method, path, query, headers, JSON body)
so tests can count what crossed the wire.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import ipaddress
import json
import re
import shutil
import signal
import socket
import ssl
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CONNECTION_TIMEOUT_SECONDS = 30


class EmulatorCA:
    """A throwaway CA plus one server certificate for 127.0.0.1 / localhost, written to a temp directory."""

    _shared: EmulatorCA | None = None
    _shared_lock = threading.Lock()

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="emulator-ca-"))
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca_certificate = self._make_ca_certificate()
        self._server_key = ec.generate_private_key(ec.SECP256R1())
        self.server_certificate = self._make_server_certificate()
        self.ca_bundle_path = self.directory / "ca-bundle.pem"
        self.ca_bundle_path.write_bytes(self.ca_certificate.public_bytes(serialization.Encoding.PEM))
        self._server_chain_path = self.directory / "server-chain.pem"
        self._server_chain_path.write_bytes(
            self.server_certificate.public_bytes(serialization.Encoding.PEM)
            + self.ca_certificate.public_bytes(serialization.Encoding.PEM)
        )
        self._server_key_path = self.directory / "server-key.pem"
        self._server_key_path.write_bytes(
            self._server_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    @classmethod
    def shared(cls) -> EmulatorCA:
        """The process-wide CA every emulator uses by default (removed at interpreter exit)."""
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
                atexit.register(cls._shared.cleanup)
            return cls._shared

    def server_ssl_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self._server_chain_path, self._server_key_path)
        return context

    def client_ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts only this CA (for tests that talk to emulators with urllib)."""
        return ssl.create_default_context(cafile=str(self.ca_bundle_path))

    def cleanup(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def _make_ca_certificate(self) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Emulator Test CA")])
        now = datetime.datetime.now(datetime.timezone.utc)
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._ca_key.public_key()), critical=False
            )
            .sign(self._ca_key, hashes.SHA256())
        )

    def _make_server_certificate(self) -> x509.Certificate:
        now = datetime.datetime.now(datetime.timezone.utc)
        names = [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(self.ca_certificate.subject)
            .public_key(self._server_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._ca_key.public_key()), critical=False
            )
            .sign(self._ca_key, hashes.SHA256())
        )


@dataclass
class Request:
    """One HTTP request as an emulator route sees it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def header(self, name: str, default: str | None = None) -> str | None:
        """Case-insensitive header lookup."""
        wanted = name.lower()
        for key, value in self.headers.items():
            if key.lower() == wanted:
                return value
        return default

    def json(self) -> Any:
        """The body parsed as JSON; an HttpError 400 when it is not JSON."""
        if not self.body:
            return None
        try:
            return json.loads(self.body)
        except ValueError as error:
            raise HttpError(
                400, {"error": {"code": "BadParameter", "message": f"Invalid JSON: {error}"}}
            ) from None

    def form(self) -> dict[str, str]:
        """The body parsed as application/x-www-form-urlencoded (last value wins)."""
        parsed = parse_qs(self.body.decode("utf-8"), keep_blank_values=True)
        return {key: values[-1] for key, values in parsed.items()}


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LoggedRequest:
    """What one request carried over the wire (the JSON body if it was JSON, else None)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: Any


class HttpError(Exception):
    """Raise from a route to answer with a status and a JSON (or text) body."""

    def __init__(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body
        self.headers = headers or {}

    def to_response(self) -> Response:
        if self.body is None:
            return Response(self.status, b"", dict(self.headers))
        if isinstance(self.body, (bytes, str)):
            return text_response(self.body, self.status, self.headers)
        return json_response(self.body, self.status, self.headers)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    encoded = json.dumps(body).encode("utf-8")
    return Response(status, encoded, {"Content-Type": "application/json; charset=utf-8", **(headers or {})})


def text_response(
    body: str | bytes,
    status: int = 200,
    headers: dict[str, str] | None = None,
    content_type: str = "text/plain",
) -> Response:
    encoded = body.encode("utf-8") if isinstance(body, str) else body
    return Response(status, encoded, {"Content-Type": content_type, **(headers or {})})


Handler = Callable[..., Response]


@dataclass(frozen=True)
class _Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler


class _TlsThreadingServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, address: tuple[str, int], handler: type, context: ssl.SSLContext, owner: EmulatorServer
    ):
        self.ssl_context = context
        self.owner = owner
        self.connections: set[ssl.SSLSocket] = set()
        super().__init__(address, handler)

    def finish_request(self, request: socket.socket, client_address: Any) -> None:
        # The TLS handshake happens here, on the connection's own thread, not on the accept loop.
        request.settimeout(CONNECTION_TIMEOUT_SECONDS)
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        self.connections.add(tls)
        try:
            super().finish_request(tls, client_address)
        finally:
            self.connections.discard(tls)
            with contextlib.suppress(OSError):
                tls.close()

    def close_connections(self) -> None:
        """Drop the kept-alive connections too: a stopped emulator must look unreachable to pooled clients."""
        for connection in list(self.connections):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that drop connections are normal during tests; keep stderr quiet.
        pass


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _TlsThreadingServer

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self._dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_GET  # noqa: N815

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature from the base class
        pass

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        split = urlsplit(self.path)
        query = {key: values[-1] for key, values in parse_qs(split.query, keep_blank_values=True).items()}
        request = Request(self.command, split.path, query, dict(self.headers.items()), body)
        response = self.server.owner.handle(request)
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)


class EmulatorServer:
    """Base class: an HTTPS server on 127.0.0.1 with routing, a request log and fault-injection hooks."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, ca: EmulatorCA | None = None) -> None:
        self.ca = ca or EmulatorCA.shared()
        self._address = (host, port)
        self._routes: list[_Route] = []
        self._server: _TlsThreadingServer | None = None
        self._thread: threading.Thread | None = None
        self._log: list[LoggedRequest] = []
        self._log_lock = threading.Lock()

    # Lifecycle

    def start(self) -> EmulatorServer:
        if self._server is not None:
            return self
        self._server = _TlsThreadingServer(self._address, _RequestHandler, self.ca.server_ssl_context(), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"{type(self).__name__}-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and drop open connections; start() again listens on the same port (an outage)."""
        if self._server is None:
            return
        self._address = (self._address[0], self.port)
        self._server.shutdown()
        self._server.server_close()
        self._server.close_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("emulator is not running")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        """Base URL without a trailing slash, e.g. https://127.0.0.1:54321."""
        return f"https://{self._address[0]}:{self.port}"

    @property
    def ca_bundle_path(self) -> str:
        return str(self.ca.ca_bundle_path)

    # Routing

    def route(self, method: str, pattern: str, handler: Handler) -> None:
        """Register handler(request, **named_groups) for method and a regular expression on the path."""
        self._routes.append(_Route(method.upper(), re.compile(pattern), handler))

    def before_request(self, request: Request) -> Response | None:
        """Hook for subclasses: return a Response to answer without routing (faults, authentication)."""
        return None

    def handle(self, request: Request) -> Response:
        self._record(request)
        try:
            early = self.before_request(request)
            if early is not None:
                return early
            return self._route(request)
        except HttpError as error:
            return error.to_response()
        except Exception as error:  # an emulator bug must show up as a 500, not a hung client
            return json_response({"error": {"code": "EmulatorError", "message": repr(error)}}, 500)

    def _route(self, request: Request) -> Response:
        path_matched = False
        for candidate in self._routes:
            match = candidate.pattern.fullmatch(request.path)
            if match is None:
                continue
            path_matched = True
            if candidate.method == request.method:
                return candidate.handler(request, **match.groupdict())
        if path_matched:
            raise HttpError(405, {"error": {"code": "MethodNotAllowed", "message": request.method}})
        raise HttpError(404, {"error": {"code": "NotFound", "message": request.path}})

    # Request log

    def _record(self, request: Request) -> None:
        try:
            body = json.loads(request.body) if request.body else None
        except ValueError:
            body = None
        entry = LoggedRequest(request.method, request.path, dict(request.query), dict(request.headers), body)
        with self._log_lock:
            self._log.append(entry)

    @property
    def requests(self) -> list[LoggedRequest]:
        """A snapshot of every request received so far."""
        with self._log_lock:
            return list(self._log)

    def requests_matching(
        self, method: str | None = None, path_pattern: str | None = None
    ) -> list[LoggedRequest]:
        """Logged requests filtered by method and a regular expression searched in the path."""
        compiled = re.compile(path_pattern) if path_pattern else None
        return [
            entry
            for entry in self.requests
            if (method is None or entry.method == method.upper())
            and (compiled is None or compiled.search(entry.path))
        ]

    def clear_log(self) -> None:
        with self._log_lock:
            self._log.clear()


def wait_until_interrupted() -> None:
    """Block the main thread until Ctrl-C or SIGTERM, letting context managers and atexit clean up."""

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    with contextlib.suppress(KeyboardInterrupt):
        threading.Event().wait()
