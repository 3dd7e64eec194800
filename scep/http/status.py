"""The status page operators read (`/status`, routed by web.py): public and safe to show anyone (no secrets, no
challenge, no device data), server-rendered HTML that refreshes itself. Framework-free, as web.py is.

It shows the CA and RA (subject, SHA-256 fingerprint, days to expiry, the next CA after a rollover) with links to
the CA certificate, the SCEP URL for an Intune profile, the health of each backend (key custody, store, Intune),
and the version. Every check is cheap and bounded: custody and store are probed in a worker thread with a short
timeout and the answer is kept for a few seconds, so a stopped vault turns the page to "failing" within one
refresh instead of hanging it, and many viewers cost one probe. No private-key operation runs for a view, and
Intune is never called for one: the page shows the last outcome of the Intune calls enrollments made. The CRL
of each CA generation in use (its cRLNumber, thisUpdate and nextUpdate) and the OCSP signer's expiry come from one
more bounded probe, kept longer (the CRL record and the signer are read, nothing is signed).

The admin part (`admin_page`, served at /api/admin/status by admin_api behind admin_auth) shows what the public
page must not: enrollment counts by outcome, the last failures, a certificate search and a revoke form.
"""

from __future__ import annotations

import base64
import hashlib
import html
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast
from urllib.parse import urlencode

from cryptography import x509

from scep import PRODUCT, __version__
from scep.challenge import ChallengeValidator
from scep.core.der import fingerprint
from scep.core.issuer import ca_id
from scep.core.maintenance import EXPIRY_WARNING_DAYS, Expiry, ExpiryState, expiry_of
from scep.core.protocol import FailInfo
from scep.core.service import ScepService
from scep.keys import CaKeys, KeyHome, Slot
from scep.store import (
    CertificatePage,
    CertStatus,
    EnrollmentFailure,
    EnrollmentOutcome,
    IssuedCertificate,
    RevocationReason,
    StoredCrl,
    hour_bucket,
    serial_hex,
)

if TYPE_CHECKING:  # the Azure SDKs it brings cost each worker about 12 MiB: imported only where Intune is used
    from scep.azure.intune.validator import IntuneCall, IntuneValidator

log = logging.getLogger("scep.http.status")

PROBE_TIMEOUT_SECONDS = 2.0  # a backend that has not answered by then is reported failing
PROBE_CACHE_SECONDS = 4.0  # one probe serves every view within this time
REVOCATION_CACHE_SECONDS = 60.0  # a CRL lives for days and is due at half-life: a minute old is fresh enough
REFRESH_SECONDS = 10
COUNT_WINDOWS = (("1 h", timedelta(hours=1)), ("24 h", timedelta(hours=24)), ("7 days", timedelta(days=7)))
RECENT_FAILURES = 20
SCEP_PATH = "/api/scep"

T = TypeVar("T")


class State(str, Enum):
    OK = "ok"
    WARNING = "warning"
    FAILING = "failing"
    UNUSED = "not used"


@dataclass(frozen=True)
class Check:
    name: str
    state: State
    detail: str


@dataclass(frozen=True)
class ProbeResult(Generic[T]):
    value: T | None
    error: str  # empty when the probe answered
    at: datetime


class BoundedProbe(Generic[T]):
    """Runs a backend call in one worker thread, waits at most `timeout` seconds for it and keeps the outcome for
    `ttl` seconds. A call that is still hanging is not started again: the probe reports it as failing."""

    def __init__(self, call: Callable[[], T], timeout: float = PROBE_TIMEOUT_SECONDS,
                 ttl: float = PROBE_CACHE_SECONDS) -> None:
        self._call = call
        self._timeout = timeout
        self._ttl = ttl
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="status-probe")
        self._running: Future[T] | None = None
        self._result: ProbeResult[T] | None = None
        self._expires = 0.0
        self.last_value: T | None = None  # the last value the backend gave, for what it showed before it failed

    def result(self) -> ProbeResult[T]:
        with self._lock:
            if self._result is not None and time.monotonic() < self._expires:
                return self._result
            self._result = self._probe()
            self._expires = time.monotonic() + self._ttl
            return self._result

    def _probe(self) -> ProbeResult[T]:
        if self._running is None or self._running.done():
            self._running = self._executor.submit(self._call)
        try:
            value = self._running.result(timeout=self._timeout)
        except FutureTimeout:
            return ProbeResult(None, f"no answer within {self._timeout:g} s", _now())
        except Exception as error:  # any failure of the backend is what the page reports, by its kind only
            log.warning("status page check failed: %s", _first_line(error))
            return ProbeResult(None, f"failed ({type(error).__name__})", _now())
        self.last_value = value
        return ProbeResult(value, "", _now())


class StatusProbes:
    """The probes of one service, built once per worker process."""

    def __init__(self, service: ScepService) -> None:
        self.service = service
        self.custody = BoundedProbe(self._read_keys)
        self.store = BoundedProbe(self._ping_store)
        self.revocation = BoundedProbe(self._read_revocation, ttl=REVOCATION_CACHE_SECONDS)

    def _read_keys(self) -> CaKeys:
        home = cast(KeyHome, self.service.custody)
        keys = home.keys()  # the cached view, or a refresh when it is due
        if not home.exists(Slot.CA):  # reaches the vault (or reads the CA file) every time
            raise LookupError("the CA is missing from custody")
        return keys

    def _ping_store(self) -> bool:
        self.service.store.ping()
        return True

    def _read_revocation(self) -> RevocationState:
        home = cast(KeyHome, self.service.custody)
        keys = home.keys()
        crls = [(role, certificate, self.service.store.latest_crl(ca_id(certificate)))
                for role, certificate in crl_generations(keys)]
        signer = home.ocsp_signer()
        return RevocationState(crls, None if signer is None else signer.certificate)


@dataclass(frozen=True)
class RevocationState:
    crls: list[tuple[str, x509.Certificate, StoredCrl | None]]  # (role, CA certificate, its latest CRL)
    ocsp_signer: x509.Certificate | None  # the delegated signer; None: the CA signs its own OCSP answers


def crl_generations(keys: CaKeys, now: datetime | None = None) -> list[tuple[str, x509.Certificate]]:
    """The CA generations whose CRLs are published: current, next, and every retired one not yet expired."""
    now = now or _now()
    generations = [("CA", keys.ca.certificate)]
    if keys.next_ca is not None:
        generations.append(("Next CA", keys.next_ca.certificate))
    generations += [("Retired CA", retired) for retired in keys.retired if retired.not_valid_after_utc > now]
    return generations


_probes: StatusProbes | None = None
_probes_lock = threading.Lock()


def probes_for(service: ScepService) -> StatusProbes:
    global _probes
    with _probes_lock:
        if _probes is None or _probes.service is not service:
            _probes = StatusProbes(service)
        return _probes


# --------------------------------------------------------------------------------------------- checks


# The page is public: it names the kind of backend, never its path, URL or error text (those are in the logs).
_BACKEND_NAMES = {"local": "local PEM files", "keyvault": "Azure Key Vault", "sqlite": "SQLite",
                  "tables": "Azure Table Storage"}


def custody_check(service: ScepService, probe: ProbeResult[CaKeys]) -> Check:
    return _probe_check("Key custody", _BACKEND_NAMES[service.options.key_custody], probe)


def store_check(service: ScepService, probe: ProbeResult[bool]) -> Check:
    return _probe_check("Store", _BACKEND_NAMES[service.options.store_kind], probe)


def _probe_check(name: str, kind: str, probe: ProbeResult[Any]) -> Check:
    if probe.error:
        return Check(name, State.FAILING, f"{kind}: {probe.error}; the logs say why")
    return Check(name, State.OK, f"{kind}: answered at {_clock(probe.at)}")



def intune_checks(validator: ChallengeValidator) -> list[Check]:
    """Token, service discovery and the last validation, from the outcomes enrollments recorded."""
    intune = intune_validator(validator)
    if intune is None:
        return [Check("Intune", State.UNUSED, "challenges are not validated by Intune (SCEP_CHALLENGE_MODE)")]
    validation = intune.calls.last("validateRequest")
    notification = intune.calls.last("successNotification")
    calls = [call for call in (validation, notification) if call is not None]
    if not calls:
        idle = "no enrollment has asked Intune since this worker started"
        return [Check(name, State.UNUSED, idle) for name in ("Intune token", "Intune service discovery",
                                                               "Intune validation")]
    latest = max(calls, key=lambda call: call.at)
    return [
        _stage_check("Intune token", latest, latest.token_failed, "token issued"),
        _stage_check("Intune service discovery", latest, latest.token_failed or latest.discovery_failed,
                     "ScepRequestValidationFEService found"),
        _call_check("Intune validation", validation),
        _call_check("Intune success notification", notification),
    ]


def intune_validator(validator: ChallengeValidator) -> IntuneValidator | None:
    module = sys.modules.get("scep.azure.intune.validator")
    if module is None:  # no Intune validator exists before its module is imported
        return None
    members: Iterable[ChallengeValidator] = getattr(validator, "validators", (validator,))
    return next((member for member in members if isinstance(member, module.IntuneValidator)), None)


def _stage_check(name: str, latest: IntuneCall, failed: bool, success: str) -> Check:
    when = _clock(latest.at)
    if failed:
        return Check(name, State.FAILING, f"{latest.error} at {when}: {latest.detail}")
    return Check(name, State.OK, f"{success} (last call at {when})")


def _call_check(name: str, call: IntuneCall | None) -> Check:
    if call is None:
        return Check(name, State.UNUSED, "not called since this worker started")
    when = _clock(call.at)
    if not call.answered:
        return Check(name, State.FAILING, f"{call.error} at {when}: {call.detail}")
    return Check(name, State.OK, f"Intune answered {call.code} at {when}")


def crl_check(role: str, certificate: x509.Certificate, crl: StoredCrl | None, now: datetime) -> Check:
    """Failing when missing or past nextUpdate (relying parties refuse it), warning past half-life (a publication
    is due and has not happened)."""
    name = f"CRL of the {role} ({ca_id(certificate)[:16]})"
    if crl is None:
        return Check(name, State.FAILING, "no CRL has been published for this CA")
    detail = f"cRLNumber {crl.number}, thisUpdate {_clock(crl.this_update)}, nextUpdate {_clock(crl.next_update)}"
    if now >= crl.next_update:
        return Check(name, State.FAILING, f"past its nextUpdate: {detail}")
    if now >= crl.this_update + (crl.next_update - crl.this_update) / 2:
        return Check(name, State.WARNING, f"past half-life, a new CRL is due: {detail}")
    return Check(name, State.OK, detail)


def ocsp_check(signer: x509.Certificate | None, now: datetime) -> Check:
    if signer is None:
        return Check("OCSP signer", State.OK, "the CA signs its own OCSP answers (no delegated signer)")
    not_after = signer.not_valid_after_utc
    days_left = (not_after - now).days
    detail = f"delegated signer {signer.subject.rfc4514_string()}, valid until {_clock(not_after)}"
    if now >= not_after:
        return Check("OCSP signer", State.WARNING, f"expired, the CA signs instead: {detail}")
    if days_left < EXPIRY_WARNING_DAYS:
        return Check("OCSP signer", State.WARNING, f"{days_left} days left: {detail}")
    return Check("OCSP signer", State.OK, f"{days_left} days left: {detail}")


def revocation_checks(probe: ProbeResult[RevocationState], now: datetime) -> list[Check]:
    if probe.value is None:
        return [Check("CRL and OCSP", State.FAILING, f"cannot be read: {probe.error}; the logs say why")]
    state = probe.value
    checks = [crl_check(role, certificate, crl, now) for role, certificate, crl in state.crls]
    return checks + [ocsp_check(state.ocsp_signer, now)]


def expiry_check(expiry: Expiry) -> Check:
    state = {ExpiryState.OK: State.OK, ExpiryState.EXPIRING: State.WARNING}.get(expiry.state, State.FAILING)
    return Check(f"{expiry.role} certificate", state, f"{expiry.days_left} days left")


# --------------------------------------------------------------------------------------------- page


@dataclass(frozen=True)
class StatusView:
    version: str
    scep_url: str
    checks: list[Check]
    certificates: list[tuple[str, x509.Certificate, Expiry | None]] = field(default_factory=list)
    generated: datetime = field(default_factory=lambda: _now())

    @property
    def overall(self) -> State:
        states = {check.state for check in self.checks}
        return next((state for state in (State.FAILING, State.WARNING) if state in states), State.OK)


def status_view(service: ScepService, request_headers: Mapping[str, str]) -> StatusView:
    probes = probes_for(service)
    keys_probe = probes.custody.result()
    checks = [custody_check(service, keys_probe), store_check(service, probes.store.result())]
    checks += revocation_checks(probes.revocation.result(), _now())
    checks += intune_checks(service.validator)
    keys = keys_probe.value or probes.custody.last_value
    certificates: list[tuple[str, x509.Certificate, Expiry | None]] = []
    if keys is not None:
        expiries = expiry_of(keys)
        checks = [expiry_check(expiry) for expiry in expiries] + checks
        certificates = [(expiry.role, expiry.certificate, expiry) for expiry in expiries]
        if keys.next_ca is not None:
            certificates.append(("Next CA", keys.next_ca.certificate, None))
    return StatusView(__version__, scep_url(request_headers), checks, certificates)


def scep_url(request_headers: Mapping[str, str]) -> str:
    """The SCEP URL as this request reached the server (a proxy's X-Forwarded-Proto/-Host respected)."""
    headers = {name.lower(): value for name, value in request_headers.items()}
    scheme = headers.get("x-forwarded-proto", "").split(",")[0].strip() or "http"
    host = headers.get("x-forwarded-host", "").split(",")[0].strip() or headers.get("host", "") or "localhost"
    return f"{scheme}://{host}{SCEP_PATH}"


def render(view: StatusView) -> str:
    rows = "".join(_check_row(check) for check in view.checks)
    certificates = "".join(_certificate_block(role, certificate, expiry)
                           for role, certificate, expiry in view.certificates)
    if not certificates:
        certificates = "<p class='failing'>The CA certificate cannot be read from custody.</p>"
    return PAGE.format(
        style=STYLE,
        title=_e(f"{PRODUCT} status"),
        refresh=REFRESH_SECONDS,
        overall=_e(view.overall.value),
        overall_class=_css(view.overall),
        generated=_e(_clock(view.generated)),
        scep_url=_e(view.scep_url),
        certificates=certificates,
        rows=rows,
        version=_e(view.version),
    )


def _check_row(check: Check) -> str:
    return (f"<tr><th>{_e(check.name)}</th><td class='{_css(check.state)}'>{_e(check.state.value)}</td>"
            f"<td>{_e(check.detail)}</td></tr>")


def _certificate_block(role: str, certificate: x509.Certificate, expiry: Expiry | None) -> str:
    not_after = certificate.not_valid_after_utc
    days = f" ({expiry.days_left} days left)" if expiry is not None else ""
    return (
        f"<h3>{_e(role)}</h3><dl>"
        f"<dt>Subject</dt><dd>{_e(certificate.subject.rfc4514_string())}</dd>"
        f"<dt>SHA-256</dt><dd class='fingerprint'>{_e(fingerprint(certificate))}</dd>"
        f"<dt>Valid until</dt><dd>{_e(f'{not_after:%Y-%m-%d %H:%M} UTC{days}')}</dd>"
        "</dl>"
    )


def _css(state: State) -> str:
    return state.name.lower()


def _e(value: str) -> str:
    return html.escape(value, quote=True)


def _clock(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {first}"[:300]


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; padding: 0 1em; color: #222; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .3em .6em; border-bottom: 1px solid #ddd; vertical-align: top; }
dt { font-weight: bold; } dd { margin: 0 0 .4em 1em; }
.fingerprint, code { font-family: ui-monospace, monospace; word-break: break-all; }
.ok { color: #17692b; } .warning { color: #8a5a00; } .failing { color: #b00020; font-weight: bold; }
.unused { color: #666; } form.inline { display: inline; } td form { margin: 0; }
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{refresh}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{style}</style></head>
<body>
<h1>{title}: <span id="overall" class="{overall_class}">{overall}</span></h1>
<p>Checked at {generated}; this page refreshes every {refresh} s.</p>
<h2>Enrollment</h2>
<p>SCEP URL for the Intune SCEP certificate profile: <code id="scep-url">{scep_url}</code></p>
<p>CA certificate for the trusted certificate profile:
<a href="/api/ca.der">ca.cer (DER)</a> &middot; <a href="/api/ca.pem">ca.pem (PEM)</a></p>
<h2>Certificates</h2>
{certificates}
<h2>Health</h2>
<table id="health"><tbody>{rows}</tbody></table>
<p>Version {version}</p>
</body></html>
"""


def public_page(service: ScepService, request_headers: Mapping[str, str]) -> str:
    """The public status page as HTML."""
    return render(status_view(service, request_headers))


# --------------------------------------------------------------------------------------------- admin page

ADMIN_PATH = "/api/admin/status"
SEARCH_FIELDS = {"subject": "Subject (starts with, e.g. CN=device-)", "san": "SAN (whole name)",
                 "serial": "Serial (hex)", "thumbprint": "SHA-1 thumbprint"}
# The pages' one inline style block is allowed by its hash; nothing else may load, frame or post elsewhere.
_STYLE_HASH = base64.b64encode(hashlib.sha256(STYLE.encode("utf-8")).digest()).decode("ascii")
ADMIN_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; form-action 'self';"
                               " frame-ancestors 'none'",
}


@dataclass(frozen=True)
class Search:
    by: str = "subject"  # a key of SEARCH_FIELDS
    text: str = ""
    status: str = ""  # a CertStatus value, or "" for any


@dataclass(frozen=True)
class AdminView:
    who: str
    csrf_token: str | None  # a browser session's; a bearer caller needs none
    counts: list[tuple[str, datetime, dict[EnrollmentOutcome, int]]]  # (window, counted since, outcomes)
    failures: tuple[EnrollmentFailure, ...]
    search: Search
    results: CertificatePage | None
    notice: str = ""
    problem: str = ""


def admin_view(service: ScepService, who: str, csrf_token: str | None, search: Search,
               results: CertificatePage | None, notice: str = "", problem: str = "") -> AdminView:
    """The admin page's data: counts per window (whole hours: the store counts per hour), the last failures."""
    now = _now()
    counts = []
    for label, window in COUNT_WINDOWS:
        since = datetime.strptime(hour_bucket(now - window), "%Y-%m-%dT%H").replace(tzinfo=timezone.utc)
        counts.append((label, since, service.store.enrollment_counts(since)))
    failures = service.store.recent_failures(RECENT_FAILURES)
    return AdminView(who, csrf_token, counts, failures, search, results, notice, problem)


def render_admin(view: AdminView) -> str:
    return ADMIN_PAGE.format(
        style=STYLE,
        title=_e(f"{PRODUCT} administration"),
        who=_e(view.who),
        messages=_admin_messages(view),
        counts=_counts_table(view),
        failures="".join(_failure_row(failure) for failure in view.failures)
        or "<tr><td colspan='4'>No failed enrollment is recorded.</td></tr>",
        search=_search_form(view.search),
        results=_results(view),
        path=ADMIN_PATH,
    )


def login_page(next_path: str = ADMIN_PATH) -> str:
    """The sign-in form for a browser without a session; the login route sends it back to next_path."""
    return LOGIN_PAGE.format(style=STYLE, title=_e(f"{PRODUCT} administration"), next=_e(next_path))


def _admin_messages(view: AdminView) -> str:
    notice = f"<p id='notice' class='ok'>{_e(view.notice)}</p>" if view.notice else ""
    problem = f"<p id='problem' class='failing'>{_e(view.problem)}</p>" if view.problem else ""
    return notice + problem


def _counts_table(view: AdminView) -> str:
    head = "".join(f"<th>{_e(label)}<br><small>since {_e(_clock(since))}</small></th>"
                   for label, since, _ in view.counts)
    rows = "".join(
        f"<tr><th>{_e(outcome.value)}</th>"
        + "".join(f"<td id='count-{outcome.value}-{index}'>{counts[outcome]}</td>"
                  for index, (_, _, counts) in enumerate(view.counts))
        + "</tr>"
        for outcome in EnrollmentOutcome
    )
    return f"<table id='counts'><thead><tr><th>Outcome</th>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _failure_row(failure: EnrollmentFailure) -> str:
    try:
        info = f"{FailInfo(failure.fail_info).name.lower()} ({failure.fail_info})"
    except ValueError:
        info = str(failure.fail_info)
    return (f"<tr><td>{_e(_clock(failure.at))}</td><td><code>{_e(failure.transaction_id)}</code></td>"
            f"<td>{_e(info)}</td><td>{_e(failure.reason)}</td></tr>")


def _search_form(search: Search) -> str:
    fields = "".join(f"<option value='{_e(key)}'{' selected' if key == search.by else ''}>{_e(label)}</option>"
                     for key, label in SEARCH_FIELDS.items())
    statuses = "".join(f"<option value='{_e(status.value)}'{' selected' if status.value == search.status else ''}>"
                       f"{_e(status.value)}</option>" for status in CertStatus)
    return (f"<form id='search' method='get' action='{ADMIN_PATH}'>"
            f"<select name='by'>{fields}</select> <input name='q' size='40' value='{_e(search.text)}'> "
            f"<select name='status'><option value=''>any status</option>{statuses}</select> "
            "<button type='submit'>Search</button></form>")


def _results(view: AdminView) -> str:
    if view.results is None:
        return ""
    if not view.results.items:
        return "<p id='results'>No certificate matches.</p>"
    rows = "".join(_certificate_row(view, item) for item in view.results.items)
    more = ""
    if view.results.next_page:
        more = f"<p><a id='next-page' href='{_e(_search_url(view.search, view.results.next_page))}'>Next page</a></p>"
    head = "<tr><th>Serial</th><th>Subject</th><th>Status</th><th>Valid until</th><th>SHA-1</th><th></th></tr>"
    return f"<table id='results'><thead>{head}</thead><tbody>{rows}</tbody></table>{more}"


def _search_url(search: Search, page: str | None = None) -> str:
    """The page showing this search (again, after a revocation: the form posts to it)."""
    fields = {"by": search.by, "q": search.text, "status": search.status, **({"page": page} if page else {})}
    return f"{ADMIN_PATH}?{urlencode(fields)}"


def _certificate_row(view: AdminView, item: IssuedCertificate) -> str:
    serial = serial_hex(item.serial)
    action = "" if item.status is CertStatus.REVOKED else _revoke_form(view, serial)
    revoked = ""
    if item.revoked_at is not None and item.revocation_reason is not None:
        revoked = f"<br><small>{_e(item.revocation_reason.value)}, {_e(_clock(item.revoked_at))}</small>"
    return (f"<tr data-serial='{_e(serial)}'><td><code>{_e(serial)}</code></td><td>{_e(item.subject)}</td>"
            f"<td class='status'>{_e(item.status.value)}{revoked}</td>"
            f"<td>{_e(f'{item.not_after:%Y-%m-%d %H:%M} UTC')}</td>"
            f"<td class='fingerprint'>{_e(item.thumbprint_sha1)}</td><td>{action}</td></tr>")


def _revoke_form(view: AdminView, serial: str) -> str:
    csrf = (f"<input type='hidden' name='csrf_token' value='{_e(view.csrf_token)}'>" if view.csrf_token else "")
    reasons = "".join(f"<option value='{_e(reason.value)}'>{_e(reason.value)}</option>" for reason in RevocationReason)
    return (f"<form class='inline revoke' method='post' action='{_e(_search_url(view.search))}'>{csrf}"
            f"<input type='hidden' name='serial' value='{_e(serial)}'>"
            f"<select name='reason'>{reasons}</select> <button type='submit'>Revoke</button></form>")


_ADMIN_HEAD = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{style}</style></head>
<body>
<h1>{title}</h1>
"""

ADMIN_PAGE = _ADMIN_HEAD + """<p>Signed in as {who}. The public page is <a href="/status">/status</a>.</p>
{messages}
<h2>Enrollments</h2>
{counts}
<p><small>Counted per hour: each window starts at a whole hour. Pending: the device was told to poll.</small></p>
<h2>Last failures</h2>
<table id="failures"><thead><tr><th>At</th><th>transactionID</th><th>failInfo</th><th>Reason</th></tr></thead>
<tbody>{failures}</tbody></table>
<h2>Certificates</h2>
{search}
{results}
</body></html>
"""

LOGIN_PAGE = _ADMIN_HEAD + """<form id="login" method="post" action="/api/admin/login">
<input type="hidden" name="next" value="{next}">
<label>Admin credential (scep serve prints it) <input type="password" name="credential" autocomplete="off"></label>
<button type="submit">Sign in</button>
</form></body></html>
"""
