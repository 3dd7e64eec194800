"""The public status page (scep/http/status.py, served at /status): what it shows, that every value is escaped,
that a hanging backend is reported failing within the probe's timeout, and that it never calls Intune."""

from __future__ import annotations

import re
import threading
import time
from datetime import datetime, timedelta, timezone
from urllib.parse import urlencode

import pytest
from cryptography import x509

from scep import config
from scep.azure.intune.client import IntuneAuthenticationError, IntuneResult
from scep.azure.intune.validator import IntuneValidator
from scep.challenge.composite import CompositeValidator
from scep.challenge.static import StaticValidator
from scep.core import revocation
from scep.core.der import fingerprint
from scep.core.issuer import ca_id
from scep.core.maintenance import expiry_of
from scep.http import backend, status, web
from scep.keys import CaKeys
from scep.store import CertStatus, RevocationReason, StoredCrl, serial_hex
from tests.conftest import CHALLENGE
from tests.test_admin_api import FORM, bearer, call, credential, local  # noqa: F401 (local: the fixture)
from tests.test_store_contract import KEY, LEASE, issue, issue_with_names, new_transaction_id


class _Backend:
    def __init__(self, service) -> None:
        self._service = service

    def service(self):
        return self._service

    def max_message_bytes(self) -> int:
        return web.DEFAULT_MAX_MESSAGE_BYTES

    def webhooks(self):
        return None


def _page(service, headers=None) -> web.HttpReply:
    http = web.ScepHttp(_Backend(service))
    return http.handle(web.Request("GET", "/status", headers=headers or {"Host": "ca.example.test"}))


def test_status_page_shows_the_ca_the_scep_url_and_healthy_backends(service):
    revocation.publish_due(service.store, revocation.signing_generations(service.custody))
    reply = _page(service, {"Host": "internal:8080", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "ca.test"})
    page = reply.body.decode()
    ca = service.custody.keys().ca.certificate
    assert reply.status == 200 and reply.content_type == "text/html; charset=utf-8"
    assert reply.headers["Cache-Control"] == "no-store"
    assert fingerprint(ca) in page and fingerprint(service.custody.keys().ra.certificate) in page
    assert "https://ca.test/api/scep" in page
    assert 'href="/api/ca.der"' in page and 'href="/api/ca.pem"' in page
    assert '<meta http-equiv="refresh" content="10">' in page
    assert '<span id="overall" class="ok">ok</span>' in page
    assert "<th>Key custody</th><td class='ok'>ok</td>" in page and "<th>Store</th><td class='ok'>ok</td>" in page
    assert f"<th>CRL of the CA ({ca_id(ca)[:16]})</th><td class='ok'>ok</td><td>cRLNumber 1, thisUpdate" in page
    assert "<th>OCSP signer</th><td class='ok'>ok</td>" in page
    assert CHALLENGE not in page


class _HostileCertificate:
    """A certificate whose subject tries to inject markup."""

    def __init__(self, certificate: x509.Certificate) -> None:
        self._certificate = certificate
        self.subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "<script>alert(1)</script>")])

    def __getattr__(self, name: str):
        return getattr(self._certificate, name)


def test_every_value_is_escaped(service):
    keys = service.custody.keys()
    hostile = _HostileCertificate(keys.ca.certificate)
    expiry = expiry_of(keys)[0]
    view = status.StatusView("1<b>", "http://x/api/scep?a=<i>",
                             [status.Check("<img>", status.State.OK, "\"'&")],
                             [("CA", hostile, expiry)])  # type: ignore[list-item]
    page = status.render(view)
    assert "<script" not in page and "&lt;script" in page
    assert "<img>" not in page and "<b>" not in page and "<i>" not in page
    assert "&quot;&#x27;&amp;" in page


def test_a_hanging_backend_is_failing_within_the_timeout_and_is_not_probed_twice():
    release = threading.Event()
    calls = []

    def hang() -> bool:
        calls.append(time.monotonic())
        release.wait(10)
        return True

    probe = status.BoundedProbe(hang, timeout=0.3, ttl=0.0)
    try:
        started = time.monotonic()
        first = probe.result()
        second = probe.result()
        elapsed = time.monotonic() - started
        assert first.error == second.error == "no answer within 0.3 s"
        assert elapsed < 1.5
        assert len(calls) == 1  # the hanging call is waited for again, not started again
    finally:
        release.set()
    time.sleep(0.05)
    assert probe.result().error == ""


def test_a_probe_result_is_kept_for_its_ttl():
    calls = []
    probe = status.BoundedProbe(lambda: calls.append(1) or True, timeout=1, ttl=60)
    assert probe.result().value is True and probe.result().value is True
    assert len(calls) == 1


def test_a_stopped_custody_turns_the_page_failing_and_keeps_the_last_known_ca(make_service, monkeypatch):
    service = make_service()
    status.probes_for(service).custody._ttl = 0.0  # every view probes
    assert "class='ok'>ok</td>" in _page(service).body.decode()

    def unreachable(*args) -> bool:
        raise OSError("connection refused")

    monkeypatch.setattr(service.custody, "exists", unreachable)
    page = _page(service).body.decode()
    assert '<span id="overall" class="failing">failing</span>' in page
    assert "<th>Key custody</th><td class='failing'>failing</td><td>" in page and "failed (OSError)" in page
    assert "connection refused" not in page and str(service.custody.directory) not in page  # public: no internals
    assert fingerprint(service.custody.keys().ca.certificate) in page


class _Client:
    def __init__(self) -> None:
        self.calls = 0

    def validate_request(self, transaction_id, csr_der) -> IntuneResult:
        self.calls += 1
        return IntuneResult("Success", "activity-1", "")


def test_intune_lines_come_from_recorded_calls_never_from_a_call_per_view(make_service):
    client = _Client()
    intune = IntuneValidator(client)  # type: ignore[arg-type]
    service = make_service(CompositeValidator([StaticValidator(CHALLENGE), intune]))
    page = _page(service).body.decode()
    assert "<th>Intune validation</th><td class='unused'>not used</td>" in page
    assert client.calls == 0
    intune.calls.answered("validateRequest", IntuneResult("Success", "activity-1", ""))
    page = _page(service).body.decode()
    assert "<th>Intune validation</th><td class='ok'>ok</td><td>Intune answered Success at" in page
    intune.calls.failed("validateRequest", IntuneAuthenticationError("scope", "AADSTS7000215 bad secret"), "x")
    page = _page(service).body.decode()
    assert "<th>Intune token</th><td class='failing'>failing</td>" in page
    assert client.calls == 0


def test_a_next_ca_is_shown(service, monkeypatch):
    keys = service.custody.keys()
    with_next = CaKeys(ca=keys.ca, ra=keys.ra, next_ca=keys.ra)
    monkeypatch.setattr(service.custody, "keys", lambda: with_next)
    view = status.status_view(service, {})
    assert [role for role, _, _ in view.certificates] == ["CA", "RA", "Next CA"]
    assert view.generated <= datetime.now(timezone.utc)


# --------------------------------------------------------------------------------------------- CRL and OCSP lines

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=timezone.utc)


def _crl(this_update: datetime, days: int = 7) -> StoredCrl:
    return StoredCrl("ab" * 32, 42, 3, this_update, this_update + timedelta(days=days), b"")


def test_a_crl_is_failing_when_missing_or_past_next_update_and_warning_past_half_life(service):
    ca = service.custody.keys().ca.certificate
    fresh = status.crl_check("CA", ca, _crl(NOW - timedelta(days=1)), NOW)
    assert fresh.state is status.State.OK and "cRLNumber 42" in fresh.detail and "2030-06-07 12:00:00" in fresh.detail
    assert status.crl_check("CA", ca, _crl(NOW - timedelta(days=4)), NOW).state is status.State.WARNING
    stale = status.crl_check("CA", ca, _crl(NOW - timedelta(days=8)), NOW)
    assert stale.state is status.State.FAILING and "past its nextUpdate" in stale.detail
    missing = status.crl_check("CA", ca, None, NOW)
    assert missing.state is status.State.FAILING and missing.detail == "no CRL has been published for this CA"


def test_a_page_without_a_published_crl_is_failing(make_service):
    page = _page(make_service()).body.decode()
    assert "CRL of the CA" in page and "no CRL has been published for this CA" in page
    assert '<span id="overall" class="failing">failing</span>' in page


def test_the_ocsp_signer_line_shows_its_expiry(service):
    signer = service.custody.keys().ra.certificate  # any certificate stands for the delegated signer here
    now = signer.not_valid_after_utc - timedelta(days=100, hours=1)
    line = status.ocsp_check(signer, now)
    assert line.state is status.State.OK and line.detail.startswith("100 days left")
    late = status.ocsp_check(signer, signer.not_valid_after_utc - timedelta(days=3))
    assert late.state is status.State.WARNING and late.detail.startswith("3 days left")
    assert status.ocsp_check(signer, signer.not_valid_after_utc).state is status.State.WARNING
    assert "signs its own" in status.ocsp_check(None, now).detail


def test_retired_generations_are_listed_until_they_expire(service):
    keys = service.custody.keys()
    with_retired = CaKeys(ca=keys.ca, ra=keys.ra, retired=(keys.ra.certificate,))
    assert [role for role, _ in status.crl_generations(with_retired)] == ["CA", "Retired CA"]
    later = keys.ra.certificate.not_valid_after_utc + timedelta(seconds=1)
    assert [role for role, _ in status.crl_generations(with_retired, later)] == ["CA"]


# --------------------------------------------------------------------------------------------- the admin page

ADMIN = status.ADMIN_PATH
HTTP = backend.HTTP  # the process's handler, over the settings the fixture `local` installs


def _sign_in(http: web.ScepHttp) -> tuple[dict[str, str], str]:
    """A browser session: its cookie header, and the CSRF token read from the page's revoke forms."""
    form = urlencode({"credential": credential(), "next": ADMIN}).encode()
    reply = call(http, "POST", "/api/admin/login", FORM, form)
    assert reply.status == 303 and reply.headers["Location"] == ADMIN
    session = {"Cookie": reply.headers["Set-Cookie"].split(";")[0]}
    page = call(http, "GET", ADMIN, session, by="serial", q="0A1B2C").body.decode()
    token = re.search(r"name='csrf_token' value='([^']+)'", page)
    assert token is not None, page
    return session, token.group(1)


@pytest.mark.usefixtures("local")
def test_the_admin_page_without_a_credential_is_401_and_a_sign_in_form_without_data():
    service = config.service()
    _record_outcomes(service.store)
    reply = call(HTTP, "GET", ADMIN, by="serial", q="0A1B2C")
    page = reply.body.decode()
    assert reply.status == 401 and reply.headers["WWW-Authenticate"].startswith('Bearer realm="scep-admin"')
    assert "id=\"login\"" in page and f'name="next" value="{ADMIN}"' in page
    assert "0A1B2C" not in page and "challenge rejected" not in page and "id='counts'" not in page
    posted = call(HTTP, "POST", ADMIN, FORM, b"serial=0A1B2C&reason=keyCompromise")
    assert posted.status == 401 and b"0A1B2C" not in posted.body
    wrong = call(HTTP, "GET", ADMIN, bearer("wrong-credential-of-the-right-kind-0123456789"))
    assert wrong.status == 401 and b"challenge rejected" not in wrong.body
    assert service.store.certificate_by_serial(0x0A1B2C).status is CertStatus.ISSUED


@pytest.mark.usefixtures("local")
def test_signing_in_shows_counts_by_outcome_and_the_last_failures():
    _record_outcomes(config.service().store)
    session, _ = _sign_in(HTTP)
    reply = call(HTTP, "GET", ADMIN, session)
    page = reply.body.decode()
    assert reply.status == 200 and reply.headers["Cache-Control"] == "no-store"
    assert "style-src 'sha256-" in reply.headers["Content-Security-Policy"]
    for window in range(3):  # the fixture's certificate and one more issued, one failure, one pending reply
        assert f"id='count-issued-{window}'>2<" in page and f"id='count-failed-{window}'>1<" in page
        assert f"id='count-pending-{window}'>1<" in page
    assert "bad_request (2)" in page and "challenge rejected" in page
    assert CHALLENGE not in page


@pytest.mark.usefixtures("local")
def test_the_search_finds_by_subject_san_serial_and_thumbprint():
    store = config.service().store
    laptop = issue_with_names(store, x509.DNSName("laptop-7.contoso.test"))
    session, _ = _sign_in(HTTP)

    def found(**params: str) -> str:
        reply = call(HTTP, "GET", ADMIN, session, **params)
        assert reply.status == 200, reply.body
        return reply.body.decode()

    serial = serial_hex(laptop.serial)
    assert f"data-serial='{serial}'" in found(by="san", q="LAPTOP-7.contoso.test")
    assert f"data-serial='{serial}'" in found(by="thumbprint", q=laptop.thumbprint_sha1.lower())
    assert f"data-serial='{serial}'" in found(by="subject", q=laptop.subject[:12])
    assert "data-serial='0A1B2C'" in found(by="serial", q="0a:1b:2c")
    assert "No certificate matches." in found(by="san", q="nobody.contoso.test")
    bad = call(HTTP, "GET", ADMIN, session, by="serial", q="not-hex")
    assert bad.status == 400 and "serial must be hexadecimal" in bad.body.decode()


@pytest.mark.usefixtures("local")
def test_the_search_pages():
    store = config.service().store
    for _ in range(3):
        issue_with_names(store, x509.DNSName("shared.contoso.test"))
    session, _ = _sign_in(HTTP)
    first = call(HTTP, "GET", ADMIN, session, by="san", q="shared.contoso.test").body.decode()
    assert first.count("data-serial=") == 3 and "id='next-page'" not in first


@pytest.mark.usefixtures("local")
def test_revoking_from_the_page_needs_the_csrf_token():
    store = config.service().store
    session, token = _sign_in(HTTP)
    without = call(HTTP, "POST", ADMIN, {**session, **FORM}, b"serial=0A1B2C&reason=keyCompromise")
    assert without.status == 403 and store.certificate_by_serial(0x0A1B2C).status is CertStatus.ISSUED
    form = urlencode({"serial": "0A1B2C", "reason": "keyCompromise", "csrf_token": token}).encode()
    reply = call(HTTP, "POST", ADMIN, {**session, **FORM}, form, by="serial", q="0A1B2C")
    page = reply.body.decode()
    assert reply.status == 200 and "Certificate 0A1B2C revoked (keyCompromise); a new CRL is published." in page
    revoked = store.certificate_by_serial(0x0A1B2C)
    assert revoked.status is CertStatus.REVOKED and revoked.revocation_reason is RevocationReason.KEY_COMPROMISE
    assert "<td class='status'>revoked<br><small>keyCompromise" in page
    again = call(HTTP, "POST", ADMIN, {**session, **FORM}, form).body.decode()
    assert "was already revoked" in again
    unknown = urlencode({"serial": "FF", "reason": "keyCompromise", "csrf_token": token}).encode()
    missing = call(HTTP, "POST", ADMIN, {**session, **FORM}, unknown)
    assert missing.status == 400 and "no certificate with serial FF" in missing.body.decode()


@pytest.mark.usefixtures("local")
def test_a_bearer_caller_revokes_from_the_form_without_csrf():
    form = b"serial=0A1B2C&reason=superseded"
    reply = call(HTTP, "POST", ADMIN, {**bearer(credential()), **FORM}, form)
    assert reply.status == 200 and "revoked (superseded)" in reply.body.decode()


def _record_outcomes(store) -> None:
    """One more certificate issued, one enrollment refused, one device told to poll."""
    issue(store, new_transaction_id())
    refused = new_transaction_id()
    store.record_failed(store.claim(refused, KEY, LEASE), fail_info=2, reason="challenge rejected")
    store.count_pending()
