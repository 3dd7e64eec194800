"""Shared fixtures: a pool of RSA keys (slow to generate), a local CA, and an in-process SCEP service."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from scep.challenge.static import StaticValidator
from scep.core.ca import CaOptions, init_root
from scep.core.service import ScepService, ServiceOptions
from scep.keys.local import LocalHome
from scep.store.sqlite import SqliteStore
from tests.azurite import azurite  # noqa: F401 - session fixture: Azurite, started on first use
from tests.emulators.intune import IntuneTestbed, running_intune

CHALLENGE = "correct horse battery staple"


class KeyPool:
    """Hands out distinct RSA-2048 keys; a few are generated up front, more on demand."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    def new(self, bits: int = 2048) -> rsa.RSAPrivateKey:
        with self._lock:
            self._count += 1
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)


@pytest.fixture(scope="session")
def keys() -> KeyPool:
    return KeyPool()


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("ca")
    init_root(LocalHome(directory), CaOptions())
    return directory


@pytest.fixture
def make_service(ca_dir: Path, tmp_path: Path) -> Callable[..., ScepService]:
    def build(validator=None, **options) -> ScepService:
        store = SqliteStore(tmp_path / "scep.db")
        return ScepService(LocalHome(ca_dir), store, validator or StaticValidator(CHALLENGE), ServiceOptions(**options))

    return build


@pytest.fixture
def service(make_service) -> ScepService:
    return make_service()


@pytest.fixture(scope="module")
def running() -> Iterator[IntuneTestbed]:
    """Entra ID and Intune emulators with one registered application, for a module's tests."""
    with running_intune() as bed:
        yield bed


@pytest.fixture
def testbed(running: IntuneTestbed, monkeypatch: pytest.MonkeyPatch) -> IntuneTestbed:
    running.reset()
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", running.intune.ca_bundle_path)
    return running
