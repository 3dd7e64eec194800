"""Expiry watching and RA self-renewal (scep/core/maintenance.py) on local custody and SQLite, in process."""

from __future__ import annotations

import json
import logging
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from scep.challenge.static import StaticValidator
from scep.core import ca
from scep.core.ca import CaOptions
from scep.core.maintenance import RA_RENEWAL_TRANSACTION, renew_ra_if_due, report_expiry
from scep.core.service import ScepService, ServiceOptions
from scep.http import web
from scep.keys.local import LocalHome
from scep.store.sqlite import SqliteStore
from scep.tools.client import RequestOptions, build_request, make_csr, new_enrollment
from tests.conftest import CHALLENGE
from tests.scep_helpers import ra_and_ca


@pytest.fixture
def home(tmp_path: Path) -> LocalHome:
    home = LocalHome(tmp_path / "keys")
    ca.init_root(home, CaOptions())
    return home


def build_service(home: LocalHome, tmp_path: Path) -> ScepService:
    return ScepService(home, SqliteStore(tmp_path / "scep.db"), StaticValidator(CHALLENGE), ServiceOptions())


def test_an_ra_far_from_its_end_is_left_alone_without_touching_the_store(home, tmp_path):
    store = SqliteStore(tmp_path / "scep.db")
    assert renew_ra_if_due(home, store, renew_days=30) is None
    assert store.transaction_state(RA_RENEWAL_TRANSACTION) is None


def test_a_due_ra_is_renewed_with_a_new_key_and_the_same_subject(home, tmp_path):
    old = ca.issue_ra(home, days=20)
    renewed = renew_ra_if_due(home, SqliteStore(tmp_path / "scep.db"), renew_days=30)
    assert renewed is not None and home.keys().ra.certificate == renewed
    assert renewed.subject == old.subject and renewed.public_key() != old.public_key()
    assert renewed.not_valid_after_utc - old.not_valid_after_utc > timedelta(days=600)
    assert renew_ra_if_due(home, SqliteStore(tmp_path / "scep.db"), renew_days=30) is None


def test_an_ra_is_not_renewed_when_its_ca_ends_first(tmp_path):
    home = LocalHome(tmp_path / "keys")
    ca.init_root(home, CaOptions(days=10))  # the RA is cut to the CA's end: a new one could not last longer
    assert renew_ra_if_due(home, SqliteStore(tmp_path / "scep.db"), renew_days=30) is None


def test_two_instances_renewing_at_once_renew_once(home, tmp_path):
    ca.issue_ra(home, days=5)
    start = threading.Barrier(4)
    results: list = []

    def instance() -> None:  # its own custody and store objects, as another process or instance has
        own_home, own_store = LocalHome(home.directory), SqliteStore(tmp_path / "scep.db")
        own_home.keys()
        start.wait()
        results.append(renew_ra_if_due(own_home, own_store, renew_days=30))

    threads = [threading.Thread(target=instance) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    renewed = [certificate for certificate in results if certificate is not None]
    assert len(results) == 4 and len(renewed) == 1
    assert LocalHome(home.directory).keys().ra.certificate == renewed[0]


def test_no_device_can_take_the_renewal_transaction(home, tmp_path, keys):
    service = build_service(home, tmp_path)
    ra, _ = ra_and_ca(service)
    key = keys.new()
    enrollment = new_enrollment(key, make_csr(key, "squatter", CHALLENGE), transaction_id=RA_RENEWAL_TRANSACTION)
    request = build_request(enrollment, ra, RequestOptions())
    reply = web.handle_scep(service, "POST", {"operation": "PKIOperation"}, request)
    assert reply.status == 400  # a transactionID longer than 256 characters is refused before any claim
    assert service.store.transaction_state(RA_RENEWAL_TRANSACTION) is None


def test_expiry_is_reported_once_per_certificate_and_state(home, caplog):
    ra = ca.issue_ra(home, days=12)
    keys = home.keys()
    with caplog.at_level(logging.WARNING, logger="scep.core.maintenance"):
        report_expiry(keys)
        report_expiry(keys)
        report_expiry(keys, now=ra.not_valid_after_utc + timedelta(hours=1))
    lines = [(record.levelname, record.getMessage()) for record in caplog.records]
    assert len(lines) == 2
    (level, warning), (error_level, error) = lines
    assert level == "WARNING" and "the RA certificate CN=SCEP RA" in warning
    assert f"{ra.not_valid_after_utc:%Y-%m-%d}" in warning and "scep ca ra renew" in warning
    assert error_level == "ERROR" and "expired on" in error


def test_a_ca_near_its_end_says_how_to_roll_over(tmp_path, caplog):
    home = LocalHome(tmp_path / "keys")
    ca.init_root(home, CaOptions(days=20))
    with caplog.at_level(logging.WARNING, logger="scep.core.maintenance"):
        report_expiry(home.keys())
    assert any("the CA certificate" in r.getMessage() and "scep ca rollover" in r.getMessage() for r in caplog.records)


def test_health_is_degraded_within_30_days_and_expired_after(home, tmp_path):
    service = build_service(home, tmp_path)
    healthy = web.health(service)
    assert healthy.status == 200 and json.loads(healthy.body)["status"] == "ok"

    ca.issue_ra(home, days=29)
    expiring = web.health(service)
    report = json.loads(expiring.body)
    assert expiring.status == 200 and report["status"] == "degraded"
    assert report["ra"]["expiry"] == "expiring" and report["ra"]["daysLeft"] == 28 and report["ca"]["expiry"] == "ok"

    ca.issue_ra(home, days=0)  # ends the moment it is issued
    expired = web.health(service)
    report = json.loads(expired.body)
    assert expired.status == 503 and report["status"] == "expired" and report["ra"]["expired"] is True


def test_renewal_after_the_ra_expired(home, tmp_path):
    ca.issue_ra(home, days=0)
    renewed = renew_ra_if_due(home, SqliteStore(tmp_path / "scep.db"), renew_days=1)
    assert renewed is not None and renewed.not_valid_after_utc > datetime.now(timezone.utc) + timedelta(days=600)
