"""The admin API and its authentication: local credential (bearer and cookie session with CSRF), Entra ID tokens
from the emulator, the Functions adapter's auth level, `scep serve`, and `scep certs` on SQLite and Azurite."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import azure.functions as func
import pytest
from cryptography import x509

from scep import config
from scep.core.issuer import ca_id
from scep.http import admin_auth, backend, web
from scep.store import Store
from tests.conftest import CHALLENGE
from tests.emulators.entra import DEFAULT_TENANT, EntraEmulator, b64url_decode, b64url_encode
from tests.serverproc import ScepServer, run_cli
from tests.test_store_contract import make_certificate

ADMIN_ROUTES = [route for route in web.ROUTES if route.admin and route.name != "admin_login"]
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
API_CLIENT_ID = "6f1c2d3e-4b5a-4c6d-8e7f-0a1b2c3d4e5f"
API_URI = "api://scep-admin"
OPERATOR = "0d0c0b0a-0908-4706-8504-030201000000"


def record(store: Store, serial: int, issuer_id: str | None = None) -> None:
    """A certificate recorded as issued by the CA whose ca_id is issuer_id (default: the process's CA)."""
    claim = store.claim(uuid.uuid4().hex, "a1" * 32, timedelta(minutes=5))
    issuer_id = issuer_id or ca_id(config.service().custody.keys().ca.certificate)
    store.record_issued(claim, replace(make_certificate(claim.transaction_id, serial), issuer_sha256=issuer_id))


@pytest.fixture
def local(tmp_path: Path) -> Iterator[web.ScepHttp]:
    config.reset(config.load_settings({"SCEP_DATA_DIR": str(tmp_path), "SCEP_CHALLENGE": CHALLENGE}))
    record(config.service().store, 0x0A1B2C)
    yield backend.HTTP
    config.reset()


def credential() -> str:
    return admin_auth.ensure_local_credential(config.settings().data_dir)[0]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def call(http: web.ScepHttp, method: str, path: str, headers=None, body: bytes = b"", **params) -> web.HttpReply:
    return http.handle(web.Request(method, path, params, headers or {}, body))


def revoke_body(serial: str = "0A1B2C", reason: str = "keyCompromise") -> bytes:
    return json.dumps({"serial": serial, "reason": reason}).encode()


# --------------------------------------------------------------------------------------------- local credential


@pytest.mark.parametrize("route", ADMIN_ROUTES, ids=lambda route: route.name)
def test_no_credential_gets_401_with_a_challenge(local, route):
    reply = call(local, route.methods[0], route.path, body=revoke_body(), serial="0A1B2C")
    assert reply.status == 401
    assert reply.headers["WWW-Authenticate"].startswith('Bearer realm="scep-admin"')
    assert b"0A1B2C" not in reply.body


@pytest.mark.parametrize("route", ADMIN_ROUTES, ids=lambda route: route.name)
@pytest.mark.parametrize("header", ["Bearer wrong-credential-of-the-right-kind-0123456789", "Basic YWRtaW46YWRtaW4="])
def test_a_wrong_credential_gets_401(local, route, header):
    reply = call(local, route.methods[0], route.path, {"Authorization": header}, revoke_body(), serial="0A1B2C")
    assert reply.status == 401 and "error=" in reply.headers["WWW-Authenticate"]


def test_the_credential_file_is_private_and_created_once(local):
    path = config.settings().data_dir / admin_auth.CREDENTIAL_FILE
    first = credential()
    assert path.stat().st_mode & 0o777 == 0o600
    assert credential() == first and len(first) >= 40


@pytest.mark.parametrize("serial", ["0A1B2C", "0a:1b:2c", "serial=0A1B2C", "a1b2c"])
def test_one_certificate_by_serial_in_any_openssl_spelling(local, serial):
    reply = call(local, "GET", "/api/admin/certificate", bearer(credential()), serial=serial)
    assert reply.status == 200
    assert json.loads(reply.body)["serial"] == "0A1B2C"


def test_inventory_filters_and_pages(local):
    store = config.service().store
    for serial in range(0x100, 0x105):
        record(store, serial)
    token = credential()
    first = json.loads(call(local, "GET", "/api/admin/certificates", bearer(token), limit="4").body)
    second = json.loads(call(local, "GET", "/api/admin/certificates", bearer(token), limit="4",
                             page=first["nextPage"]).body)
    serials = [item["serial"] for item in first["items"] + second["items"]]
    assert len(serials) == len(set(serials)) == 6 and second["nextPage"] is None
    issued = json.loads(call(local, "GET", "/api/admin/certificates", bearer(token), status="ISSUED",
                             expiringWithinDays="400").body)
    assert len(issued["items"]) == 6
    revoked = call(local, "GET", "/api/admin/certificates", bearer(token), status="revoked")
    assert json.loads(revoked.body)["items"] == []


def test_revoke_is_idempotent_and_keeps_the_first_time_and_reason(local):
    token = credential()
    first = call(local, "POST", "/api/admin/revoke", bearer(token), revoke_body("0a:1b:2c", "keyCompromise"))
    again = call(local, "POST", "/api/admin/revoke", bearer(token), revoke_body("0A1B2C", "superseded"))
    assert first.status == again.status == 200
    first_body, again_body = json.loads(first.body), json.loads(again.body)
    assert not first_body["alreadyRevoked"] and again_body["alreadyRevoked"]
    assert first_body["crlPublished"] is True
    ca = config.service().custody.keys().ca.certificate
    crl = x509.load_der_x509_crl(config.service().store.latest_crl(ca_id(ca)).der)
    assert crl.get_revoked_certificate_by_serial_number(0x0A1B2C) is not None
    assert again_body["revokedAt"] == first_body["revokedAt"] and again_body["reason"] == "keyCompromise"
    shown = json.loads(call(local, "GET", "/api/admin/certificate", bearer(token), serial="0A1B2C").body)
    assert shown["status"] == "revoked" and shown["revocationReason"] == "keyCompromise"


def test_revoking_publishes_a_crl_of_the_configured_validity(tmp_path):
    settings = {"SCEP_DATA_DIR": str(tmp_path), "SCEP_CHALLENGE": CHALLENGE, "SCEP_CRL_VALIDITY_DAYS": "3"}
    config.reset(config.load_settings(settings))
    record(config.service().store, 0x0A1B2D)
    try:
        body = revoke_body("0A1B2D", "keyCompromise")
        reply = call(backend.HTTP, "POST", "/api/admin/revoke", bearer(credential()), body)
        assert reply.status == 200 and json.loads(reply.body)["crlPublished"] is True
        ca = config.service().custody.keys().ca.certificate
        crl = x509.load_der_x509_crl(config.service().store.latest_crl(ca_id(ca)).der)
        assert crl.next_update_utc - crl.last_update_utc == timedelta(days=3)
    finally:
        config.reset()


def test_an_unknown_serial_gets_a_clear_404(local):
    token = credential()
    for reply in (call(local, "POST", "/api/admin/revoke", bearer(token), revoke_body("DEADBEEF")),
                  call(local, "GET", "/api/admin/certificate", bearer(token), serial="DEADBEEF")):
        assert reply.status == 404
        assert "DEADBEEF" in json.loads(reply.body)["message"]


@pytest.mark.parametrize(
    "method, path, params, body",
    [
        ("GET", "/api/admin/certificate", {"serial": "xyz"}, b""),
        ("GET", "/api/admin/certificate", {"serial": "1" * 41}, b""),
        ("GET", "/api/admin/certificate", {}, b""),
        ("GET", "/api/admin/certificates", {"status": "lost"}, b""),
        ("GET", "/api/admin/certificates", {"limit": "0"}, b""),
        ("GET", "/api/admin/certificates", {"limit": "-5"}, b""),
        ("GET", "/api/admin/certificates", {"expiringWithinDays": "soon"}, b""),
        ("POST", "/api/admin/revoke", {}, b"not json"),
        ("POST", "/api/admin/revoke", {}, b"[1, 2]"),
        ("POST", "/api/admin/revoke", {}, b"\xff\xfe"),
        ("POST", "/api/admin/revoke", {}, b'{"serial": "0A1B2C"}'),
        ("POST", "/api/admin/revoke", {}, b'{"serial": "0A1B2C", "reason": "certificateHold"}'),
        ("POST", "/api/admin/revoke", {}, b'{"serial": "0A1B2C", "reason": "8"}'),
        ("GET", "/api/admin/revoke", {}, b""),
    ],
)
def test_bad_admin_input_gets_a_4xx_and_changes_nothing(local, method, path, params, body):
    reply = call(local, method, path, bearer(credential()), body, **params)
    assert 400 <= reply.status < 500
    assert config.service().store.certificate_by_serial(0x0A1B2C).revoked_at is None


# --------------------------------------------------------------------------------------------- browser session


def login(http: web.ScepHttp, presented: str, scheme: str = "http") -> web.HttpReply:
    body = f"credential={presented}".encode()
    return http.handle(web.Request("POST", "/api/admin/login", {}, FORM, body, scheme))


def test_the_login_form_sets_a_strict_session_cookie_and_csrf_protects_posts(local):
    assert call(local, "GET", "/api/admin/login").status == 200
    reply = login(local, credential())
    assert reply.status == 200
    set_cookie = reply.headers["Set-Cookie"]
    assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie and "Secure" not in set_cookie
    session = {"Cookie": set_cookie.split(";")[0]}
    csrf = json.loads(reply.body)["csrfToken"]
    assert call(local, "GET", "/api/admin/certificates", session).status == 200
    assert call(local, "POST", "/api/admin/revoke", session, revoke_body()).status == 403
    wrong_csrf = {**session, "X-CSRF-Token": "x" + csrf}
    assert call(local, "POST", "/api/admin/revoke", wrong_csrf, revoke_body()).status == 403
    form = f"serial=0A1B2C&reason=keyCompromise&csrf_token={csrf}".encode()
    assert call(local, "POST", "/api/admin/revoke", {**session, **FORM}, form).status == 200


def test_the_cookie_is_secure_over_https_and_a_wrong_credential_gets_none(local):
    assert "; Secure" in login(local, credential(), "https").headers["Set-Cookie"]
    refused = login(local, "wrong")
    assert refused.status == 401 and "Set-Cookie" not in refused.headers


def test_a_tampered_or_expired_cookie_is_refused(local, monkeypatch):
    cookie = login(local, credential()).headers["Set-Cookie"].split(";")[0]
    name, _, value = cookie.partition("=")
    expires, nonce, mac = value.split(".")
    forged = f"{name}={int(expires) + 86400}.{nonce}.{mac}"
    assert call(local, "GET", "/api/admin/certificates", {"Cookie": forged}).status == 401
    monkeypatch.setattr(admin_auth.time, "time", lambda: int(expires) + 1)
    assert call(local, "GET", "/api/admin/certificates", {"Cookie": cookie}).status == 401


# --------------------------------------------------------------------------------------------- Entra ID


@pytest.fixture(scope="module")
def entra() -> Iterator[EntraEmulator]:
    with EntraEmulator() as emulator:
        yield emulator


@pytest.fixture
def azure_admin(entra, tmp_path, monkeypatch) -> Iterator[web.ScepHttp]:
    monkeypatch.setenv("SSL_CERT_FILE", entra.ca_bundle_path)  # urllib (PyJWKClient) trusts the emulator's CA
    settings = config.load_settings({
        "SCEP_DATA_DIR": str(tmp_path), "SCEP_CHALLENGE": CHALLENGE, "SCEP_ADMIN_AUTH": "entra",
        "SCEP_ADMIN_TENANT_ID": DEFAULT_TENANT, "SCEP_ADMIN_AUDIENCE": f"{API_CLIENT_ID},{API_URI}",
        "SCEP_ADMIN_AUTHORITY_HOST": entra.url,
    })
    config.reset(settings)
    record(config.service().store, 0x0A1B2C)
    yield backend.HTTP
    config.reset()


def token(entra: EntraEmulator, roles=("SCEP.Admin",), audience: str = API_CLIENT_ID, **options) -> str:
    return entra.issue_token(DEFAULT_TENANT, audience, "04b07795-8ddb-461a-bbee-02f9e1bf7b46", OPERATOR,
                             list(roles), **options)


def test_an_entra_admin_token_is_accepted_with_either_audience(azure_admin, entra):
    for audience in (API_CLIENT_ID, API_URI):
        reply = call(azure_admin, "GET", "/api/admin/certificates", bearer(token(entra, audience=audience)))
        assert reply.status == 200, reply.body


def test_an_entra_token_without_the_role_gets_403(azure_admin, entra):
    reply = call(azure_admin, "POST", "/api/admin/revoke", bearer(token(entra, roles=("SCEP.Reader",))),
                 revoke_body())
    assert reply.status == 403 and b"SCEP.Admin" in reply.body
    assert config.service().store.certificate_by_serial(0x0A1B2C).revoked_at is None


def _tampered(valid: str) -> str:
    header, claims, signature = valid.split(".")
    changed = json.loads(b64url_decode(claims)) | {"roles": ["SCEP.Admin"], "oid": str(uuid.uuid4())}
    return f"{header}.{b64url_encode(json.dumps(changed).encode())}.{signature}"


def _unsigned(valid: str) -> str:
    _, claims, _ = valid.split(".")
    none = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    return f"{none}.{claims}."


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda entra: token(entra, audience="https://management.azure.com"), id="wrong-audience"),
        pytest.param(lambda entra: token(entra, lifetime_seconds=-600), id="expired"),
        pytest.param(lambda entra: token(entra, issuer=f"{entra.url}/{uuid.uuid4()}/v2.0"), id="wrong-issuer"),
        pytest.param(lambda entra: token(entra, issuer=f"https://sts.windows.net/{DEFAULT_TENANT}/"), id="v1-issuer"),
        pytest.param(lambda entra: _tampered(token(entra, roles=())), id="tampered"),
        pytest.param(lambda entra: _unsigned(token(entra)), id="alg-none"),
        pytest.param(lambda entra: "not.a.token", id="garbage"),
    ],
)
def test_an_invalid_entra_token_gets_401(azure_admin, entra, make):
    reply = call(azure_admin, "POST", "/api/admin/revoke", bearer(make(entra)), revoke_body())
    assert reply.status == 401 and 'error="invalid_token"' in reply.headers["WWW-Authenticate"]
    assert config.service().store.certificate_by_serial(0x0A1B2C).revoked_at is None


def test_the_local_credential_and_login_form_are_off_with_entra(azure_admin, entra):
    assert call(azure_admin, "GET", "/api/admin/certificates", bearer("a" * 43)).status == 401
    assert login(azure_admin, "anything").status == 404


def test_entra_settings_are_checked_at_start():
    with pytest.raises(config.ConfigError, match="SCEP_ADMIN_AUDIENCE"):
        config.load_settings({"SCEP_CHALLENGE": CHALLENGE, "SCEP_ADMIN_AUTH": "entra",
                              "SCEP_ADMIN_TENANT_ID": DEFAULT_TENANT})
    with pytest.raises(config.ConfigError, match="SCEP_ADMIN_TENANT_ID"):
        config.load_settings({"SCEP_CHALLENGE": CHALLENGE, "SCEP_ADMIN_AUTH": "entra",
                              "SCEP_ADMIN_AUDIENCE": API_URI})
    with pytest.raises(config.ConfigError, match="SCEP_ADMIN_AUTHORITY_HOST"):
        config.load_settings({"SCEP_CHALLENGE": CHALLENGE, "SCEP_ADMIN_AUTHORITY_HOST": "http://login.example"})


# --------------------------------------------------------------------------------------------- adapters


def test_admin_functions_need_a_function_key_in_azure(local):
    from tests.test_functions import registered_functions

    levels = {function.get_trigger().route: function.get_trigger().auth_level for function in registered_functions()
              if hasattr(function.get_trigger(), "route")}
    for route in web.ROUTES:
        expected = func.AuthLevel.FUNCTION if route.admin else func.AuthLevel.ANONYMOUS
        assert levels[route.path] == expected, route.path


def test_the_functions_adapter_refuses_admin_requests_without_a_credential(local):
    from tests.test_functions import registered_functions

    handlers = {function.get_trigger().route: function.get_user_function() for function in registered_functions()
                if hasattr(function.get_trigger(), "route")}
    for route in ADMIN_ROUTES:
        for headers in ({}, bearer("x" * 43)):
            request = func.HttpRequest(route.methods[0], f"https://scep.example/{route.path}", headers=headers,
                                       params={"serial": "0A1B2C"}, body=revoke_body())
            response = handlers[route.path](request)
            assert response.status_code == 401 and "WWW-Authenticate" in response.headers


@pytest.fixture(scope="module")
def server() -> Iterator[ScepServer]:
    with ScepServer(env={"SCEP_CHALLENGE": CHALLENGE}) as running:
        yield running


def http_status(url: str, headers: dict[str, str], data: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_scep_serve_prints_the_credential_and_refuses_everyone_else(server):
    saved = (server.data_dir / admin_auth.CREDENTIAL_FILE).read_text().strip()
    assert f"Authorization: Bearer {saved}" in server.stdout
    url = f"{server.url}/api/admin/certificates"
    assert http_status(url, {})[0] == 401
    assert http_status(url, bearer("x" * 43))[0] == 401
    status, body = http_status(url, bearer(saved))
    assert status == 200 and json.loads(body)["items"] == []
    status, _ = http_status(f"{server.url}/api/admin/revoke", bearer(saved), b"{")
    assert status == 400


# --------------------------------------------------------------------------------------------- scep certs


def certs_cli(environment: dict[str, str], *arguments: str):
    return run_cli(environment, "certs", *arguments, timeout=60)


def _exercise_certs_cli(environment: dict[str, str]) -> None:
    settings = config.load_settings(environment, for_serving=False)
    home = config.build_key_home(settings)
    config.ensure_local_ca(settings, home)
    store = config.build_store(settings)
    record(store, 0x0A1B2C, ca_id(home.keys().ca.certificate))
    listed = certs_cli(environment, "list", "--subject", "CN=device-", "--status", "issued", "--expiring-within", "400")
    assert listed.returncode == 0 and "0A1B2C" in listed.stdout, listed.stderr
    shown = certs_cli(environment, "show", "--serial", "0a:1b:2c")
    assert shown.returncode == 0 and json.loads(shown.stdout)["status"] == "issued"
    revoked = certs_cli(environment, "revoke", "--serial", "0A1B2C", "--reason", "keyCompromise")
    assert revoked.returncode == 0 and "revoked at" in revoked.stdout, revoked.stderr
    again = certs_cli(environment, "revoke", "--serial", "serial=0A1B2C", "--reason", "superseded")
    assert again.returncode == 0 and "already revoked" in again.stdout and "keyCompromise" in again.stdout
    unknown = certs_cli(environment, "revoke", "--serial", "DEADBEEF", "--reason", "keyCompromise")
    assert unknown.returncode == 1 and "DEADBEEF" in unknown.stderr
    bad = certs_cli(environment, "revoke", "--serial", "nothex", "--reason", "keyCompromise")
    assert bad.returncode == 2 and "hexadecimal" in bad.stderr
    assert store.certificate_by_serial(0x0A1B2C).revocation_reason.value == "keyCompromise"
    crl = x509.load_der_x509_crl(store.latest_crl(ca_id(home.keys().ca.certificate)).der)
    assert crl.get_revoked_certificate_by_serial_number(0x0A1B2C) is not None


def test_scep_certs_on_sqlite(tmp_path):
    _exercise_certs_cli({"SCEP_DATA_DIR": str(tmp_path)})


def test_scep_certs_on_azure_tables(tmp_path, azurite):
    _exercise_certs_cli({"SCEP_DATA_DIR": str(tmp_path), "SCEP_TABLES_CONNECTION_STRING": azurite.connection_string,
                         "SCEP_TABLE_PREFIX": "t" + uuid.uuid4().hex[:12]})
