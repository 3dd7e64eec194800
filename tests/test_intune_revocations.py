"""Intune's revocation requests against the Entra ID and Intune emulators, on SQLite and on Azure Tables (Azurite):
download, revoke, report back with the right codes, faults that lose nothing and revoke nothing twice, two
cycles at once, and `scep intune revocations` from the command line."""

from __future__ import annotations

import os
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from scep.azure.intune.client import IntuneClient
from scep.azure.intune.credential import SecretSource, build_intune_credential
from scep.azure.intune.revocation import (
    CYCLE_LEASE,
    CYCLE_TRANSACTION,
    INTUNE_REASON,
    CycleReport,
    parse_serial,
    run_cycle,
)
from scep.azure.intune.validator import serial_number_hex
from scep.config import load_settings
from scep.core.ca import CaOptions, init_root
from scep.core.protocol import PkiStatus
from scep.core.revocation import publish_now, signing_generations
from scep.keys import KeySpec
from scep.keys.local import LocalHome
from scep.store import CertStatus, RevocationReason, Store, serial_hex
from scep.store.sqlite import SqliteStore
from scep.tools.client import ScepClient, make_csr, new_enrollment
from tests.emulators.intune import IntuneTestbed
from tests.serverproc import ScepServer, run_cli
from tests.test_revocation import enroll, open_store  # noqa: F401 - open_store: SQLite and Azurite
from tests.test_revocation_http import openssl_ocsp

CA_SUBJECT = "CN=Intune Revocation CA,O=Contoso"
DOWNLOAD = "/PkiConnectorFEService/CertificateAuthorityRequests/downloadRevocationRequests"
UPLOAD = "/PkiConnectorFEService/CertificateAuthorityRequests/uploadRevocationResults"


@pytest.fixture(scope="module")
def ca_home(tmp_path_factory: pytest.TempPathFactory) -> LocalHome:
    home = LocalHome(tmp_path_factory.mktemp("ca"))
    init_root(home, CaOptions(subject=CA_SUBJECT, spec=KeySpec("EC", curve="P-256")))
    return home


@pytest.fixture
def store(open_store) -> Store:  # noqa: F811 - the imported fixture
    return open_store()


def client_for(bed: IntuneTestbed) -> IntuneClient:
    settings = replace(load_settings(bed.environment()).intune.client, read_timeout=5.0)
    credential = build_intune_credential(settings, SecretSource.fixed(bed.secret))
    return IntuneClient(settings, credential, sleep=lambda _: None)


def publisher(store: Store, home: LocalHome):
    return lambda: publish_now(store, home)


def cycle(bed: IntuneTestbed, store: Store, home: LocalHome) -> CycleReport:
    return run_cycle(client_for(bed), store, publisher(store, home))


def cycle_with_fault(bed: IntuneTestbed, store: Store, home: LocalHome, fault: dict) -> CycleReport:
    """One cycle while the emulator injects fault, which is cleared afterwards."""
    bed.intune.inject(**fault)
    try:
        return cycle(bed, store, home)
    finally:
        bed.intune.clear_faults()


def issue(store: Store, home: LocalHome, name: str = "device"):
    return enroll(store, home.keys().ca, name)


def queue(bed: IntuneTestbed, certificate, issuer: str | None = CA_SUBJECT) -> str:
    return bed.intune.queue_revocation(serial_number_hex(certificate), issuer, "SCEP\\Intune Revocation CA")


def results_by_context(bed: IntuneTestbed) -> dict[str, dict]:
    return {result["requestContext"]: result for result in bed.intune.revocation_results}


def test_revokes_reports_and_publishes_the_crl(testbed: IntuneTestbed, ca_home: LocalHome, store: Store) -> None:
    certificate = issue(store, ca_home)
    context = queue(testbed, certificate)
    report = cycle(testbed, store, ca_home)
    assert report.ran and report.reported and report.revoked == (certificate.serial_number,)
    assert report.crl_published is True and report.problems == ()
    assert results_by_context(testbed) == {
        context: {"requestContext": context, "succeeded": True, "errorCode": "0", "errorMessage": ""}
    }
    record = store.certificate_by_serial(certificate.serial_number)
    assert record is not None and record.status is CertStatus.REVOKED and record.revocation_reason is INTUNE_REASON
    [generation] = signing_generations(ca_home)
    crl = store.latest_crl(record.issuer_sha256)
    assert crl is not None and crl.revision == store.revocation_revision(record.issuer_sha256)
    assert generation.certificate.issuer.rfc4514_string() == CA_SUBJECT
    assert store.unreported_request_results(10) == ()
    [download] = testbed.intune.requests_matching("POST", DOWNLOAD)
    assert download.json == {"downloadParameters": {"maxRequests": 500, "issuerName": None}}
    headers = {name.lower(): value for name, value in download.headers.items()}
    assert headers["api-version"] == "5019-05-05" and headers["useragent"].startswith("scep")
    [upload] = testbed.intune.requests_matching("POST", UPLOAD)
    assert upload.json == {"results": [{"requestContext": context, "succeeded": True, "errorCode": "0",
                                        "errorMessage": ""}]}


def test_unknown_serial_other_issuer_and_garbage_get_their_codes(
    testbed: IntuneTestbed, ca_home: LocalHome, store: Store
) -> None:
    certificate = issue(store, ca_home)
    unknown = testbed.intune.queue_revocation("7F" + os.urandom(15).hex(), CA_SUBJECT)
    elsewhere = queue(testbed, certificate, issuer="CN=Someone Else CA")
    garbage = testbed.intune.queue_revocation("not-a-serial", CA_SUBJECT)
    report = cycle(testbed, store, ca_home)
    assert report.reported and report.revoked == () and report.crl_published is None
    codes = {context: result["errorCode"] for context, result in results_by_context(testbed).items()}
    assert codes == {unknown: "4004", elsewhere: "4004", garbage: "4002"}
    assert not any(result["succeeded"] for result in testbed.intune.revocation_results)
    assert store.certificate_by_serial(certificate.serial_number).status is CertStatus.ISSUED


def test_already_revoked_is_a_conflict_and_keeps_the_first_revocation(
    testbed: IntuneTestbed, ca_home: LocalHome, store: Store
) -> None:
    certificate = issue(store, ca_home)
    first = store.revoke(certificate.serial_number, RevocationReason.KEY_COMPROMISE, certificate.not_valid_before_utc)
    context = queue(testbed, certificate)
    report = cycle(testbed, store, ca_home)
    assert report.revoked == ()
    result = results_by_context(testbed)[context]
    assert (result["succeeded"], result["errorCode"]) == (False, "4005")
    record = store.certificate_by_serial(certificate.serial_number)
    assert record.revocation_reason is RevocationReason.KEY_COMPROMISE
    assert record.revoked_at == first.revocation.revoked_at


@pytest.mark.parametrize(
    "fault",
    [
        {"endpoint": "upload", "status": 500},
        {"endpoint": "upload", "reply": {"value": False}},
    ],
    ids=["upload-500", "upload-value-false"],
)
def test_a_failed_upload_is_reported_next_cycle_without_revoking_again(
    testbed: IntuneTestbed, ca_home: LocalHome, store: Store, fault: dict
) -> None:
    certificate = issue(store, ca_home)
    context = queue(testbed, certificate)
    failed = cycle_with_fault(testbed, store, ca_home, fault)
    assert failed.revoked == (certificate.serial_number,) and not failed.reported
    assert [result.context for result in store.unreported_request_results(10)] == [context]
    assert testbed.intune.revocation_results == []
    revoked_at = store.certificate_by_serial(certificate.serial_number).revoked_at
    retried = cycle(testbed, store, ca_home)
    assert retried.reported and retried.revoked == () and retried.downloaded == 0
    assert results_by_context(testbed)[context]["errorCode"] == "0"  # the recorded success, not a conflict
    assert store.certificate_by_serial(certificate.serial_number).revoked_at == revoked_at
    assert store.unreported_request_results(10) == ()


def test_a_request_sent_again_before_its_report_gets_the_recorded_answer(
    testbed: IntuneTestbed, ca_home: LocalHome, store: Store
) -> None:
    certificate = issue(store, ca_home)
    context = queue(testbed, certificate)
    cycle_with_fault(testbed, store, ca_home, {"endpoint": "upload", "status": 500})
    testbed.intune.requeue_revocation(context)
    report = cycle(testbed, store, ca_home)
    assert report.downloaded == 1 and report.revoked == ()
    assert [(r["requestContext"], r["errorCode"]) for r in testbed.intune.revocation_results] == [(context, "0")]


def test_download_failure_and_refused_token_lose_nothing(
    testbed: IntuneTestbed, ca_home: LocalHome, store: Store
) -> None:
    certificate = issue(store, ca_home)
    context = queue(testbed, certificate)
    report = cycle_with_fault(testbed, store, ca_home, {"endpoint": "download", "status": 500})
    assert report.ran and report.downloaded == 0 and report.problems and "download failed" in report.problems[0]
    testbed.intune.refuse_credentials(testbed.client_id)
    report = cycle(testbed, store, ca_home)
    assert report.downloaded == 0 and report.problems
    assert [item["requestContext"] for item in testbed.intune.revocations_pending] == [context]
    assert store.certificate_by_serial(certificate.serial_number).status is CertStatus.ISSUED
    testbed.entra.accept(testbed.client_id)
    report = cycle(testbed, store, ca_home)
    assert report.revoked == (certificate.serial_number,) and report.reported
    assert testbed.intune.revocations_pending == []


def test_token_refused_at_upload_keeps_the_results(testbed: IntuneTestbed, ca_home: LocalHome, store: Store) -> None:
    certificate = issue(store, ca_home)
    context = queue(testbed, certificate)
    client = client_for(testbed)
    client.download_revocation_requests(500, None, "test")  # the token is cached now: refuse the next one
    testbed.intune.requeue_revocation(context)
    testbed.intune.inject("upload", status=401)
    report = run_cycle(client, store, publisher(store, ca_home))
    assert report.revoked == (certificate.serial_number,) and not report.reported
    assert store.unreported_request_results(10)[0].context == context


def test_a_retryable_answer_is_asked_again_and_then_revoked(
    testbed: IntuneTestbed, ca_home: LocalHome, store: Store
) -> None:
    certificate = issue(store, ca_home)
    context = queue(testbed, certificate)
    broken = _FailingRevocations(store)
    report = cycle(testbed, broken, ca_home)
    assert report.reported and report.revoked == ()
    assert results_by_context(testbed)[context]["errorCode"] == "4101"
    report = cycle(testbed, store, ca_home)
    assert report.revoked == (certificate.serial_number,)
    assert [r["errorCode"] for r in testbed.intune.revocation_results] == ["4101", "0"]


class _FailingRevocations:
    """The store, except that revoking fails as an unreachable store does."""

    def __init__(self, inner: Store) -> None:
        self._inner = inner

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def revoke(self, *arguments, **keywords):
        from scep.store import StoreError

        raise StoreError("the store is unreachable")


def test_two_cycles_at_once_revoke_each_certificate_once(
    testbed: IntuneTestbed, ca_home: LocalHome, open_store  # noqa: F811 - the imported fixture
) -> None:
    setup = open_store()
    certificates = [issue(setup, ca_home, f"device-{index}") for index in range(6)]
    contexts = [queue(testbed, certificate) for certificate in certificates]
    testbed.intune.inject("download", delay=0.5, times=1)  # the first cycle holds its claim a while
    start = threading.Barrier(2)

    def one_cycle(_: int) -> CycleReport:
        store = open_store()
        start.wait()
        return cycle(testbed, store, ca_home)

    with ThreadPoolExecutor(max_workers=2) as pool:
        reports = list(pool.map(one_cycle, range(2)))
    assert sorted(report.ran for report in reports) == [False, True]
    revoked = [serial for report in reports for serial in report.revoked]
    assert sorted(revoked) == sorted(certificate.serial_number for certificate in certificates)
    assert Counter(r["requestContext"] for r in testbed.intune.revocation_results) == Counter(contexts)
    assert setup.transaction_state(CYCLE_TRANSACTION).value == "failed"  # the claim is released
    assert cycle(testbed, open_store(), ca_home).ran


def test_a_crashed_cycle_blocks_the_next_for_at_most_its_lease(
    testbed: IntuneTestbed, ca_home: LocalHome, store: Store
) -> None:
    store.claim(CYCLE_TRANSACTION, "scep-intune-revocations", CYCLE_LEASE)  # taken and never released
    assert not cycle(testbed, store, ca_home).ran
    assert CYCLE_LEASE.total_seconds() <= 600


def test_serial_numbers_as_intune_sends_them() -> None:
    assert parse_serial("00FF") == 255
    assert parse_serial("0a:1b") == 0x0A1B
    assert parse_serial("") is None and parse_serial("00") is None and parse_serial("xyz") is None
    assert parse_serial("1" * 65) is None


def test_cli_runs_one_cycle_and_prints_what_it_did(testbed: IntuneTestbed, tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {**testbed.environment(), "SCEP_DATA_DIR": str(data)}
    init = run_cli(env, "ca", "init", "--subject", CA_SUBJECT, "--key-type", "EC")
    assert init.returncode == 0, init.stderr
    store, home = SqliteStore(data / "scep.db"), LocalHome(data)
    certificate = issue(store, home)
    unknown = testbed.intune.queue_revocation("7E" + os.urandom(15).hex(), None)
    context = queue(testbed, certificate)
    result = run_cli(env, "intune", "revocations")
    assert result.returncode == 0, result.stderr
    assert f"{serial_hex(certificate.serial_number)} revoked" in result.stdout
    assert "4004" in result.stdout and "reported to Intune: yes" in result.stdout
    assert results_by_context(testbed)[context]["errorCode"] == "0"
    assert results_by_context(testbed)[unknown]["errorCode"] == "4004"
    assert store.certificate_by_serial(certificate.serial_number).status is CertStatus.REVOKED
    static = run_cli({**env, "SCEP_CHALLENGE_MODE": "static"}, "intune", "revocations")
    assert static.returncode == 2 and "SCEP_CHALLENGE_MODE" in static.stderr


@pytest.mark.e2e
def test_a_device_enrolled_through_intune_is_revoked_at_intunes_request(testbed: IntuneTestbed, keys, tmp_path: Path):
    """`scep serve` in Intune mode issues a certificate; Intune asks for its revocation; one cycle revokes it and
    openssl ocsp, asking the server, hears `revoked`."""
    with ScepServer(env=testbed.environment(), workers=1) as server:
        challenge = testbed.intune.issue_challenge("CN=retired-device", ["dns:retired-device.example.com"])
        client = ScepClient(server.scep_url)
        ra, _ = client.ca_certificates()
        key = keys.new()
        enrollment = new_enrollment(key, make_csr(key, "retired-device", challenge, ("retired-device.example.com",)))
        result = client.enroll(enrollment, ra)
        assert result.status is PkiStatus.SUCCESS and result.certificate is not None
        [notification] = testbed.intune.notifications_of("success")
        reported = notification.body["certificateSerialNumber"]
        context = testbed.intune.queue_revocation(reported, notification.body["issuingCertificateAuthority"])
        device = tmp_path / "device.pem"
        device.write_bytes(result.certificate.public_bytes(serialization.Encoding.PEM))
        ocsp_url = f"{server.url}/api/ocsp"
        assert f"{device}: good" in openssl_ocsp(server.ca_pem_path, device, ocsp_url)

        done = run_cli(server.environment(), "intune", "revocations")
        assert done.returncode == 0, done.stderr
        assert results_by_context(testbed)[context]["errorCode"] == "0"
        answer = openssl_ocsp(server.ca_pem_path, device, ocsp_url)
        assert f"{device}: revoked" in answer and "Reason: cessationOfOperation" in answer, answer
        record = SqliteStore(server.data_dir / "scep.db").certificate_by_serial(result.certificate.serial_number)
        assert record.status is CertStatus.REVOKED
