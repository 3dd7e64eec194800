"""certmonger 0.79 (Debian `certmonger`) against `scep serve`, through the daemon and through scep-submit.

The daemon runs in session mode on a private D-Bus (no system bus needed, no root services touched): a
throwaway dbus-daemon without service activation, `certmonger -s -n -B` with every state directory pointed
into the test's temp dir (CERTMONGER_*_DIR), and `getcert ... -s`. certmonger's scep-submit helper always
uses GET (also for PKIOperation), sends `message=0` with GetCACaps/GetCACert and picks AES-256 when `AES` is
advertised. `getcert rekey` makes it send a request for a new key signed by the old certificate.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from . import (
    CHALLENGE,
    ClientRun,
    ScepServer,
    assert_end_entity_from,
    load_certificate,
    require_binary,
    run_client,
)

pytestmark = pytest.mark.interop

SCEP_SUBMIT_CANDIDATES = ("/usr/libexec/certmonger/scep-submit", "/usr/lib/certmonger/scep-submit")
STARTUP_TIMEOUT_SECONDS = 20
ISSUE_TIMEOUT_SECONDS = 60
BASE64_LINE = re.compile(r"^[A-Za-z0-9+/=]{40,}$")
FAILED_STATES = {"CA_REJECTED", "CA_UNREACHABLE", "CA_UNCONFIGURED", "CA_REFUSED"}

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


def scep_submit_path() -> str:
    for candidate in SCEP_SUBMIT_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("certmonger's scep-submit helper not installed (Debian package: certmonger)")


class CertmongerSession:
    """A private session bus plus a certmonger daemon on it, all state under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "bus"
        self.state = root / "state"
        self._processes: list[subprocess.Popen[bytes]] = []

    @property
    def environment(self) -> dict[str, str]:
        environment = {
            name: value for name, value in os.environ.items()
            if not name.startswith(("CERTMONGER_", "DBUS_"))
        }
        environment.update(
            HOME=str(self.root),
            XDG_CONFIG_HOME=str(self.root / "config"),
            XDG_DATA_HOME=str(self.root / "data"),
            DBUS_SESSION_BUS_ADDRESS=f"unix:path={self.socket}",
            CERTMONGER_CAS_DIR=str(self.state / "cas"),
            CERTMONGER_REQUESTS_DIR=str(self.state / "requests"),
            CERTMONGER_LOCAL_CA_DIR=str(self.state / "local"),
            CERTMONGER_CONFIG_DIR=str(self.state / "config"),
            CERTMONGER_SYSTEM_LOCK_FILE=str(self.state / "lock"),
            CERTMONGER_TMPDIR=str(self.state / "tmp"),
        )
        return environment

    def start(self) -> None:
        for directory in ("cas", "requests", "local", "config", "tmp"):
            (self.state / directory).mkdir(parents=True, exist_ok=True)
        config = self.root / "bus.conf"
        config.write_text(BUS_CONFIG.format(socket=self.socket))
        self._spawn("dbus", ["dbus-daemon", f"--config-file={config}", "--nofork", "--nopidfile"])
        self._wait_for(self.socket.exists, "the private D-Bus socket")
        self._spawn("certmonger", ["certmonger", "-s", "-n", "-B", "-d", "2"])
        self._wait_for(lambda: self.getcert("list-cas").succeeded, "certmonger on the session bus")

    def _spawn(self, name: str, command: list[str]) -> None:
        with open(self.root / f"{name}.log", "wb") as log:
            process = subprocess.Popen(
                command, env=self.environment, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
            )
        self._processes.append(process)

    def _wait_for(self, condition, what: str) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if condition():
                return
            for process in self._processes:
                if process.poll() is not None:
                    raise AssertionError(f"{process.args[0]} exited ({process.returncode})\n{self.logs()}")
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}\n{self.logs()}")

    def getcert(self, command: str, *args, timeout: float = 30) -> ClientRun:
        return run_client(["getcert", command, "-s", *args], env=self.environment, timeout=timeout)

    def logs(self) -> str:
        parts = []
        for name in ("dbus", "certmonger"):
            path = self.root / f"{name}.log"
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()
                readable = "\n".join(line for line in lines if not BASE64_LINE.match(line))
                parts.append(f"--- {name} log (tail, base64 lines left out) ---\n{readable[-6000:]}")
        return "\n".join(parts)

    def status(self, request_id: str) -> tuple[str, str]:
        listing = self.getcert("list", "-i", request_id)
        for line in listing.stdout.splitlines():
            if line.strip().startswith("status:"):
                return line.split(":", 1)[1].strip(), listing.stdout
        return "", listing.stdout + listing.stderr

    def wait_for_status(self, request_id: str, wanted: set[str], until=lambda: True) -> str:
        """Poll `getcert list` until the request reaches one of `wanted` (and `until()` holds)."""
        deadline = time.monotonic() + ISSUE_TIMEOUT_SECONDS
        status, listing = "", ""
        while time.monotonic() < deadline:
            status, listing = self.status(request_id)
            if status in wanted and until():
                return listing
            if status in FAILED_STATES - wanted:
                break
            time.sleep(0.5)
        raise AssertionError(
            f"request {request_id} is {status or 'unknown'}, wanted {sorted(wanted)}\n{listing}\n{self.logs()}"
        )

    def close(self) -> None:
        for process in reversed(self._processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=10)


@pytest.fixture(scope="module")
def server(start_server) -> ScepServer:
    return start_server()


@pytest.fixture(scope="module")
def certmonger(tmp_path_factory) -> Iterator[CertmongerSession]:
    for binary in ("certmonger", "getcert", "dbus-daemon"):
        require_binary(binary)
    root = tmp_path_factory.mktemp("certmonger")
    session = CertmongerSession(root)
    try:
        session.start()
        yield session
    finally:
        session.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def scep_ca(certmonger: CertmongerSession, server: ScepServer) -> str:
    name = "InteropSCEP"
    added = certmonger.getcert("add-scep-ca", "-c", name, "-u", server.scep_url)
    assert added.succeeded, added.describe(server)
    return name


def sha1_thumbprint(certificate: x509.Certificate) -> str:
    return certificate.fingerprint(hashes.SHA1()).hex().upper()


def serial_of(path: Path) -> int | None:
    try:
        return load_certificate(path).serial_number
    except (FileNotFoundError, ValueError):
        return None


def spki(key_or_cert) -> bytes:
    return key_or_cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_scep_submit_reads_caps_and_ca_certificates(server, tmp_path):
    helper = scep_submit_path()
    caps = run_client([helper, "-u", server.scep_url, "-c"])
    assert caps.succeeded, caps.describe(server)
    advertised = {line.strip() for line in caps.stdout.splitlines() if line.strip()}
    assert {"POSTPKIOperation", "SHA-256", "AES"} <= advertised, caps.stdout

    certificates = run_client([helper, "-u", server.scep_url, "-C"])
    assert certificates.succeeded, certificates.describe(server)
    chain = x509.load_pem_x509_certificates(certificates.stdout.encode())
    assert chain[0] == load_certificate(server.ra_pem_path), "scep-submit prints the RA certificate first"
    assert load_certificate(server.ca_pem_path) in chain


def test_add_scep_ca_discovers_the_ca(certmonger, server, scep_ca):
    ca_thumbprint = sha1_thumbprint(load_certificate(server.ca_pem_path))
    deadline = time.monotonic() + ISSUE_TIMEOUT_SECONDS
    listing = ""
    while time.monotonic() < deadline:
        listing = certmonger.getcert("list-cas", "-c", scep_ca).stdout
        if ca_thumbprint in listing.replace(" ", ""):
            return
        time.sleep(0.5)
    raise AssertionError(f"CA thumbprint {ca_thumbprint} never listed\n{listing}\n{certmonger.logs()}")


def test_request_is_issued_and_rekey_renews(certmonger, server, scep_ca, tmp_path):
    key_path, cert_path = tmp_path / "key.pem", tmp_path / "cert.pem"
    requested = certmonger.getcert(
        "request", "-c", scep_ca, "-I", "interop-device",
        "-k", str(key_path), "-f", str(cert_path),
        "-N", "CN=certmonger-device,O=Interop", "-D", "certmonger-device.example.test",
        "-L", CHALLENGE,
    )
    assert requested.succeeded, requested.describe(server)
    certmonger.wait_for_status("interop-device", {"MONITORING"}, until=cert_path.exists)

    ca = load_certificate(server.ca_pem_path)
    issued = load_certificate(cert_path)
    assert_end_entity_from(issued, ca, cn="certmonger-device")
    names = issued.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "certmonger-device.example.test" in names.get_values_for_type(x509.DNSName)
    first_key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert spki(issued) == spki(first_key)

    rekeyed = certmonger.getcert("rekey", "-i", "interop-device")
    assert rekeyed.succeeded, rekeyed.describe(server)
    certmonger.wait_for_status(
        "interop-device", {"MONITORING"}, until=lambda: serial_of(cert_path) not in (None, issued.serial_number)
    )
    renewed = load_certificate(cert_path)
    assert_end_entity_from(renewed, ca, cn="certmonger-device")
    new_key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert spki(renewed) == spki(new_key) != spki(first_key)
    certmonger.getcert("stop-tracking", "-i", "interop-device")


def test_wrong_challenge_is_rejected(certmonger, server, scep_ca, tmp_path):
    cert_path = tmp_path / "cert.pem"
    requested = certmonger.getcert(
        "request", "-c", scep_ca, "-I", "interop-wrong-challenge",
        "-k", str(tmp_path / "key.pem"), "-f", str(cert_path),
        "-N", "CN=certmonger-wrong-challenge", "-L", "not-the-challenge",
    )
    assert requested.succeeded, requested.describe(server)
    certmonger.wait_for_status("interop-wrong-challenge", {"CA_REJECTED"})
    assert not cert_path.exists()
    certmonger.getcert("stop-tracking", "-i", "interop-wrong-challenge")
