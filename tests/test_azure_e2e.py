"""The Azure backends end to end: `scep serve` with Key Vault custody (emulator, real Azure SDK clients) and the
Table store (Azurite), a real SCEP client (strongSwan), the Key Vault operation budget, and a CA rollover:
`ca init` -> enrol -> `rollover` -> GetNextCACert -> `promote` -> enrol under the new CA."""

from __future__ import annotations

import urllib.request
import uuid
from pathlib import Path

import pytest
from cryptography import x509

from scep.azure.tables import TableStore
from scep.core import message as msg
from scep.core.protocol import PkiStatus
from scep.store import CertStatus
from scep.tools.client import DEFAULT_OPTIONS, ScepClient, build_request, make_csr, new_enrollment, read_reply
from tests.conftest import CHALLENGE
from tests.interop import load_certificate, require_binary
from tests.interop.strongswan import enrol, fetch_ca_certificates, generate_key
from tests.serverproc import ScepServer, run_cli, wait_for
from tests.vault_helpers import emulated_vault, wait_for_first_crl

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cloud(azurite):
    settings = {
        "SCEP_TABLES_CONNECTION_STRING": azurite.connection_string,
        "SCEP_TABLE_PREFIX": "e2e" + uuid.uuid4().hex[:8],
        "SCEP_CHALLENGE": CHALLENGE,
        "KEY_VAULT_REFRESH_SECONDS": "2",
    }
    with emulated_vault(**settings) as (vault, environment):
        yield vault, environment


def scep_cli(environment: dict[str, str], *arguments: str) -> str:
    completed = run_cli(environment, *arguments)
    assert completed.returncode == 0, f"scep {' '.join(arguments)}:\n{completed.stdout}\n{completed.stderr}"
    return completed.stdout


def test_key_vault_and_tables_end_to_end(cloud, keys, tmp_path: Path):
    pki = require_binary("pki")
    vault, environment = cloud
    scep_cli(environment, "ca", "init", "--subject", "CN=Vault Root CA 1,O=Example")
    shown = scep_cli(environment, "ca", "show")
    assert "[ca] CN=Vault Root CA 1,O=Example" in shown and "[ra]" in shown and "software" in shown

    with ScepServer(env=environment, workers=1) as server:
        client = ScepClient(server.scep_url)
        ra, ca = client.ca_certificates()
        assert ca.subject.rfc4514_string() == "CN=Vault Root CA 1,O=Example"
        twin = wait_for(lambda: _encryption_twin(server, ra, ca), "the RA's encryption-only twin in GetCACert")

        # a real client enrols; its certificate is in the Table store
        fetch_ca_certificates(pki, server, tmp_path)
        generate_key(pki, tmp_path / "key.pem")
        first = enrol(pki, server, (tmp_path / "ca.pem", tmp_path / "ra.pem"), tmp_path,
                      "--in", tmp_path / "key.pem", "--dn", "CN=vault-device-1", "--password", CHALLENGE)
        assert first.succeeded, first.describe(server)
        issued = load_certificate(tmp_path / "issued.pem")
        issued.verify_directly_issued_by(ca)
        store = TableStore.from_connection_string(environment["SCEP_TABLES_CONNECTION_STRING"],
                                                  table_prefix=environment["SCEP_TABLE_PREFIX"])
        record = store.certificate_by_serial(issued.serial_number)
        assert record is not None and record.status is CertStatus.ISSUED

        # a warm enrollment costs exactly three Key Vault key operations: unwrapKey, sign, sign; no other call
        wait_for_first_crl(server, ca)
        vault.reset_counts()
        key = keys.new()
        result = client.enroll(new_enrollment(key, make_csr(key, "vault-device-2", CHALLENGE)), ra)
        assert result.status is PkiStatus.SUCCESS
        assert vault.operations["keys.unwrapkey"] == 1 and vault.operations["keys.decrypt"] == 0
        assert vault.operations["keys.sign"] == 2
        assert vault.operation_count("keys.get", "certificates.get", "challenge") == 0

        # a client written for NDES encrypts to the encryption-only twin: the RA's key unwraps it (the same key)
        ndes_key = keys.new()
        ndes = new_enrollment(ndes_key, make_csr(ndes_key, "vault-ndes-device", CHALLENGE))
        ndes_reply = client.pki_operation(build_request(ndes, twin, DEFAULT_OPTIONS))
        assert read_reply(ndes_reply, ndes, ra).status is PkiStatus.SUCCESS

        # rollover: the next CA is published, signed by the current one
        scep_cli(environment, "ca", "rollover", "--subject", "CN=Vault Root CA 2,O=Example")
        wait_for(lambda: "GetNextCACert" in client.capabilities(), "GetNextCACert in the capabilities")
        (next_ca,) = client.next_ca_certificates(ca)
        assert next_ca.subject.rfc4514_string() == "CN=Vault Root CA 2,O=Example"

        # promote: the next CA issues from now on, and devices of the old CA can still renew
        scep_cli(environment, "ca", "promote")
        new_ra, new_ca = wait_for(lambda: _if_ca(client, next_ca), "the promoted CA in GetCACert")
        new_ra.verify_directly_issued_by(new_ca)
        wait_for(lambda: _encryption_twin(server, new_ra, new_ca), "the new RA's encryption-only twin")
        (tmp_path / "rolled").mkdir()
        fetch_ca_certificates(pki, server, tmp_path / "rolled")
        generate_key(pki, tmp_path / "rolled" / "key.pem")
        second = enrol(pki, server, (tmp_path / "rolled" / "ca.pem", tmp_path / "rolled" / "ra.pem"),
                       tmp_path / "rolled", "--in", tmp_path / "rolled" / "key.pem", "--dn", "CN=vault-device-3",
                       "--password", CHALLENGE)
        assert second.succeeded, second.describe(server)
        load_certificate(tmp_path / "rolled" / "issued.pem").verify_directly_issued_by(next_ca)

        renewal_key = keys.new()
        renewal = new_enrollment(renewal_key, make_csr(renewal_key, "vault-device-2"),
                                 renew_with=(key, result.certificate))
        renewed = client.enroll(renewal, new_ra)
        assert renewed.status is PkiStatus.SUCCESS
        renewed.certificate.verify_directly_issued_by(next_ca)


def _encryption_twin(server: ScepServer, ra: x509.Certificate, ca: x509.Certificate) -> x509.Certificate | None:
    """The third certificate of GetCACert, checked to be ra's encryption-only twin; None while it is not served."""
    with urllib.request.urlopen(f"{server.scep_url}?operation=GetCACert", timeout=10) as response:
        others = [c for c in msg.read_certs_only(response.read()) if c not in (ra, ca)]
    if not others:
        return None
    (twin,) = others
    usage = twin.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_encipherment and not usage.digital_signature
    assert twin.public_key() == ra.public_key()
    twin.verify_directly_issued_by(ca)
    return twin


def _if_ca(client: ScepClient, wanted: x509.Certificate):
    ra, ca = client.ca_certificates()
    return (ra, ca) if ca == wanted else None
