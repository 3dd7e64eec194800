"""`scep serve` with Key Vault custody (emulator) when the vault throttles or goes away.

Key Vault answers throttled key operations with 429 and no Retry-After, which azure-core never retries for a
POST; the custody retries sign and unwrapKey itself within one time budget per PKIOperation. When the vault is
unreachable the device gets a clean 503 (no signature is possible without the RA key), and the app recovers by
itself when the vault comes back.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from scep.core.protocol import PkiStatus
from scep.store.sqlite import SqliteStore
from scep.tools.client import Result, ScepClient, ScepClientError, make_csr, new_enrollment
from tests.conftest import CHALLENGE
from tests.emulators.keyvault import KeyVaultEmulator
from tests.serverproc import ScepServer
from tests.vault_helpers import emulated_vault, init_ca, unique_certificate_names, wait_for_first_crl

pytestmark = pytest.mark.e2e

ENROLLMENTS = 100
CONCURRENCY = 4
THROTTLE_EVERY = 4
BUDGET_SECONDS = 3


@pytest.fixture(scope="module")
def vault_and_environment() -> Iterator[tuple[KeyVaultEmulator, dict[str, str]]]:
    budget = str(BUDGET_SECONDS)
    with emulated_vault(**unique_certificate_names(), SCEP_CHALLENGE=CHALLENGE, SCEP_KEY_BUDGET_SECONDS=budget) as (
        vault,
        environment,
    ):
        init_ca(environment, "CN=Throttled Vault Root")
        yield vault, environment


def _enrol(client: ScepClient, ra, keys, name: str) -> tuple[str, Result]:
    key = keys.new()
    enrollment = new_enrollment(key, make_csr(key, name, CHALLENGE))
    return enrollment.transaction_id, client.enroll(enrollment, ra)


def test_100_enrollments_at_concurrency_4_with_every_4th_key_operation_throttled(vault_and_environment, keys):
    vault, environment = vault_and_environment
    with ScepServer(env=environment, workers=2) as server:
        client = ScepClient(server.scep_url)
        ra, ca = client.ca_certificates()
        wait_for_first_crl(server, ca)
        vault.reset_counts()
        vault.throttle_key_operations(THROTTLE_EVERY)
        try:
            with ThreadPoolExecutor(CONCURRENCY) as pool:
                outcomes = list(pool.map(lambda i: _enrol(client, ra, keys, f"throttled-{i}"), range(ENROLLMENTS)))
        finally:
            vault.throttle_key_operations(0)
        output = server.output()
        store = SqliteStore(server.data_dir / "scep.db")
        recorded = {tid: store.certificate_for_transaction(tid) for tid, _ in outcomes}

    assert [result.status for _, result in outcomes] == [PkiStatus.SUCCESS] * ENROLLMENTS
    serials = {result.certificate.serial_number for _, result in outcomes}
    assert len(serials) == ENROLLMENTS
    for transaction_id, result in outcomes:  # one certificate per transaction: the one the device received
        record = recorded[transaction_id]
        assert record is not None and record.serial == result.certificate.serial_number
    key_operations = vault.operation_count("keys.sign", "keys.unwrapkey")
    assert key_operations == 3 * ENROLLMENTS  # unwrapKey, sign, sign: each once, whatever was throttled
    assert vault.operations["throttled"] >= 3 * ENROLLMENTS // THROTTLE_EVERY
    assert "Traceback" not in output and " 500 " not in output


def test_vault_outage_gives_503_and_the_app_recovers_when_the_vault_returns(vault_and_environment, keys):
    vault, environment = vault_and_environment
    with ScepServer(env=environment, workers=1) as server:
        client = ScepClient(server.scep_url)
        ra, _ = client.ca_certificates()
        assert _enrol(client, ra, keys, "before-the-outage")[1].status is PkiStatus.SUCCESS
        port = vault.port
        vault.stop()
        try:
            with pytest.raises(ScepClientError, match="answered 503"):
                _enrol(client, ra, keys, "during-the-outage")
        finally:
            vault.start()
        assert vault.port == port
        assert _enrol(client, ra, keys, "after-the-outage")[1].status is PkiStatus.SUCCESS
        assert "Traceback" not in server.output()
