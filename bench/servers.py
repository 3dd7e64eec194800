"""The servers the benchmark measures: each a subprocess in its own process group with a throwaway data directory.

The product's `scep serve` and micromdm's `scepserver` live here; step-ca, which is built first, is in
`bench.stepca`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType

REPO_ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT = 60.0
STOP_GRACE_SECONDS = 10.0
MICROMDM_BINARY = "scepserver"


class ServerError(RuntimeError):
    """A server would not start; the message carries its output."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ManagedServer(ABC):
    """A server subprocess in its own process group, with a throwaway data directory."""

    name = ""
    scep_path = ""

    def __init__(self, key_size: int, challenge: str) -> None:
        self.key_size = key_size
        self.challenge = challenge
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"scep-bench-{self.name}-"))
        self.log_path = self.workdir / "server.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def scep_url(self) -> str:
        return self.base_url + self.scep_path

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @abstractmethod
    def initialize(self) -> None:
        """Create the CA before the server starts."""

    @abstractmethod
    def command(self) -> list[str]:
        """The server's command line."""

    @abstractmethod
    def ready_url(self) -> str:
        """A URL that answers 200 once the server serves."""

    def environment(self) -> dict[str, str]:
        return {name: value for name, value in os.environ.items() if not name.startswith("SCEP_")}

    def start(self) -> ManagedServer:
        self.initialize()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                cwd=REPO_ROOT,
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_until_ready()
        return self

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise ServerError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(self.ready_url(), timeout=2) as response,
            ):
                if response.status == 200:
                    return
            time.sleep(0.1)
        raise ServerError(f"{self.name} not ready after {STARTUP_TIMEOUT:.0f} s:\n{self.log_tail()}")

    def log_tail(self, limit: int = 4000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-limit:]

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=STOP_GRACE_SECONDS)
        # Whatever is left of the group (pre-forked workers included) goes too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=STOP_GRACE_SECONDS)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> ManagedServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


class ProductServer(ManagedServer):
    """`scep serve` with a local CA of the given key size and a static challenge."""

    name = "product"
    scep_path = "/api/scep"

    def __init__(self, key_size: int, challenge: str, workers: int) -> None:
        super().__init__(key_size, challenge)
        self.workers = workers
        self.data_dir = self.workdir / "data"

    def environment(self) -> dict[str, str]:
        environment = super().environment()
        environment.update(SCEP_DATA_DIR=str(self.data_dir), SCEP_CHALLENGE=self.challenge, PYTHONUNBUFFERED="1")
        return environment

    def initialize(self) -> None:
        command = [sys.executable, "-m", "scep.tools.cli", "ca", "init", "--key-size", str(self.key_size)]
        run_setup(command, self.environment(), self.name)

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "scep.tools.cli", "serve",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers),
        ]  # fmt: skip

    def ready_url(self) -> str:
        return self.base_url + "/api/health"


class MicromdmServer(ManagedServer):
    """micromdm's `scepserver` with a fresh depot. It has no RA: its CA certificate is the recipient and signer.

    It takes only a port and listens on every interface (no bind-address option); the benchmark talks to it
    on 127.0.0.1 only.
    """

    name = "micromdm"
    scep_path = "/scep"

    def __init__(self, key_size: int, challenge: str, binary: str = MICROMDM_BINARY) -> None:
        super().__init__(key_size, challenge)
        self.binary = binary
        self.depot = self.workdir / "depot"

    def initialize(self) -> None:
        command = [self.binary, "ca", "-init", "-depot", str(self.depot), "-keySize", str(self.key_size)]
        run_setup(command, self.environment(), self.name)

    def command(self) -> list[str]:
        return [self.binary, "-depot", str(self.depot), "-port", str(self.port), "-challenge", self.challenge]

    def ready_url(self) -> str:
        return self.scep_url + "?operation=GetCACaps"


def run_setup(command: list[str], environment: dict[str, str], name: str) -> None:
    finished = subprocess.run(
        command, cwd=REPO_ROOT, env=environment, stdin=subprocess.DEVNULL, capture_output=True, timeout=300
    )
    if finished.returncode != 0:
        output = (finished.stdout + finished.stderr).decode(errors="replace")
        raise ServerError(f"{name}: `{' '.join(command[:4])} ...` failed ({finished.returncode}):\n{output}")


def micromdm_version(binary: str = MICROMDM_BINARY) -> str:
    if shutil.which(binary) is None:
        return "not installed"
    finished = subprocess.run([binary, "-version"], capture_output=True, timeout=30)
    lines = (finished.stdout + finished.stderr).decode(errors="replace").strip().splitlines()
    return lines[0] if lines else "unknown"
