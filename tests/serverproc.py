"""Run the product's HTTP server (`scep serve`) as a subprocess for end-to-end tests.

`ScepServer` starts `python -m scep.tools.cli serve` on 127.0.0.1 and a free port, in its own process group (the
server pre-forks workers), with a throwaway SCEP_DATA_DIR unless one is given. It waits until GET /api/health
answers 200 and fails with the server's own output otherwise. Settings inherited from the caller's
environment that start with SCEP_ are dropped so that a test sees only what it passes in `env`.

    with ScepServer(env={"SCEP_CHALLENGE": "s3cret"}) as server:
        requests.get(server.scep_url, params={"operation": "GetCACaps"})
        server.kill()       # SIGKILL to the whole process group
        server.restart()    # same port, same data dir
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
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STARTUP_TIMEOUT = 30.0
STOP_GRACE_SECONDS = 10.0
HEALTH_POLL_INTERVAL = 0.1
OUTPUT_TAIL_CHARS = 6000


class ServerStartError(RuntimeError):
    """The server exited or did not become healthy in time; the message carries its output."""


def wait_for(condition, what: str, timeout: float = 30.0):
    """The first true value condition() returns, polled until `timeout` seconds; AssertionError naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def hermetic_environment(overrides: Mapping[str, str]) -> dict[str, str]:
    environment = {name: value for name, value in os.environ.items() if not name.startswith("SCEP_")}
    environment["PYTHONUNBUFFERED"] = "1"
    environment.update(overrides)
    return environment


def run_cli(environment: Mapping[str, str], *arguments: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a `scep` command (`python -m scep.tools.cli ...`) from the repository with only the given SCEP_ settings."""
    return subprocess.run(
        [sys.executable, "-m", "scep.tools.cli", *arguments],
        cwd=REPO_ROOT, env=hermetic_environment(environment), capture_output=True, text=True, timeout=timeout,
    )


class ScepServer:
    """A `scep serve` subprocess; use as a context manager or call start()/close() yourself."""

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        workers: int = 1,
        data_dir: Path | str | None = None,
        port: int | None = None,
        python: str | None = None,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
    ) -> None:
        self.workers = workers
        self.port = port or free_port()
        self.python = python or sys.executable
        self.startup_timeout = startup_timeout
        self._extra_env = dict(env or {})
        self._owned_data_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="scep-data-"))
        self._log_dir = Path(tempfile.mkdtemp(prefix="scep-server-log-"))
        self._process: subprocess.Popen[bytes] | None = None
        self._generation = 0

    # --- addresses ---------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def scep_url(self) -> str:
        return f"{self.url}/api/scep"

    @property
    def health_url(self) -> str:
        return f"{self.url}/api/health"

    @property
    def ca_pem_path(self) -> Path:
        return self.data_dir / "ca.pem"

    @property
    def ra_pem_path(self) -> Path:
        return self.data_dir / "ra.pem"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # --- output --------------------------------------------------------------------------------------------

    @property
    def stdout(self) -> str:
        return self._read_logs("stdout")

    @property
    def stderr(self) -> str:
        return self._read_logs("stderr")

    def output(self) -> str:
        """stdout and stderr of every run so far, for failure messages."""
        return f"--- server stdout ---\n{self.stdout}\n--- server stderr ---\n{self.stderr}"

    def output_tail(self, limit: int = OUTPUT_TAIL_CHARS) -> str:
        text = self.output()
        return text if len(text) <= limit else "...\n" + text[-limit:]

    def _read_logs(self, stream: str) -> str:
        parts = []
        for generation in range(1, self._generation + 1):
            path = self._log_dir / f"{stream}-{generation}.log"
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "".join(parts)

    # --- lifecycle -----------------------------------------------------------------------------------------

    def command(self) -> list[str]:
        return [
            self.python, "-m", "scep.tools.cli", "serve",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers),
        ]

    def environment(self) -> dict[str, str]:
        return hermetic_environment({"SCEP_DATA_DIR": str(self.data_dir), **self._extra_env})

    def start(self) -> ScepServer:
        if self.running:
            raise RuntimeError("server already running")
        self._generation += 1
        stdout = open(self._log_dir / f"stdout-{self._generation}.log", "wb")  # noqa: SIM115
        stderr = open(self._log_dir / f"stderr-{self._generation}.log", "wb")  # noqa: SIM115
        with stdout, stderr:
            self._process = subprocess.Popen(
                self.command(),
                cwd=REPO_ROOT,
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            )
        try:
            self._wait_until_healthy()
        except BaseException:
            self._kill_group()
            raise
        return self

    def _wait_until_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last_problem = "no answer yet"
        while time.monotonic() < deadline:
            assert self._process is not None
            exit_code = self._process.poll()
            if exit_code is not None:
                raise ServerStartError(
                    f"`{' '.join(self.command())}` exited with {exit_code} before becoming healthy\n"
                    + self.output_tail()
                )
            last_problem = self._health_problem()
            if last_problem is None:
                return
            time.sleep(HEALTH_POLL_INTERVAL)
        raise ServerStartError(
            f"server on port {self.port} not healthy after {self.startup_timeout:.0f} s "
            f"({last_problem})\n" + self.output_tail()
        )

    def _health_problem(self) -> str | None:
        try:
            with urllib.request.urlopen(self.health_url, timeout=2) as response:
                if response.status == 200:
                    return None
                return f"GET /api/health answered {response.status}"
        except urllib.error.HTTPError as error:
            return f"GET /api/health answered {error.code}"
        except (OSError, urllib.error.URLError) as error:
            return f"GET /api/health failed: {error}"

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> int | None:
        """SIGTERM to the server; after `grace` seconds SIGKILL. Leftover workers are always killed."""
        exit_code = None
        if self._process is not None:
            if self._process.poll() is None:
                self._signal_group(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._process.wait(timeout=grace)
            exit_code = self._process.poll()
        self._kill_group()
        return exit_code

    def kill(self) -> None:
        """SIGKILL to the whole process group: a crash, as hard as it gets."""
        self._kill_group()

    def restart(self) -> ScepServer:
        """Stop (if running) and start again on the same port with the same data directory."""
        self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()
        if self._owned_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        shutil.rmtree(self._log_dir, ignore_errors=True)

    def _signal_group(self, signum: signal.Signals) -> None:
        if self._process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, signum)

    def _kill_group(self) -> None:
        if self._process is None:
            return
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=STOP_GRACE_SECONDS)

    def __enter__(self) -> ScepServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
