"""End to end over real HTTP against `scep serve`, with the project's own client: every algorithm, GET and
POST, renewal, retransmission, CertPoll, bad input, and a hard kill in the middle of a run."""

from __future__ import annotations

import http.client
import os
import socket
import sqlite3
import threading
import time

import pytest
from cryptography import x509

from scep.core.protocol import ContentCipher, FailInfo, PkiStatus
from scep.keys import KeyTransport
from scep.tools.client import (
    RequestOptions,
    ScepClient,
    ScepClientError,
    make_csr,
    new_enrollment,
)
from tests.conftest import CHALLENGE
from tests.serverproc import ScepServer

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server():
    with ScepServer(env={"SCEP_CHALLENGE": CHALLENGE}, workers=2) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> ScepClient:
    return ScepClient(server.scep_url)


@pytest.fixture(scope="module")
def ra_ca(client):
    return client.ca_certificates()


MATRIX = [
    RequestOptions(ContentCipher.AES128, "sha256", KeyTransport.RSA_PKCS1V15, "POST"),
    RequestOptions(ContentCipher.AES128, "sha1", KeyTransport.RSA_PKCS1V15, "GET"),
    RequestOptions(ContentCipher.AES192, "sha384", KeyTransport.RSA_OAEP_SHA1, "POST"),
    RequestOptions(ContentCipher.AES256, "sha512", KeyTransport.RSA_OAEP_SHA256, "GET"),
    RequestOptions(ContentCipher.AES256, "sha256", KeyTransport.RSA_PKCS1V15, "POST"),
    RequestOptions(ContentCipher.DES3, "sha256", KeyTransport.RSA_PKCS1V15, "GET"),
    RequestOptions(ContentCipher.DES3, "sha512", KeyTransport.RSA_OAEP_SHA1, "POST"),
]


@pytest.mark.parametrize("options", MATRIX, ids=lambda o: f"{o.cipher.value}-{o.digest}-{o.transport.value}-{o.method}")
def test_enrol_over_http(client, ra_ca, keys, options):
    ra, ca = ra_ca
    key = keys.new()
    enrollment = new_enrollment(key, make_csr(key, f"http-{options.cipher.value}", CHALLENGE, ("h.example",)))
    result = client.enroll(enrollment, ra, options)
    assert result.status is PkiStatus.SUCCESS, result.fail_info_text
    result.certificate.verify_directly_issued_by(ca)


def test_paths_clients_use_by_habit(server, ra_ca, keys):
    ra, _ = ra_ca
    for path in ("/cgi-bin/pkiclient.exe", "/certsrv/mscep/mscep.dll", "/api/scep/pkiclient.exe"):
        key = keys.new()
        enrollment = new_enrollment(key, make_csr(key, "habit", CHALLENGE))
        assert ScepClient(server.url + path).enroll(enrollment, ra).status is PkiStatus.SUCCESS


def test_renew_retransmit_poll_and_get_cert(client, ra_ca, keys):
    ra, ca = ra_ca
    key = keys.new()
    enrollment = new_enrollment(key, make_csr(key, "lifecycle", CHALLENGE))
    first = client.enroll(enrollment, ra)
    enrollment.sender_nonce = os.urandom(16)
    again = client.enroll(enrollment, ra)
    assert again.certificate == first.certificate  # same transaction, same key: same certificate
    assert client.poll(enrollment, ra, ca).certificate == first.certificate
    assert client.get_cert(enrollment, ra, first.certificate).certificate == first.certificate
    new_key = keys.new()
    renewal = new_enrollment(new_key, make_csr(new_key, "lifecycle"), renew_with=(key, first.certificate))
    renewed = client.enroll(renewal, ra)
    assert renewed.status is PkiStatus.SUCCESS
    assert renewed.certificate.serial_number != first.certificate.serial_number


def test_wrong_challenge_is_a_signed_failure(client, ra_ca, keys):
    ra, _ = ra_ca
    key = keys.new()
    enrollment = new_enrollment(key, make_csr(key, "intruder", "guess"))
    result = client.enroll(enrollment, ra)
    assert result.status is PkiStatus.FAILURE and result.fail_info is FailInfo.BAD_REQUEST


def _raw(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.parametrize(
    "method,path,body,status",
    [
        ("POST", "/api/scep?operation=PKIOperation", os.urandom(500), 400),
        ("POST", "/api/scep?operation=PKIOperation", b"\x30\x80" * 20000, 400),
        ("POST", "/api/scep?operation=PKIOperation", b"\x30" * (2 * 1024 * 1024), 413),
        ("GET", "/api/scep?operation=PKIOperation&message=" + "A" * 200, None, 400),
        ("GET", "/api/scep?operation=Nope", None, 400),
        ("GET", "/api/scep", None, 400),
        ("GET", "/nowhere", None, 404),
    ],
)
def test_bad_input_over_http(server, method, path, body, status):
    got, reply = _raw(server, method, path, body)
    assert got == status
    assert b"Traceback" not in reply


def test_stalled_client_does_not_block_others(server, client, ra_ca, keys):
    ra, _ = ra_ca
    stalled = socket.create_connection(("127.0.0.1", server.port))
    try:
        stalled.sendall(b"POST /api/scep?operation=PKIOperation HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\nab")
        key = keys.new()
        enrollment = new_enrollment(key, make_csr(key, "not-blocked", CHALLENGE))
        assert client.enroll(enrollment, ra).status is PkiStatus.SUCCESS
    finally:
        stalled.close()


def test_hard_kill_loses_nothing_and_never_issues_twice(keys, tmp_path):
    """Enrol from several threads, SIGKILL the server mid-run, restart it, and retransmit everything."""
    pool = [keys.new() for _ in range(24)]
    with ScepServer(env={"SCEP_CHALLENGE": CHALLENGE}, workers=2, data_dir=tmp_path / "data") as server:
        client = ScepClient(server.scep_url, timeout=10)
        ra, _ = client.ca_certificates()
        enrollments = [new_enrollment(k, make_csr(k, f"kill-{i}", CHALLENGE)) for i, k in enumerate(pool)]
        received: dict[str, x509.Certificate] = {}
        lock = threading.Lock()

        def worker(batch):
            for enrollment in batch:
                try:
                    result = client.enroll(enrollment, ra)
                except (ScepClientError, OSError, http.client.HTTPException):
                    continue  # the server died under us: retransmitted below
                if result.certificate is not None:
                    with lock:
                        received[enrollment.transaction_id] = result.certificate

        threads = [threading.Thread(target=worker, args=(enrollments[i::4],)) for i in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(0.6)
        server.kill()
        for thread in threads:
            thread.join(30)
        server.restart()
        client = ScepClient(server.scep_url, timeout=10)
        for enrollment in enrollments:
            enrollment.sender_nonce = os.urandom(16)
            result = client.enroll(enrollment, ra)
            assert result.status is PkiStatus.SUCCESS, result.fail_info_text
            if enrollment.transaction_id in received:
                assert result.certificate == received[enrollment.transaction_id]
            received[enrollment.transaction_id] = result.certificate
        database = sqlite3.connect(server.data_dir / "scep.db")
        rows = database.execute("SELECT transaction_id, serial, status FROM certificates").fetchall()
        database.close()
    by_transaction: dict[str, list] = {}
    for transaction_id, serial, status in rows:
        by_transaction.setdefault(transaction_id, []).append((serial, status))
    assert len(received) == len(pool)
    for transaction_id, certificate in received.items():
        issued = [serial for serial, status in by_transaction[transaction_id] if status == "issued"]
        assert len(issued) == 1
        assert int(issued[0], 16) == certificate.serial_number
    assert len({row[1] for row in rows}) == len(rows)


def test_embedded_defaults_from_nothing(keys, tmp_path):
    """`scep serve` with no settings at all: creates its data directory, generates and prints a challenge."""
    data_dir = tmp_path / "fresh"
    with ScepServer(env={}, workers=1, data_dir=data_dir) as server:
        banner = server.stdout
        challenge = next(line.split()[1] for line in banner.splitlines() if line.startswith("Challenge:"))
        assert "SCEP URL:    " + server.scep_url in banner and "CA SHA-256:" in banner
        assert oct(data_dir.stat().st_mode & 0o777) == "0o700"
        for key_file in ("ca.key", "ra.key"):
            assert oct((data_dir / key_file).stat().st_mode & 0o777) == "0o600"
        client = ScepClient(server.scep_url)
        ra, _ = client.ca_certificates()
        key = keys.new()
        result = client.enroll(new_enrollment(key, make_csr(key, "first-device", challenge)), ra)
        assert result.status is PkiStatus.SUCCESS
