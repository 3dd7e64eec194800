"""`scep serve` on gunicorn from outside: readable 413s for real clients, keep-alive, the server's limits, graceful
stop, worker respawn, and no worker outliving the process group."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from scep.logs import MAX_MESSAGE_CHARS
from tests.conftest import CHALLENGE
from tests.interop import require_binary
from tests.interop.strongswan import enrol, fetch_ca_certificates, generate_key
from tests.serverproc import ScepServer, wait_for

FIVE_MIB = 5 * 1024 * 1024
MAX_MESSAGE_BYTES = 65536


@pytest.fixture(scope="module")
def server():
    with ScepServer(env={"SCEP_CHALLENGE": CHALLENGE}, workers=2) as running:
        yield running


def workers_of(pid: int) -> set[int]:
    children = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        children |= {int(child) for child in (task / "children").read_text().split()}
    return children


def health_status(server: ScepServer) -> int:
    with urllib.request.urlopen(server.health_url, timeout=10) as response:
        return response.status


def test_the_banner_names_the_url_and_the_enrol_command(server):
    out = server.stdout
    assert f"SCEP URL:    {server.scep_url}" in out and f"Ready: {server.url}" in out
    assert "CA SHA-256:" in out and f"scep enroll --url {server.scep_url}" in out


def test_urllib_reads_the_413_of_a_5_mib_post(server):
    request = urllib.request.Request(f"{server.scep_url}?operation=PKIOperation", data=b"\x30" * FIVE_MIB,
                                     headers={"Content-Type": "application/x-pki-message"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 413
    assert refused.value.read() == f"message larger than {MAX_MESSAGE_BYTES} bytes\n".encode()


@pytest.mark.parametrize("expect", ["", "Expect:"])  # curl's own 100-continue, and none
def test_curl_reads_the_413_of_a_5_mib_post(server, tmp_path, expect):
    body = tmp_path / "body.bin"
    body.write_bytes(b"\x30" * FIVE_MIB)
    command = [require_binary("curl"), "-sS", "-o", "-", "-w", "%{http_code}", "--data-binary", f"@{body}",
               "-H", "Content-Type: application/x-pki-message", f"{server.scep_url}?operation=PKIOperation"]
    if expect:
        command[1:1] = ["-H", expect]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == f"message larger than {MAX_MESSAGE_BYTES} bytes\n413"


def test_keep_alive_serves_many_requests_on_one_connection(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        answers = []
        for method, path, body in [("GET", "/api/scep?operation=GetCACaps", None), ("GET", "/api/nowhere", None),
                                   ("DELETE", "/api/scep", None),
                                   ("POST", "/api/scep?operation=PKIOperation", b"x" * (MAX_MESSAGE_BYTES + 1)),
                                   ("GET", "/api/health", None)]:
            connection.request(method, path, body=body)
            response = connection.getresponse()
            response.read()
            answers.append(response.status)
            if len(answers) == 1:
                first_socket = connection.sock
            assert connection.sock is first_socket
        assert answers == [200, 404, 405, 413, 200]
    finally:
        connection.close()


def stalled_client(server: ScepServer) -> socket.socket:
    """A connection that started a request and sent no more."""
    stalled = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    stalled.sendall(b"POST /api/scep?operation=PKIOperation HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    return stalled


def get_ca_caps(server: ScepServer, timeout: float) -> bytes:
    with urllib.request.urlopen(server.scep_url + "?operation=GetCACaps", timeout=timeout) as response:
        return response.read()


def test_a_client_that_stalls_mid_request_holds_nothing():
    with ScepServer(env={"SCEP_CHALLENGE": CHALLENGE}, workers=1) as one_worker:
        stalled = [stalled_client(one_worker) for _ in range(20)]
        try:
            assert b"POSTPKIOperation" in get_ca_caps(one_worker, timeout=20)
        finally:
            for connection in stalled:
                connection.close()


def test_the_server_bounds_the_request_head(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        raw.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n")
        assert raw.recv(100).startswith(b"HTTP/1.1 4")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        raw.sendall(b"GET /api/health?" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert raw.recv(100).startswith(b"HTTP/1.1 4")


def test_a_killed_worker_is_replaced_and_serving_goes_on(tmp_path):
    with ScepServer(env={"SCEP_CHALLENGE": CHALLENGE}, workers=2) as server:
        original = wait_for(lambda: len(workers_of(server.pid)) == 2 and workers_of(server.pid), "two workers")
        victim = min(original)
        os.kill(victim, signal.SIGKILL)
        replaced = wait_for(lambda: (now := workers_of(server.pid)) - original and len(now) == 2 and now,
                            "a replacement worker")
        assert victim not in replaced
        assert all(health_status(server) == 200 for _ in range(6))


def test_sigterm_stops_the_workers_and_frees_the_port():
    server = ScepServer(env={"SCEP_CHALLENGE": CHALLENGE}, workers=2).start()
    try:
        workers = wait_for(lambda: len(workers_of(server.pid)) == 2 and workers_of(server.pid), "two workers")
        assert server.stop() == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
    finally:
        server.close()


def test_sigkill_of_the_process_group_leaves_no_worker():
    server = ScepServer(env={"SCEP_CHALLENGE": CHALLENGE}, workers=2).start()
    try:
        workers = wait_for(lambda: len(workers_of(server.pid)) == 2 and workers_of(server.pid), "two workers")
        server.kill()
        wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), "the workers gone")
    finally:
        server.close()


def test_a_refused_request_head_leaves_no_raw_client_text_in_the_logs():
    # gunicorn refuses a header name with a control character; whatever it logs (gthread logged the name as it
    # came), the records of the scep and gunicorn loggers are cleaned and bounded by scep.logs
    with ScepServer(env={"SCEP_CHALLENGE": CHALLENGE}, workers=1) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
            raw.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\n" + b"N" * 6000 + b"\x1b: 1\r\n\r\n")
            assert raw.recv(100).startswith(b"HTTP/1.1 400")
        assert health_status(server) == 200
        logged = server.stderr.splitlines()
    assert not any("\x1b" in line or len(line) > MAX_MESSAGE_CHARS + 200 for line in logged)


def test_strongswan_reads_the_413_of_a_request_over_the_limit(tmp_path):
    pki = require_binary("pki")
    with ScepServer(env={"SCEP_CHALLENGE": CHALLENGE, "SCEP_MAX_MESSAGE_BYTES": "4096"}, workers=1) as server:
        assert fetch_ca_certificates(pki, server, tmp_path).succeeded
        generate_key(pki, tmp_path / "key.pem")
        # forty long DNS names make the PKCSReq larger than 4096 bytes
        names = [f"host-{index:03d}.a-rather-long-domain-name.example.com" for index in range(40)]
        sans = [argument for name in names for argument in ("--san", name)]
        result = enrol("pki", server, (tmp_path / "ca.pem", tmp_path / "ra.pem"), tmp_path,
                       "--in", tmp_path / "key.pem", "--dn", "CN=too-big", "--password", CHALLENGE, *sans)
    assert not result.succeeded and "HTTP 413" in result.stderr, result.describe()
