"""gunicorn settings and hooks for the product's ASGI application, and the gunicorn application `scep serve` runs.

This module is a gunicorn configuration module as well: a user who runs the ASGI application on their own gunicorn
gets the same limits and the same daily maintenance job with

    gunicorn -c python:scep.http.serving --bind 127.0.0.1:8080 'scep.http.asgi:create_app()'

Settings (gunicorn's documentation, "Settings"): gunicorn's `asgi` workers serve keep-alive connections on an
asyncio event loop, one process per CPU (docs/serving.md has the measurements against `gthread` and `sync`);
request line, header count and header size are bounded explicitly;
the access log is off, because a request line is client-controlled text and gunicorn's access logger writes it as
given (the product's own records and gunicorn's error log are cleaned by scep.logs).

The maintenance job (`backend.run_maintenance`: RA self-renewal and expiry lines) runs in exactly one worker of the
tree: the arbiter gives the role to a worker it forks when no live worker has it (`pre_fork`), so the first worker
runs it, and so does the replacement of that worker when it dies; on a reload (SIGHUP) the role passes to the first
new worker. Runs at worker start, then every MAINTENANCE_INTERVAL_SECONDS; the same worker runs the CRL publication
(`backend.run_publication`) at start and then every PUBLICATION_INTERVAL_SECONDS, and, in Intune mode, Intune's
revocation requests (`backend.run_intune_revocations`) at start and then every INTUNE_REVOCATION_INTERVAL_SECONDS.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from gunicorn.app.base import BaseApplication

from scep.http import backend

log = logging.getLogger("scep.http.serving")

MAINTENANCE_INTERVAL_SECONDS = 24 * 3600.0
PUBLICATION_INTERVAL_SECONDS = 3600.0  # CRL publication (backend.run_publication)
INTUNE_REVOCATION_INTERVAL_SECONDS = 900.0  # Intune's revocation requests (backend.run_intune_revocations)

# gunicorn settings, read by name when this module is gunicorn's configuration (-c python:scep.http.serving).
worker_class = "asgi"
workers = os.cpu_count() or 1
keepalive = 5  # seconds an idle keep-alive connection stays open
timeout = 60  # a worker silent for this long is killed and replaced
graceful_timeout = 10  # SIGTERM: seconds in-flight requests get before workers are killed
limit_request_line = 8190  # gunicorn's largest bounded value; a GET PKIOperation carries the message in the URL
limit_request_fields = 100
limit_request_field_size = 8190
accesslog = None
control_socket_disable = True  # no gunicornc control socket in the user's home or runtime directory


def pre_fork(server: Any, worker: Any) -> None:
    worker.runs_maintenance = not any(getattr(other, "runs_maintenance", False) for other in server.WORKERS.values())


def on_reload(server: Any) -> None:
    # The old workers are retired after the new ones start: the first new worker takes the role over.
    for old in server.WORKERS.values():
        old.runs_maintenance = False


def post_worker_init(worker: Any) -> None:
    if getattr(worker, "runs_maintenance", False):
        jobs = (("maintenance", backend.run_maintenance, MAINTENANCE_INTERVAL_SECONDS),
                ("crl publication", backend.run_publication, PUBLICATION_INTERVAL_SECONDS),
                ("intune revocations", backend.run_intune_revocations, INTUNE_REVOCATION_INTERVAL_SECONDS))
        for name, job, interval in jobs:
            threading.Thread(target=_every, args=(name, job, interval), name=name, daemon=True).start()


def _every(name: str, job: Callable[[], Any], interval: float) -> None:
    while True:
        try:
            job()
        except Exception:
            log.exception("%s failed; it runs again in %.0f s", name, interval)
        time.sleep(interval)


GUNICORN_SETTINGS: dict[str, Any] = {
    name: value for name, value in dict(globals()).items()
    if name in ("worker_class", "workers", "keepalive", "timeout", "graceful_timeout",
                "limit_request_line", "limit_request_fields", "limit_request_field_size", "accesslog",
                "control_socket_disable", "pre_fork", "on_reload", "post_worker_init")
}


class ScepServer(BaseApplication):
    """gunicorn run in this process (the arbiter) on the product's ASGI application, with GUNICORN_SETTINGS and
    `options` over them; `ready(url)` is called once it listens."""

    def __init__(self, options: dict[str, Any], ready: Callable[[str], None]) -> None:
        self.options = options
        self.ready = ready
        super().__init__()

    def load_config(self) -> None:
        for name, value in {**GUNICORN_SETTINGS, **self.options, "when_ready": self._when_ready}.items():
            self.cfg.set(name, value)

    def load(self) -> Callable[..., Any]:
        from scep.http.asgi import create_app

        return create_app()

    def _when_ready(self, server: Any) -> None:
        self.ready(listening_url(server.LISTENERS[0].sock.getsockname()))


def listening_url(address: tuple) -> str:
    """The URL a client on this machine uses for a listening address (a wildcard address becomes loopback)."""
    host, port = address[0], address[1]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
