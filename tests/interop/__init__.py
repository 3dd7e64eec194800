"""End-to-end tests of `scep serve` against real SCEP clients (micromdm scepclient, strongSwan pki, certmonger).

Shared helpers: running a client binary with a bounded time and readable failure messages, and checking the
certificates the clients end up with.
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

TESTS_DIR = Path(__file__).resolve().parents[1]
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from serverproc import ScepServer  # noqa: E402

__all__ = [
    "CHALLENGE",
    "ClientRun",
    "ScepServer",
    "assert_end_entity_from",
    "common_name",
    "load_certificate",
    "require_binary",
    "run_client",
]

CHALLENGE = "interop-Challenge-1234"
CLIENT_TIMEOUT_SECONDS = 60


@dataclass
class ClientRun:
    command: list[str]
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool = False

    @property
    def succeeded(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def describe(self, server: ScepServer | None = None) -> str:
        status = "timed out" if self.timed_out else f"exit code {self.returncode}"
        text = (
            f"`{' '.join(self.command)}` -> {status}\n"
            f"--- client stdout ---\n{self.stdout[-4000:]}\n--- client stderr ---\n{self.stderr[-4000:]}"
        )
        if server is not None:
            text += "\n" + server.output_tail()
        return text


def require_binary(name: str) -> str:
    """Absolute path of a client binary; a missing one fails the test (`.ci/run` installs every one of them)."""
    path = shutil.which(name) or (name if os.path.isabs(name) and os.access(name, os.X_OK) else None)
    if path is None:
        pytest.fail(f"{name} not installed: run .ci/run, which installs the Debian packages it comes from")
    return path


def run_client(
    command: Sequence[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
    timeout: float = CLIENT_TIMEOUT_SECONDS,
) -> ClientRun:
    """Run a client to completion (or kill it after `timeout`), capturing its output as text."""
    args = [str(part) for part in command]
    try:
        completed = subprocess.run(
            args,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as expired:
        return ClientRun(args, None, _text(expired.stdout), _text(expired.stderr), timed_out=True)
    return ClientRun(args, completed.returncode, _text(completed.stdout), _text(completed.stderr))


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")


def load_certificate(path: Path) -> x509.Certificate:
    data = path.read_bytes()
    if b"-----BEGIN" in data:
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def common_name(certificate: x509.Certificate) -> str:
    attributes = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attributes[0].value) if attributes else ""


def assert_end_entity_from(certificate: x509.Certificate, ca: x509.Certificate, *, cn: str) -> None:
    """Signed by `ca`, issuer = CA subject, has the CN, currently valid and not a CA."""
    certificate.verify_directly_issued_by(ca)
    assert certificate.issuer == ca.subject
    assert common_name(certificate) == cn, certificate.subject.rfc4514_string()
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    assert constraints is None or not constraints.ca, "issued certificate must not be a CA"
    now = datetime.datetime.now(datetime.timezone.utc)
    assert certificate.not_valid_before_utc <= now < certificate.not_valid_after_utc, (
        f"not valid now: {certificate.not_valid_before_utc} .. {certificate.not_valid_after_utc}"
    )
