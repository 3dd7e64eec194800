"""A local-mode process (PEM keys, SQLite, static challenge, local admin credential) never loads the Azure SDK,
requests/urllib3 or PyJWT: they cost each `scep serve` process memory (docs/serving.md, "Memory") and only the
Azure backends, the Intune client and Entra ID admin sign-in use them.

The probe runs in a fresh interpreter what the arbiter and a worker of `scep serve` run: the `scep` command's
module, the gunicorn configuration, settings, `asgi.create_app()`, GetCACert, an enrollment, /status, the CRL and
OCSP named in the issued certificate, the admin API with the local credential, and the worker's background jobs.
A real `scep serve` with two workers then reports, from each worker as it exits and from the arbiter, what it
loaded after enrolling a device.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scep.core.protocol import PkiStatus
from scep.tools.client import ScepClient, make_csr, new_enrollment, new_key
from tests.conftest import CHALLENGE
from tests.serverproc import REPO_ROOT, ScepServer, hermetic_environment

HEAVY_PACKAGES = ("azure", "requests", "urllib3", "jwt")

PROBE = r"""
import asyncio, json, sys
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from scep import config
from scep.core import message as msg
from scep.core.protocol import PkiStatus
from scep.http import admin_auth, asgi, backend, serving
from scep.tools import cli
from scep.tools.client import DEFAULT_OPTIONS, build_request, make_csr, new_enrollment, new_key, read_reply
from scep.tools.client import split_ra_and_ca

app = asgi.create_app()


def call(method, url, query="", body=b"", **headers):
    scope = {"type": "http", "method": method, "path": urlsplit(url).path, "query_string": query.encode(),
             "headers": [(name.replace("_", "-").encode(), value.encode()) for name, value in headers.items()]}
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status, reply = sent[0]["status"], sent[1]["body"]
    assert status == 200, (method, url, status, reply[:200])
    return reply


ra, ca = split_ra_and_ca(msg.read_certs_only(call("GET", "/api/scep", "operation=GetCACert")))
key = new_key()
enrollment = new_enrollment(key, make_csr(key, "device", sys.argv[1]))
reply = call("POST", "/api/scep", "operation=PKIOperation", build_request(enrollment, ra, DEFAULT_OPTIONS))
result = read_reply(reply, enrollment, ra)
assert result.status is PkiStatus.SUCCESS, result
certificate = result.certificate

backend.run_maintenance()
backend.run_publication()
backend.run_intune_revocations()

call("GET", "/status")
crl_url = certificate.extensions.get_extension_for_class(x509.CRLDistributionPoints).value[0].full_name[0].value
call("GET", crl_url)
ocsp_request = ocsp.OCSPRequestBuilder().add_certificate(certificate, ca, hashes.SHA1()).build()
call("POST", "/api/ocsp", body=ocsp_request.public_bytes(serialization.Encoding.DER),
     content_type="application/ocsp-request")
credential, _ = admin_auth.ensure_local_credential(config.settings().data_dir)
call("GET", "/api/admin/certificates", authorization="Bearer " + credential)

rss_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:"))
print(json.dumps({"modules": sorted(sys.modules), "rss_kib": rss_kib}))
"""


def run_probe(data_dir: Path) -> dict:
    """What the probe process reports: its modules (`modules`) and its resident memory in KiB (`rss_kib`)."""
    environment = hermetic_environment({
        "SCEP_DATA_DIR": str(data_dir), "SCEP_CHALLENGE": CHALLENGE, "SCEP_PUBLIC_BASE_URL": "http://127.0.0.1:8080",
    })
    completed = subprocess.run([sys.executable, "-c", PROBE, CHALLENGE], cwd=REPO_ROOT, env=environment,
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    return run_probe(tmp_path_factory.mktemp("data"))


def test_local_mode_loads_no_azure_sdk_requests_or_jwt(probe):
    heavy = [name for name in probe["modules"] if name.split(".")[0] in HEAVY_PACKAGES]
    assert not heavy, f"local mode imported {heavy}"


def test_the_probe_sees_what_it_imports(probe):
    """The probe really ran the local server's code: a check that finds nothing must have looked."""
    assert {"scep.tools.cli", "scep.http.serving", "scep.http.asgi", "scep.http.admin_auth", "scep.store.sqlite",
            "scep.http.status"} <= set(probe["modules"])


# `scep serve` as the product runs it, with gunicorn's worker_exit hook (run in each worker process) and the end
# of the arbiter writing what they loaded to <data dir>/modules-<pid>.json.
SERVE_REPORTING_MODULES = r"""
import json, os, sys
from scep.http import serving
from scep.tools import cli

ARBITER = os.getpid()


def report(role):
    heavy = sorted(name for name in sys.modules if name.split(".")[0] in HEAVY_PACKAGES)
    served = "scep.http.asgi" in sys.modules
    rss_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:"))
    path = os.path.join(os.environ["SCEP_DATA_DIR"], f"modules-{os.getpid()}.json")
    with open(path, "w") as file:
        json.dump({"role": role, "heavy": heavy, "served": served, "rss_kib": rss_kib}, file)


def worker_exit(server, worker):
    report("worker")


serving.GUNICORN_SETTINGS["worker_exit"] = worker_exit
try:
    sys.exit(cli.main(sys.argv[1:]))
finally:  # gunicorn ends the arbiter with sys.exit; a worker's exit passes here too, already reported
    if os.getpid() == ARBITER:
        report("arbiter")
""".replace("HEAVY_PACKAGES", repr(HEAVY_PACKAGES))


class ReportingServer(ScepServer):
    def command(self) -> list[str]:
        return [self.python, "-c", SERVE_REPORTING_MODULES, *super().command()[3:]]


def serve_and_enroll() -> list[dict]:
    """What the arbiter and the two workers of a `scep serve` that enrolled one device report (role, heavy,
    served, rss_kib)."""
    with ReportingServer(env={"SCEP_CHALLENGE": CHALLENGE}, workers=2) as server:
        client = ScepClient(server.scep_url)
        ra, _ = client.ca_certificates()
        key = new_key()
        assert client.enroll(new_enrollment(key, make_csr(key, "device", CHALLENGE)), ra).status is PkiStatus.SUCCESS
        assert server.stop() == 0, server.output_tail()
        return [json.loads(path.read_text()) for path in server.data_dir.glob("modules-*.json")]


def test_scep_serve_arbiter_and_workers_load_none_of_them():
    reports = serve_and_enroll()
    assert sorted((report["role"], report["served"]) for report in reports) == [
        ("arbiter", False), ("worker", True), ("worker", True)], reports
    assert [report["heavy"] for report in reports] == [[], [], []]
