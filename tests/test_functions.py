"""The HTTP functions of function_app.py, called the way the Functions host calls them (no host needed)."""

from __future__ import annotations

import base64
import functools
import json
from datetime import timedelta
from pathlib import Path

import azure.functions as func
import pytest
from azure.functions.decorators.timer import TimerTrigger
from azure.functions.http import HttpResponseConverter
from cryptography import x509

from scep import config
from scep.core import ca
from scep.core import message as msg
from scep.core.protocol import PkiStatus
from scep.tools.client import RequestOptions, build_request, make_csr, new_enrollment, read_reply, split_ra_and_ca
from tests.conftest import CHALLENGE


@pytest.fixture(scope="module")
def functions(tmp_path_factory):
    patch = pytest.MonkeyPatch()
    patch.setenv("SCEP_DATA_DIR", str(tmp_path_factory.mktemp("data")))
    patch.setenv("SCEP_CHALLENGE", CHALLENGE)
    patch.setenv("SCEP_MAX_MESSAGE_BYTES", "8192")
    config.reset()

    routes = {}
    for function in registered_functions():
        trigger = function.get_trigger()
        routes[getattr(trigger, "route", None) or function.get_function_name()] = function.get_user_function()
    yield routes
    config.reset()
    patch.undo()


@functools.cache
def registered_functions() -> list:
    """function_app.py's functions, listed once per process (a FunctionApp refuses to list its functions twice)."""
    import function_app

    return function_app.app.get_functions()


def call(functions, route: str, method: str = "GET", params: dict | None = None, body: bytes = b""):
    request = func.HttpRequest(method, f"http://localhost/{route}", params=params or {}, body=body)
    return functions[route](request)


TIMERS = {"maintenance", "crl_publication", "intune_revocations"}


def test_routes_cover_the_paths_clients_use(functions):
    assert {"api/scep", "api/scep/pkiclient.exe", "cgi-bin/pkiclient.exe", "certsrv/mscep/mscep.dll",
            "certsrv/mscep/mscep.dll/pkiclient.exe", "api/health", "api/ca.pem", "api/ca.der", "api/ca.crt",
            "api/webhook/scepchallenge", "api/webhook/notify", "api/admin/login", "api/admin/certificates",
            "api/admin/certificate", "api/admin/revoke", "api/admin/status", "status", "api/crl/{ca_file}",
            "api/ca/{ca_file}",
            "api/ocsp", "api/ocsp/{*ocsp_request}"} == set(functions) - TIMERS


def test_get_ca_caps(functions):
    response = call(functions, "cgi-bin/pkiclient.exe", params={"operation": "GetCACaps"})
    assert response.status_code == 200 and response.mimetype == "text/plain"
    caps = response.get_body().decode().split("\n")
    assert {"POSTPKIOperation", "SHA-256", "AES", "SCEPStandard", "Renewal"} <= set(caps)
    assert "GetNextCACert" not in caps  # no next CA exists yet


def test_get_ca_cert_returns_ra_ca_and_the_encryption_only_twin(functions):
    response = call(functions, "api/scep", params={"operation": "GetCACert", "message": "0"})
    assert response.mimetype == "application/x-x509-ca-ra-cert"
    certificates = msg.read_certs_only(response.get_body())
    assert len(certificates) == 3
    ra, ca = split_ra_and_ca(certificates)
    ra.verify_directly_issued_by(ca)
    usage = ra.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment
    (twin,) = [item for item in certificates if item not in (ra, ca)]
    twin.verify_directly_issued_by(ca)
    assert twin.public_key() == ra.public_key()
    twin_usage = twin.extensions.get_extension_for_class(x509.KeyUsage).value
    assert twin_usage.key_encipherment and not twin_usage.digital_signature


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_pki_operation(functions, keys, method):
    ra, _ = split_ra_and_ca(msg.read_certs_only(call(functions, "api/scep", params={"operation": "GetCACert"})
                                                 .get_body()))
    key = keys.new()
    enrollment = new_enrollment(key, make_csr(key, f"fn-{method}", CHALLENGE))
    request = build_request(enrollment, ra, RequestOptions())
    if method == "GET":
        # what an Apple device sends: base64 with '+' left unescaped, which the query parser turns into ' '
        encoded = base64.b64encode(request).decode().replace("+", " ")
        response = call(functions, "certsrv/mscep/mscep.dll", params={"operation": "PKIOperation",
                                                                         "message": encoded})
    else:
        response = call(functions, "api/scep/pkiclient.exe", "POST", {"operation": "PKIOperation"}, request)
    assert response.status_code == 200 and response.mimetype == "application/x-pki-message"
    assert read_reply(response.get_body(), enrollment, ra).status is PkiStatus.SUCCESS


@pytest.mark.parametrize(
    "params,body,status",
    [
        ({}, b"", 400),
        ({"operation": "Bogus"}, b"", 400),
        ({"operation": "PKIOperation"}, b"", 400),
        ({"operation": "PKIOperation"}, b"\x30\x82\xff\xff" + b"\x00" * 100, 400),
        ({"operation": "PKIOperation"}, b"x" * 9000, 413),
        ({"operation": "PKIOperation", "message": "%%%"}, b"", 400),
    ],
)
def test_bad_input_gets_a_4xx(functions, params, body, status):
    method = "POST" if body else "GET"
    response = call(functions, "api/scep", method, params, body)
    assert response.status_code == status
    assert b"Traceback" not in response.get_body()


def test_get_next_ca_cert_without_next_ca_is_404(functions):
    assert call(functions, "api/scep", params={"operation": "GetNextCACert"}).status_code == 404


def test_health(functions):
    response = call(functions, "api/health")
    report = json.loads(response.get_body())
    assert response.status_code == 200 and report["status"] == "ok"
    assert report["store"]["reachable"] is True
    assert len(report["ca"]["sha256"]) == 64
    assert CHALLENGE not in response.get_body().decode()


def test_ca_downloads(functions):
    pem = call(functions, "api/ca.pem").get_body()
    der = call(functions, "api/ca.der").get_body()
    assert x509.load_pem_x509_certificate(pem) == x509.load_der_x509_certificate(der)


def content_type_sent(response: func.HttpResponse) -> str:
    """The Content-Type header the Functions host sends: azure.functions' own encoder decides it."""
    encoded = HttpResponseConverter.encode(response, expected_type=None)
    headers = {name.lower(): datum.value for name, datum in encoded.value["headers"].items()}
    return headers["content-type"]


@pytest.mark.parametrize(
    "route,params,expected",
    [
        ("api/scep", {"operation": "GetCACaps"}, "text/plain; charset=utf-8"),
        ("api/scep", {"operation": "Bogus"}, "text/plain; charset=utf-8"),
        ("api/scep", {"operation": "GetNextCACert"}, "text/plain; charset=utf-8"),
        ("api/scep", {"operation": "GetCACert"}, "application/x-x509-ca-ra-cert"),
        ("api/health", {}, "application/json"),
        ("api/ca.pem", {}, "application/x-pem-file"),
    ],
)
def test_content_type_is_exact_with_one_charset(functions, route, params, expected):
    assert content_type_sent(call(functions, route, params=params)) == expected


def test_maintenance_runs_daily_from_a_timer_not_at_startup(functions):

    timers = [f for f in registered_functions() if isinstance(f.get_trigger(), TimerTrigger)]
    assert [f.get_function_name() for f in timers] == ["maintenance", "crl_publication", "intune_revocations"]
    bindings = [timer.get_trigger().get_dict_repr() for timer in timers]
    assert bindings[0]["schedule"] == "0 17 3 * * *"  # NCRONTAB with seconds: 03:17:00 UTC every day
    assert bindings[1]["schedule"] == "0 7 * * * *"  # hourly, at minute 7
    assert bindings[2]["schedule"] == "0 */15 * * * *"  # Intune's revocation requests, every 15 minutes
    assert all(binding["runOnStartup"] is False and binding["useMonitor"] is True for binding in bindings)


def test_the_intune_revocation_timer_does_nothing_without_intune_mode(functions):
    assert "intune" not in config.settings().modes
    assert functions["intune_revocations"](timer=None) is None


def test_the_timer_function_renews_a_due_ra(functions):
    ra_path = Path(config.settings().data_dir) / "ra.pem"
    ca.issue_ra(config.service().custody, days=3)
    short = x509.load_pem_x509_certificate(ra_path.read_bytes())
    functions["maintenance"](timer=None)
    renewed = x509.load_pem_x509_certificate(ra_path.read_bytes())
    assert renewed.serial_number != short.serial_number
    assert renewed.not_valid_after_utc - short.not_valid_after_utc > timedelta(days=600)
    assert call(functions, "api/health").status_code == 200
