"""Azurite (Microsoft's Azure Storage emulator) for tests: find or install it, run it on loopback, stop it.

Lookup order for the `azurite-table` launcher: $AZURITE_BIN_DIR, the repository's `.azurite/` cache, PATH.
When none has it and npm is present, `npm install azurite@AZURITE_VERSION` goes into `.azurite/` (gitignored).
The account key below is Azurite's published development key, not a secret.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

# 3.36 and later require Node 21+; 3.35.0 runs on the Node 20 that Debian and these machines ship.
AZURITE_VERSION = "3.35.0"
ACCOUNT_NAME = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / ".azurite"
START_TIMEOUT_S = 30.0


class AzuriteUnavailable(RuntimeError):
    """Azurite is not installed and cannot be installed here (no Node.js/npm, or the install failed)."""


@dataclass(frozen=True)
class Azurite:
    table_endpoint: str

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT_NAME};AccountKey={ACCOUNT_KEY};"
            f"TableEndpoint={self.table_endpoint};"
        )


def find_or_install_azurite_table() -> Path:
    """Path to the `azurite-table` launcher, installing Azurite into .azurite/ when it is nowhere to be found."""
    found = _find_launcher()
    if found:
        return found
    npm = shutil.which("npm")
    if not npm or not shutil.which("node"):
        raise AzuriteUnavailable("Azurite needs Node.js and npm; neither azurite-table nor npm is on PATH")
    CACHE_DIR.mkdir(exist_ok=True)
    with open(CACHE_DIR / ".install-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test processes install once
        found = _find_launcher()
        if found:
            return found
        package = f"azurite@{AZURITE_VERSION}"
        command = [npm, "install", "--no-audit", "--no-fund", "--save-exact", "--prefix", str(CACHE_DIR), package]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
        if result.returncode != 0:
            raise AzuriteUnavailable(f"npm install azurite failed: {result.stderr.strip()[-2000:]}")
    found = _find_launcher()
    if not found:
        raise AzuriteUnavailable("npm installed azurite but azurite-table is missing from .azurite/node_modules/.bin")
    return found


def _find_launcher() -> Path | None:
    candidates = []
    if os.environ.get("AZURITE_BIN_DIR"):
        candidates.append(Path(os.environ["AZURITE_BIN_DIR"]) / "azurite-table")
    candidates.append(CACHE_DIR / "node_modules" / ".bin" / "azurite-table")
    on_path = shutil.which("azurite-table")
    if on_path:
        candidates.append(Path(on_path))
    return next((path for path in candidates if path.is_file() and os.access(path, os.X_OK)), None)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def _start(launcher: Path, port: int, workdir: Path) -> subprocess.Popen | None:
    """Start azurite-table on the port; None when it exited at once (the port was taken meanwhile)."""
    command = [
        str(launcher),
        "--tableHost", "127.0.0.1",
        "--tablePort", str(port),
        "--inMemoryPersistence",
        "--skipApiVersionCheck",
        "--loose",
        "--disableTelemetry",
        "--silent",
    ]  # fmt: skip
    log = open(workdir / "azurite.log", "wb")  # noqa: SIM115 - handed to the child, closed below
    try:
        process = subprocess.Popen(
            command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    finally:
        log.close()
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return None
        if _answers(port):
            return process
        time.sleep(0.1)
    _stop(process)
    raise AzuriteUnavailable(f"azurite-table did not answer on 127.0.0.1:{port} within {START_TIMEOUT_S:.0f} s")


@contextmanager
def azurite_tables(launcher: Path | None = None) -> Iterator[Azurite]:
    """Run Azurite's table service on a free loopback port for the duration of the block."""
    launcher = launcher or find_or_install_azurite_table()
    with tempfile.TemporaryDirectory(prefix="azurite-") as workdir:
        for _ in range(5):
            port = _free_port()
            process = _start(launcher, port, Path(workdir))
            if process is not None:
                break
        else:
            output = (Path(workdir) / "azurite.log").read_text(errors="replace")[-2000:]
            raise AzuriteUnavailable(f"azurite-table would not start: {output}")
        try:
            yield Azurite(table_endpoint=f"http://127.0.0.1:{port}/{ACCOUNT_NAME}")
        finally:
            _stop(process)


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    """Session-wide Azurite. Skips where Node.js is missing, except under CI, where that is an error."""
    try:
        launcher = find_or_install_azurite_table()
    except AzuriteUnavailable as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"Azurite unavailable: {error}")
    with azurite_tables(launcher) as instance:
        yield instance
