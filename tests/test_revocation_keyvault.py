"""Revocation with Key Vault custody (real SDK clients against the Key Vault emulator): the delegated OCSP signer
lives in its own Key Vault certificate, retired CA versions still sign their CRLs."""

from __future__ import annotations

import uuid
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

from scep.core.ca import CaOptions, init_root, issue_ocsp_signer, promote, rollover
from scep.core.issuer import ca_id
from scep.core.ocsp import OcspResponder, home_authorities
from scep.core.revocation import publish_due, signing_generations
from scep.keys import KeySpec, Slot
from scep.store import RevocationReason
from scep.store.sqlite import SqliteStore
from tests.test_keyvault import azure_environment, entra, make_home, no_leftover_faults, vault  # noqa: F401
from tests.test_revocation import enroll

EC_P256 = KeySpec("EC", curve="P-256")


def test_ocsp_signer_and_retired_ca_keys_in_key_vault(vault, tmp_path: Path) -> None:  # noqa: F811
    home = make_home(vault)
    home.ocsp_name = f"ocsp-{uuid.uuid4().hex[:8]}"
    init_root(home, CaOptions(subject="CN=Vault Revocation CA", spec=EC_P256))
    born = home.ocsp_signer()  # a new CA comes with its delegated OCSP signer
    assert born is not None and born.certificate.issuer == home.keys().ca.certificate.subject
    issued = issue_ocsp_signer(home)  # renewed: a new key and certificate
    signer = home.ocsp_signer()
    assert signer is not None and signer.certificate == issued != born.certificate
    assert list(issued.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.OCSP_SIGNING
    ]
    assert Slot.OCSP in {info.slot for info in home.inventory()}

    store = SqliteStore(tmp_path / "scep.db")
    first_ca = home.keys().ca
    certificate = enroll(store, first_ca, "vault-device")
    request = ocsp.OCSPRequestBuilder().add_certificate(certificate, first_ca.certificate, hashes.SHA1()).build()
    responder = OcspResponder(store, lambda: home_authorities(home))
    answer = ocsp.load_der_ocsp_response(responder.respond(request.public_bytes(serialization.Encoding.DER)).der)
    assert answer.certificate_status is ocsp.OCSPCertStatus.GOOD
    assert answer.certificates == [issued]
    issued.public_key().verify(answer.signature, answer.tbs_response_bytes, ec.ECDSA(answer.signature_hash_algorithm))

    store.revoke(certificate.serial_number, RevocationReason.KEY_COMPROMISE, certificate.not_valid_before_utc)
    rollover(home, CaOptions(subject="CN=Vault Revocation CA 2", spec=EC_P256))
    promote(home)
    renewed = home.ocsp_signer()
    assert renewed is not None and renewed.certificate.issuer == home.keys().ca.certificate.subject
    home.invalidate()
    assert home.keys().retired == (first_ca.certificate,)
    report = publish_due(store, signing_generations(home))
    assert {p.ca_id for p in report.publications if p.published} == {
        ca_id(first_ca.certificate),
        ca_id(home.keys().ca.certificate),
    }
    retired_crl = x509.load_der_x509_crl(store.latest_crl(ca_id(first_ca.certificate)).der)
    assert retired_crl.is_signature_valid(first_ca.certificate.public_key())
    assert retired_crl.get_revoked_certificate_by_serial_number(certificate.serial_number) is not None
