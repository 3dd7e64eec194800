"""Fixtures for the interoperability tests: `scep serve` subprocesses with the settings each client needs."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import pytest

from . import CHALLENGE, ScepServer

ServerFactory = Callable[..., ScepServer]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "interop: end-to-end test of `scep serve` against a real SCEP client binary over HTTP"
    )


@pytest.fixture(scope="module")
def start_server() -> Iterator[ServerFactory]:
    """Start `scep serve` with the static test challenge plus `env`; every server is stopped at module end."""
    servers: list[ScepServer] = []

    def start(env: Mapping[str, str] | None = None, *, workers: int = 2) -> ScepServer:
        server = ScepServer(env={"SCEP_CHALLENGE": CHALLENGE, **(env or {})}, workers=workers)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.close()
