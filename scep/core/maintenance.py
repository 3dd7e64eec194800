"""Keeping the CA in service over time: the CA's and RA's expiry, and the RA renewing itself before it expires.

Framework-free. The Functions app's timer function (functions.py) and `scep serve`'s background job both call
`run_daily`; the HTTP functions and `scep serve` call `report_expiry` at start, and `web.health` reads
`expiry_of`.

Only one instance renews: the job takes the store's transaction claim (SQLite or Azure Tables, atomic on both)
on RA_RENEWAL_TRANSACTION before it renews, re-reads the RA from custody while it holds the claim (another
instance may have renewed it a moment ago), and releases the claim when it is done. The others pick the new RA
up the way they pick up any new key: local custody reloads when the PEM files change, Key Vault custody looks
for new versions every KEY_VAULT_REFRESH_SECONDS.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import cast

from cryptography import x509

from scep.core.ca import issue_ocsp_signer, issue_ra
from scep.core.service import ScepService
from scep.keys import CaKeys, KeyHome, Slot
from scep.store import ClaimOutcome, Store

log = logging.getLogger("scep.core.maintenance")

EXPIRY_WARNING_DAYS = 30
# Longer than any transactionID a device can send (message.py accepts at most 256 characters): no device can
# take this transaction and keep the RA from being renewed.
RA_RENEWAL_TRANSACTION = "maintenance:ra-renewal:".ljust(300, "-")
OCSP_RENEWAL_TRANSACTION = "maintenance:ocsp-renewal:".ljust(300, "-")
OCSP_RENEW_DAYS = 30  # of the delegated OCSP signer's 90 days (scep.core.ca.DEFAULT_OCSP_DAYS)
RENEWAL_CLAIM_KEY = "scep-maintenance"
RENEWAL_LEASE = timedelta(minutes=10)  # a crashed renewal blocks the next one for at most this long
_NOTHING_GAINED = timedelta(days=1)

ADVICE = {
    "CA": "roll it over: `scep ca rollover` (or --subordinate), let devices fetch the next CA, then `scep ca promote`",
    "RA": "it renews itself within SCEP_RA_RENEW_DAYS of its expiry; to renew it now run `scep ca ra renew`",
}


class ExpiryState(str, Enum):
    OK = "ok"
    EXPIRING = "expiring"  # within EXPIRY_WARNING_DAYS
    EXPIRED = "expired"


@dataclass(frozen=True)
class Expiry:
    role: str  # "CA" or "RA"
    certificate: x509.Certificate
    state: ExpiryState
    days_left: int  # whole days, negative once expired

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc

    def log(self) -> None:
        """One line naming the certificate, its expiry and what to do: WARNING while it lasts, ERROR after."""
        subject = self.certificate.subject.rfc4514_string()
        when = f"{self.not_after:%Y-%m-%d %H:%M} UTC"
        if self.state is ExpiryState.EXPIRED:
            log.error("the %s certificate %s expired on %s: " + ADVICE[self.role], self.role, subject, when)
        else:
            log.warning(
                "the %s certificate %s expires on %s (in %d days): " + ADVICE[self.role],
                self.role, subject, when, self.days_left,
            )


def expiry_of(keys: CaKeys, now: datetime | None = None, warning_days: int = EXPIRY_WARNING_DAYS) -> list[Expiry]:
    """The CA's and the RA's expiry; no key operation, only the certificates custody already holds."""
    now = now or datetime.now(timezone.utc)
    return [
        _expiry("CA", keys.ca.certificate, now, warning_days),
        _expiry("RA", keys.ra.certificate, now, warning_days),
    ]


def _expiry(role: str, certificate: x509.Certificate, now: datetime, warning_days: int) -> Expiry:
    left = certificate.not_valid_after_utc - now
    if left <= timedelta(0):
        state = ExpiryState.EXPIRED
    elif left <= timedelta(days=warning_days):
        state = ExpiryState.EXPIRING
    else:
        state = ExpiryState.OK
    return Expiry(role, certificate, state, left.days)


_reported: set[tuple[str, int, ExpiryState]] = set()
_reported_lock = threading.Lock()


def report_expiry(keys: CaKeys, now: datetime | None = None) -> None:
    """One WARNING line for a CA or RA that expires within EXPIRY_WARNING_DAYS, one ERROR line for an expired one.

    Each certificate and state is reported once per process (a forked worker inherits what its parent reported).
    """
    for expiry in expiry_of(keys, now):
        if expiry.state is ExpiryState.OK:
            continue
        seen = (expiry.role, expiry.certificate.serial_number, expiry.state)
        with _reported_lock:
            if seen in _reported:
                continue
            _reported.add(seen)
        expiry.log()


def renew_ra_if_due(
    home: KeyHome, store: Store, renew_days: int, now: datetime | None = None
) -> x509.Certificate | None:
    """Renew the RA (new key, `scep ca ra renew`) when it expires within renew_days; the new RA, or None.

    At most one instance renews: the others find the claim taken, or the RA already renewed.
    """
    cached = home.keys().ra.certificate
    return _renew_if_due(home, store, Slot.RA, cached, renew_days, now or datetime.now(timezone.utc))


def renew_ocsp_signer_if_due(home: KeyHome, store: Store, now: datetime | None = None) -> x509.Certificate | None:
    """Renew the delegated OCSP signer (`scep ca ocsp renew`) within OCSP_RENEW_DAYS of its expiry, or once it has
    expired; nothing when none was ever issued (the CA keys then sign OCSP answers themselves)."""
    cached = home.ocsp_signer()
    if cached is None:
        return None
    return _renew_if_due(home, store, Slot.OCSP, cached.certificate, OCSP_RENEW_DAYS, now or datetime.now(timezone.utc))


_RENEWALS = {
    Slot.RA: ("RA", RA_RENEWAL_TRANSACTION, issue_ra),
    Slot.OCSP: ("OCSP signer", OCSP_RENEWAL_TRANSACTION, issue_ocsp_signer),
}


def _renew_if_due(
    home: KeyHome, store: Store, slot: Slot, cached: x509.Certificate, renew_days: int, now: datetime
) -> x509.Certificate | None:
    role, transaction, issue = _RENEWALS[slot]
    if not _due(cached, home.keys().ca.certificate, renew_days, now):
        return None  # the cached view suffices on an ordinary day: no store write
    claim = store.claim(transaction, RENEWAL_CLAIM_KEY, RENEWAL_LEASE)
    if claim.outcome is not ClaimOutcome.CLAIMED:
        log.info("%s renewal: another instance is renewing it (%s)", role, claim.outcome.value)
        return None
    outcome = "renewal failed"
    try:
        current = home.handle(slot).certificate  # read afresh: another instance may have just renewed it
        if not _due(current, home.handle(Slot.CA).certificate, renew_days, now):
            outcome = "already renewed"
            return None
        renewed = issue(home, current.subject.rfc4514_string())
        outcome = f"renewed as serial {renewed.serial_number:x}"
        log.warning(
            "%s renewed: serial %x valid until %s replaces serial %x that expires on %s", role,
            renewed.serial_number, f"{renewed.not_valid_after_utc:%Y-%m-%d}",
            current.serial_number, f"{current.not_valid_after_utc:%Y-%m-%d}",
        )
        return renewed
    finally:
        store.release(claim, outcome)  # the next run re-checks the RA


def _due(ra: x509.Certificate, ca: x509.Certificate, renew_days: int, now: datetime) -> bool:
    if ra.not_valid_after_utc - now > timedelta(days=renew_days):
        return False
    # An RA never outlives its CA: when the CA ends first, a new RA would end at the same moment.
    return ca.not_valid_after_utc - ra.not_valid_after_utc > _NOTHING_GAINED


def run_daily(service: ScepService, renew_days: int) -> x509.Certificate | None:
    """The scheduled job: renew the RA and the delegated OCSP signer when due, then report what still needs a
    person (a CA near its end)."""
    home = cast(KeyHome, service.custody)  # config builds every service on a KeyHome
    renewed = renew_ra_if_due(home, service.store, renew_days)
    renew_ocsp_signer_if_due(home, service.store)
    report_expiry(service.custody.keys())
    return renewed
