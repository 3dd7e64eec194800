"""The public status page (scep/http/status.py, served at /status): what it shows, that every value is escaped,
that a hanging backend is reported failing within the probe's timeout, and that it never calls Intune."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone

from cryptography import x509

from scep.azure.intune import IntuneAuthenticationError, IntuneResult
from scep.azure.intune.validator import IntuneValidator
from scep.challenge.composite import CompositeValidator
from scep.challenge.static import StaticValidator
from scep.core.der import fingerprint
from scep.core.maintenance import expiry_of
from scep.http import status, web
from scep.keys import CaKeys
from tests.conftest import CHALLENGE


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
    assert "<th>Key custody</th><td class='failing'>failing</td><td>" in page and "OSError: connection refused" in page
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
