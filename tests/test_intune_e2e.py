"""Intune mode end to end: `scep serve` with SCEP_CHALLENGE_MODE=intune against the Entra/Graph/Intune emulators.

A real client (strongSwan) enrols with an emulator-issued challenge and Intune hears exactly what was issued;
forged, expired and mismatched challenges get nothing; each fault of Microsoft's test matrix fails closed.
"""

from __future__ import annotations

import hashlib
import os
import uuid

import pytest
from cryptography.hazmat.primitives import serialization

from scep.azure.intune.validator import serial_number_hex
from scep.core.protocol import PkiStatus
from scep.store import CertStatus
from scep.store.sqlite import SqliteStore
from scep.tools.client import ScepClient, make_csr, new_enrollment
from tests.emulators.intune import running_intune
from tests.interop import load_certificate, require_binary
from tests.interop.strongswan import enrol, fetch_ca_certificates, generate_key
from tests.serverproc import ScepServer, run_cli

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def intune_server():
    with running_intune() as bed, ScepServer(env=bed.environment(), workers=2) as server:
        yield bed, server


@pytest.fixture(autouse=True)
def fresh_emulator(intune_server):
    bed, _ = intune_server
    bed.reset()
    yield


def python_enrol(server, keys, subject_cn: str, challenge: str | None, dns: tuple[str, ...] = ()):
    client = ScepClient(server.scep_url)
    ra, _ = client.ca_certificates()
    key = keys.new()
    enrollment = new_enrollment(key, make_csr(key, subject_cn, challenge, dns))
    return client.enroll(enrollment, ra), enrollment


def test_real_client_enrols_and_intune_is_told_exactly_what_was_issued(intune_server, tmp_path):
    pki = require_binary("pki")
    bed, server = intune_server
    challenge = bed.intune.issue_challenge("CN=intune-device-1", ["dns:intune-device-1.example.com"])
    fetch_ca_certificates(pki, server, tmp_path)
    generate_key(pki, tmp_path / "key.pem")
    result = enrol(pki, server, (tmp_path / "ca.pem", tmp_path / "ra.pem"), tmp_path, "--in", tmp_path / "key.pem",
                   "--dn", "CN=intune-device-1", "--san", "intune-device-1.example.com", "--password", challenge)
    assert result.succeeded, result.describe(server)
    issued = load_certificate(tmp_path / "issued.pem")
    [validation] = bed.intune.validations
    assert validation.code == "Success"
    [notification] = bed.intune.notifications_of("success")
    body = notification.body.get("notification", notification.body)
    der = issued.public_bytes(serialization.Encoding.DER)
    assert notification.transaction_id == validation.transaction_id
    assert body["transactionId"] == validation.transaction_id
    assert body["certificateThumbprint"].upper() == hashlib.sha1(der).hexdigest().upper()
    assert body["certificateSerialNumber"] == serial_number_hex(issued)
    assert body["certificateExpirationDateUtc"].startswith(issued.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%S"))
    record = SqliteStore(server.data_dir / "scep.db").certificate_for_transaction(validation.transaction_id)
    assert record is not None and record.status is CertStatus.ISSUED and record.der == der
    assert challenge not in server.output()  # the challenge never reaches the logs


@pytest.mark.parametrize(
    "make_challenge,cn",
    [
        (lambda intune: "forged-" + os.urandom(24).hex(), "forged-device"),
        (lambda intune: intune.issue_challenge("CN=expired-device", ttl=-60), "expired-device"),
        (lambda intune: intune.issue_challenge("CN=someone-else"), "mismatched-device"),
        (lambda intune: None, "no-challenge-device"),
    ],
    ids=["forged", "expired", "mismatched-subject", "missing"],
)
def test_bad_challenges_get_nothing(intune_server, keys, make_challenge, cn):
    bed, server = intune_server
    result, enrollment = python_enrol(server, keys, cn, make_challenge(bed.intune))
    assert result.status is PkiStatus.FAILURE
    assert bed.intune.notifications_of("success") == []
    assert SqliteStore(server.data_dir / "scep.db").certificate_for_transaction(enrollment.transaction_id) is None


@pytest.mark.parametrize("fault", ["validate-500", "validate-timeout", "validate-unknown-code"])
def test_validation_faults_fail_closed(intune_server, keys, fault):
    bed, server = intune_server
    challenge = bed.intune.issue_challenge("CN=fault-device")
    if fault == "validate-500":
        bed.intune.inject("validate", status=500)
    elif fault == "validate-timeout":
        bed.intune.inject("validate", delay=20)
    else:
        bed.intune.inject("validate", code="SomethingNew" + uuid.uuid4().hex[:4])
    try:
        result, enrollment = python_enrol(server, keys, "fault-device", challenge)
    finally:
        bed.intune.clear_faults()
    assert result.status is PkiStatus.FAILURE
    assert SqliteStore(server.data_dir / "scep.db").certificate_for_transaction(enrollment.transaction_id) is None


def test_refused_credentials_fail_closed(intune_server, keys):
    """A fresh server whose Entra credentials are refused (revoked secret) issues nothing."""
    bed, _ = intune_server
    challenge = bed.intune.issue_challenge("CN=unauthenticated-device")
    bed.intune.refuse_credentials(bed.client_id)
    try:
        with ScepServer(env=bed.environment(), workers=1) as server:
            result, enrollment = python_enrol(server, keys, "unauthenticated-device", challenge)
            store = SqliteStore(server.data_dir / "scep.db")
            assert store.certificate_for_transaction(enrollment.transaction_id) is None
    finally:
        bed.entra.accept(bed.client_id)
    assert result.status is PkiStatus.FAILURE
    assert bed.intune.validations == []


def test_success_notification_failure_withholds_the_certificate(intune_server, keys):
    bed, server = intune_server
    challenge = bed.intune.issue_challenge("CN=withheld-device")
    bed.intune.inject("success", status=500)
    try:
        result, enrollment = python_enrol(server, keys, "withheld-device", challenge)
    finally:
        bed.intune.clear_faults()
    assert result.status is PkiStatus.FAILURE
    record = SqliteStore(server.data_dir / "scep.db").certificate_for_transaction(enrollment.transaction_id)
    assert record is not None and record.status is CertStatus.UNDELIVERED


def test_intune_check_command(intune_server, tmp_path):
    bed, _ = intune_server
    environment = {**bed.environment(), "SCEP_DATA_DIR": str(tmp_path)}
    working = run_cli(environment, "intune", "check")
    assert working.returncode == 0, working.stdout + working.stderr
    assert bed.client_id not in working.stderr and bed.secret not in working.stdout + working.stderr
    bed.intune.refuse_credentials(bed.client_id)
    try:
        refused = run_cli(environment, "intune", "check")
    finally:
        bed.entra.accept(bed.client_id)
    assert refused.returncode == 1
    assert bed.secret not in refused.stdout + refused.stderr
