"""RA self-renewal on Key Vault custody (emulator, real Azure SDK clients) and the Table store (Azurite): two
`scep serve` instances start at once with an RA close to its end; exactly one renews it, both serve the new RA."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

from scep.tools.client import ScepClient
from tests.serverproc import ScepServer, wait_for
from tests.test_azure_e2e import cloud, scep_cli  # noqa: F401  (cloud is a fixture)

pytestmark = pytest.mark.e2e


def test_two_instances_on_key_vault_renew_a_due_ra_once(cloud):  # noqa: F811
    _, environment = cloud
    scep_cli(environment, "ca", "init", "--subject", "CN=Vault Renewal CA,O=Example")
    scep_cli(environment, "ca", "ra", "renew", "--days", "5")
    instances = [ScepServer(env=environment, workers=1) for _ in range(2)]
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(ScepServer.start, instances))
        fresh = [wait_for(lambda s=server: _long_lived_ra(s), "the renewed RA", timeout=40) for server in instances]
        assert fresh[0].serial_number == fresh[1].serial_number
        renewals = sum(server.stderr.count("RA renewed") for server in instances)
        assert renewals == 1, "\n".join(server.output_tail() for server in instances)
    finally:
        for server in instances:
            server.close()


def _long_lived_ra(server: ScepServer):
    ra, _ = ScepClient(server.scep_url).ca_certificates()
    return ra if ra.not_valid_after_utc - ra.not_valid_before_utc > timedelta(days=600) else None
