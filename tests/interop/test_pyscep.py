"""Clients written for Microsoft NDES: PyPI's PyScep 0.0.14 and scepreq 0.1.1 (a fork of PyScep for AD CS).

Both pick the request's recipient by key usage (`CACertificates.__recipient` in their responses.py): the first
non-CA certificate with keyEncipherment and without digitalSignature, nonRepudiation and dataEncipherment, else
the CA; and they verify the CertRep with the first non-CA certificate with digitalSignature. So they enrol only
because GetCACert carries the RA's encryption-only twin; without it they encrypt to the CA and are refused.

Patches, both for the clients' own bugs and neither touching how they choose the recipient:
- oscrypto 1.3.0 (their dependency, the last release) reads the OpenSSL version with the pattern `\\d\\.\\d\\.\\d`,
  which finds no match in "OpenSSL 3.0.19" and makes every import fail ("Error detecting the version of
  libcrypto"); oscrypto's development branch widened the pattern to `\\d+`, which is what the import below does.
- PyScep's wheel installs its package under the top-level name `scep`, the name of this project's package, so it
  cannot live in the project's environment (`scep` would import PyScep): it is installed into a directory of its
  own and loaded under the name `pyscep` (its modules import each other relatively).
- scepreq's command line cannot start: it defines `--url` twice (`-u/--url`, the server, and `--url`, a SAN URL)
  and argparse refuses the second; the tests drive its library the way its main() does.
- Both libraries rewrite asn1crypto's CMSAttribute class at import, each with its own classes, and break each
  other in one process: every client run gets a fresh interpreter (`in_fresh_process`).
"""

from __future__ import annotations

import importlib
import importlib.util
import multiprocessing
import re
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

import pytest
from cryptography import x509

from scep.core.ca import CaOptions, init_root
from scep.keys.local import LocalHome

from . import CHALLENGE, ScepServer, assert_end_entity_from, load_certificate

pytestmark = pytest.mark.interop

PYSCEP_REQUIREMENTS = ("PyScep==0.0.14", "six==1.17.0")  # six: PyScep's undeclared dependency
OSCRYPTO_VERSION_PATTERN = "\\b(\\d\\.\\d\\.\\d[a-z]*)\\b"


def in_fresh_process(function: Callable[..., Any], *arguments: Any) -> Any:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as executor:
        return executor.submit(function, *arguments).result(timeout=120)


def _import_oscrypto() -> None:
    real_search = re.search

    def search(pattern, string, flags=0):
        if pattern == OSCRYPTO_VERSION_PATTERN:
            pattern = "\\b(\\d+\\.\\d+\\.\\d+[a-z]*)\\b"
        return real_search(pattern, string, flags)

    with mock.patch("re.search", search):
        importlib.import_module("oscrypto.asymmetric")


def _load_pyscep(target: str) -> ModuleType:
    """PyScep's `scep.Client` package, loaded as `pyscep.Client` from the directory it was installed in."""
    _import_oscrypto()
    sys.path.insert(0, target)  # six
    spec = importlib.util.spec_from_file_location(
        "pyscep", Path(target) / "scep" / "__init__.py", submodule_search_locations=[str(Path(target) / "scep")]
    )
    assert spec is not None and spec.loader is not None
    sys.modules["pyscep"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["pyscep"])
    return importlib.import_module("pyscep.Client")


def pyscep_choice(target: str, url: str) -> tuple[int, int, int]:
    """Serial numbers of the certificates PyScep takes as recipient, signer and issuer from GetCACert."""
    chosen = _load_pyscep(target).Client(url).get_ca_certs()
    return chosen.recipient.serial_number, chosen.signer.serial_number, chosen.issuer.serial_number


def pyscep_enrol(target: str, url: str, cn: str, challenge: str) -> tuple[str, bytes | None]:
    """PyScep's README enrolment: a self-signed identity and a CSR for the same key; (status, certificate DER)."""
    client = _load_pyscep(target)
    usage = {"digital_signature", "key_encipherment"}
    identity, key = client.SigningRequest.generate_self_signed(cn=cn, key_usage=usage)
    csr, _ = client.SigningRequest.generate_csr(cn=cn, key_usage=usage, password=challenge, private_key=key)
    result = client.Client(url).enrol(csr=csr, identity=identity, identity_private_key=key)
    return result.status.name, result.certificates[0].to_der() if result.status.name == "SUCCESS" else None


def scepreq_enrol(url: str, cn: str, challenge: str) -> tuple[str, bytes | None]:
    """What scepreq's main() does, through its library (its command line cannot start)."""
    _import_oscrypto()
    from scepreq.client import Client
    from scepreq.main import parse_extended_key_usage, parse_key_usage
    from scepreq.signingrequest import SigningRequest

    identity, identity_key = SigningRequest.generate_self_signed(
        cn="5d635756-72a8-4945-8b32-37e85681c964", key_usage={"digital_signature", "key_encipherment"}
    )
    usage = parse_key_usage("digital_signature,key_encipherment")
    key = SigningRequest.generate_pair(size=2048)
    csr, key = SigningRequest.generate_csr(f"CN={cn}", usage, parse_extended_key_usage("client_auth"), challenge, key)
    result = Client(url).enrol(csr=csr, identity=identity, identity_private_key=identity_key)
    return result.status.name, result.certificates[0].to_der() if result.status.name == "SUCCESS" else None


@pytest.fixture(scope="module")
def pyscep(tmp_path_factory) -> str:
    """The directory PyScep is installed in, outside the project's environment."""
    target = tmp_path_factory.mktemp("pyscep")
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", target, *PYSCEP_REQUIREMENTS],
        capture_output=True,
        text=True,
    )
    if installed.returncode != 0:
        pytest.fail(f"PyScep could not be installed from PyPI: {installed.stderr.strip()[-500:]}")
    return str(target)


@pytest.fixture(scope="module")
def server(start_server) -> ScepServer:
    return start_server()


def assert_issued(status: str, der: bytes | None, server: ScepServer, cn: str) -> None:
    assert status == "SUCCESS" and der is not None, server.output_tail()
    assert_end_entity_from(x509.load_der_x509_certificate(der), load_certificate(server.ca_pem_path), cn=cn)


def test_pyscep_picks_the_encryption_certificate_and_the_signing_ra(pyscep, server):
    recipient, signer, issuer = in_fresh_process(pyscep_choice, pyscep, server.scep_url)
    assert recipient == load_certificate(server.ra_pem_path.with_name("ra.encryption.pem")).serial_number
    assert signer == load_certificate(server.ra_pem_path).serial_number
    assert issuer == load_certificate(server.ca_pem_path).serial_number


def test_pyscep_enrols(pyscep, server):
    assert_issued(*in_fresh_process(pyscep_enrol, pyscep, server.scep_url, "pyscep-device", CHALLENGE),
                  server, "pyscep-device")


def test_pyscep_with_a_wrong_challenge_gets_a_failure(pyscep, server):
    status, _ = in_fresh_process(pyscep_enrol, pyscep, server.scep_url, "pyscep-wrong", "not-the-challenge")
    assert status == "FAILURE"


def test_pyscep_against_an_ra_without_encryption_certificate_is_refused_and_logged(pyscep, tmp_path):
    """A data directory from before encryption certificates: PyScep encrypts to the CA, the server says why not."""
    init_root(LocalHome(tmp_path), CaOptions())
    (tmp_path / "ra.encryption.pem").unlink()
    with ScepServer(env={"SCEP_CHALLENGE": CHALLENGE, "SCEP_LOG_LEVEL": "info"}, data_dir=tmp_path) as legacy:
        status, _ = in_fresh_process(pyscep_enrol, pyscep, legacy.scep_url, "pyscep-legacy", CHALLENGE)
        assert status == "FAILURE"
        assert "encrypted to a certificate that is not ours" in legacy.output()


def test_scepreq_enrols(server):
    assert_issued(*in_fresh_process(scepreq_enrol, server.scep_url, "scepreq-device", CHALLENGE),
                  server, "scepreq-device")


def test_scepreq_with_a_wrong_challenge_gets_a_failure(server):
    status, _ = in_fresh_process(scepreq_enrol, server.scep_url, "scepreq-wrong", "not-the-challenge")
    assert status == "FAILURE"
