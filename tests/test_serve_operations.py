"""`scep serve` from outside: log lines a client cannot forge, exact Content-Type headers, expiry warnings at start,
and the RA renewing itself at start (local custody, pre-forked workers)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509

from scep.core.protocol import PkiStatus
from scep.logs import MAX_VALUE_CHARS
from scep.tools.client import ScepClient, make_csr, new_enrollment
from tests.conftest import CHALLENGE
from tests.serverproc import ScepServer, run_cli, wait_for

FORGED = "2099-01-01 00:00:00,000 ERROR scep.core.service: FORGED"


def fetch(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers.items()), error.read()


@pytest.fixture(scope="module")
def server():
    with ScepServer(env={"SCEP_CHALLENGE": CHALLENGE, "SCEP_LOG_LEVEL": "info"}, workers=1) as running:
        yield running


def enrol_with_transaction_id(server: ScepServer, keys, transaction_id: str) -> None:
    client = ScepClient(server.scep_url)
    ra, _ = client.ca_certificates()
    key = keys.new()
    enrollment = new_enrollment(key, make_csr(key, "log-test", CHALLENGE), transaction_id=transaction_id)
    assert client.enroll(enrollment, ra).status is PkiStatus.SUCCESS


def logged_line_with(server: ScepServer, marker: str) -> str:
    return wait_for(
        lambda: next((line for line in server.stderr.splitlines() if marker in line), None), f"a line with {marker}"
    )


def test_a_newline_in_a_transaction_id_does_not_forge_a_log_line(server, keys):
    enrol_with_transaction_id(server, keys, f"tx-newline\n{FORGED}\r\x1b[2J\x07")
    line = logged_line_with(server, "tx-newline")
    assert f"tx-newline\\n{FORGED}\\r\\x1b[2J\\x07 issued serial" in line
    assert not any(entry.startswith(FORGED) for entry in server.stderr.splitlines())
    assert "\x1b" not in server.stderr and "\x07" not in server.stderr


def test_an_overlong_transaction_id_is_bounded_in_the_log(server, keys):
    long_id = "L" * 256
    enrol_with_transaction_id(server, keys, long_id)
    line = logged_line_with(server, "L" * MAX_VALUE_CHARS)
    assert "L" * (MAX_VALUE_CHARS + 1) not in line
    assert f"...({256 - MAX_VALUE_CHARS} more characters) issued serial" in line


@pytest.mark.parametrize(
    "path,status,content_type",
    [
        ("/api/scep?operation=GetCACaps", 200, "text/plain; charset=utf-8"),
        ("/api/scep?operation=Bogus", 400, "text/plain; charset=utf-8"),
        ("/api/scep?operation=GetNextCACert", 404, "text/plain; charset=utf-8"),
        ("/api/nowhere", 404, "text/plain; charset=utf-8"),
        ("/api/scep?operation=GetCACert", 200, "application/x-x509-ca-ra-cert"),
        ("/api/health", 200, "application/json"),
    ],
)
def test_content_type_is_exact_with_one_charset(server, path, status, content_type):
    answered, headers, _ = fetch(server.url + path)
    assert (answered, headers["Content-Type"]) == (status, content_type)


def prepared_data_dir(tmp_path: Path, *lifecycle: tuple[str, ...]) -> Path:
    data_dir = tmp_path / "data"
    for arguments in lifecycle:
        completed = run_cli({"SCEP_DATA_DIR": str(data_dir)}, *arguments)
        assert completed.returncode == 0, completed.stderr
    return data_dir


def test_a_short_lived_ra_is_renewed_at_start_by_one_worker(tmp_path):
    data_dir = prepared_data_dir(tmp_path, ("ca", "init"), ("ca", "ra", "renew", "--days", "5"))
    short = x509.load_pem_x509_certificate((data_dir / "ra.pem").read_bytes())
    with ScepServer(env={"SCEP_CHALLENGE": CHALLENGE}, workers=3, data_dir=data_dir) as server:
        renewed = wait_for(lambda: _renewed_ra(server, short), "the renewed RA in GetCACert")
        assert renewed.not_valid_after_utc - short.not_valid_after_utc > timedelta(days=600)
        # every worker picks the new RA up from the files within a few seconds
        wait_for(lambda: all(_health_status(server) == "ok" for _ in range(6)), "health ok from every worker")
        log = server.stderr
    assert "WARNING scep.core.maintenance: the RA certificate CN=SCEP RA" in log and "scep ca ra renew" in log
    assert log.count("RA renewed") == 1, log


def _health_status(server: ScepServer) -> str:
    return json.loads(fetch(server.health_url)[2])["status"]


def _renewed_ra(server: ScepServer, old: x509.Certificate) -> x509.Certificate | None:
    ra, _ = ScepClient(server.scep_url).ca_certificates()
    return ra if ra.serial_number != old.serial_number else None


def test_a_ca_near_its_end_warns_at_start_and_health_is_degraded(tmp_path):
    data_dir = prepared_data_dir(tmp_path, ("ca", "init", "--days", "20"))
    with ScepServer(env={"SCEP_CHALLENGE": CHALLENGE}, workers=2, data_dir=data_dir) as server:
        status, _, body = fetch(server.health_url)
        report = json.loads(body)
        log = server.stderr
    assert status == 200 and report["status"] == "degraded" and report["ca"]["expiry"] == "expiring"
    warnings = [line for line in log.splitlines() if "the CA certificate" in line]
    assert len(warnings) == 1 and warnings[0].split()[2] == "WARNING", log
    assert "scep ca rollover" in warnings[0] and "scep ca promote" in warnings[0]
