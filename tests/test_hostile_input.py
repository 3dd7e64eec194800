"""Hostile input: thousands of mutated, truncated and spliced PKIMessages. Each gets a 4xx or a signed CertRep
(FAILURE, or SUCCESS only for a message that still verifies), never a 5xx, and the service keeps working."""

from __future__ import annotations

import logging
import random

import pytest
from asn1crypto import x509 as asn1_x509
from cryptography.hazmat.primitives import serialization

from scep.core.message import parse_pki_message
from scep.core.protocol import PkiStatus
from scep.http import web
from scep.tools.client import RequestOptions, build_request, make_csr, new_enrollment, read_reply
from tests.conftest import CHALLENGE
from tests.scep_helpers import enroll, ra_and_ca

SEED = 20261124


def _mutations(valid: bytes, rng: random.Random, count: int):
    for _ in range(count):
        data = bytearray(valid)
        kind = rng.randrange(5)
        if kind == 0:  # flip bytes
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] ^= rng.randint(1, 255)
        elif kind == 1:  # truncate
            data = data[: rng.randrange(len(data))]
        elif kind == 2:  # corrupt a length octet near the front, where the structure is
            position = rng.randrange(min(len(data), 64))
            data[position] = rng.choice([0x00, 0x7F, 0x80, 0x81, 0x84, 0xFF])
        elif kind == 3:  # splice a random slice elsewhere
            start, end = sorted(rng.sample(range(len(data)), 2))
            insert_at = rng.randrange(len(data))
            data[insert_at:insert_at] = data[start:end]
        else:  # append garbage
            data += rng.randbytes(rng.randint(1, 300))
        yield bytes(data)


@pytest.mark.parametrize("cipher_digest", [RequestOptions(), RequestOptions(digest="sha512")])
def test_mutated_messages_never_cause_a_server_error(service, keys, cipher_digest):
    rng = random.Random(SEED)
    ra, _ = ra_and_ca(service)
    key = keys.new()
    enrollment = new_enrollment(key, make_csr(key, "fuzzed", CHALLENGE))
    valid = build_request(enrollment, ra, cipher_digest)
    statuses: dict[int, int] = {}
    for mutated in _mutations(valid, rng, 600):
        reply = web.handle_scep(service, "POST", {"operation": "PKIOperation"}, mutated)
        statuses[reply.status] = statuses.get(reply.status, 0) + 1
        assert reply.status in (200, 400, 413), reply.body[:200]
        if reply.status == 200:
            answer = parse_pki_message(reply.body)  # a CertRep we signed, whatever it says
            assert answer.pki_status in (PkiStatus.FAILURE, PkiStatus.SUCCESS, PkiStatus.PENDING)
    assert statuses.get(400, 0) > 0 and statuses.get(200, 0) > 0  # both paths were exercised
    result, _ = enroll(service, keys.new(), "after-the-storm")
    assert result.status is PkiStatus.SUCCESS


def test_valid_request_still_issues_exactly_once_after_mutations(service, keys):
    ra, _ = ra_and_ca(service)
    key = keys.new()
    enrollment = new_enrollment(key, make_csr(key, "survivor", CHALLENGE))
    valid = build_request(enrollment, ra, RequestOptions())
    for mutated in _mutations(valid, random.Random(SEED + 1), 200):
        web.handle_scep(service, "POST", {"operation": "PKIOperation"}, mutated)
    reply = web.handle_scep(service, "POST", {"operation": "PKIOperation"}, valid)
    result = read_reply(reply.body, enrollment, ra)
    assert result.status is PkiStatus.SUCCESS
    record = service.store.certificate_for_transaction(enrollment.transaction_id)
    assert record.serial == result.certificate.serial_number


SIGNER_FIELDS = ("subject", "issuer", "extensions", "validity", "subject_public_key_info")


def _signer_mutations(certificate_der: bytes, rng: random.Random, count: int):
    """Length-preserving damage inside one field of the signer certificate at a time (the certificate is not
    covered by the message signature, so the rest of the message stays valid)."""
    tbs = asn1_x509.Certificate.load(certificate_der)["tbs_certificate"]
    for name in SIGNER_FIELDS:
        encoded = tbs[name].dump()
        if not encoded:
            continue  # a self-signed signer without extensions
        start = certificate_der.index(encoded)
        for _ in range(count):
            data = bytearray(certificate_der)
            for _ in range(rng.randint(1, 4)):
                data[start + rng.randrange(len(encoded))] ^= rng.randint(1, 255)
            yield name, bytes(data)


def _signed_by(service, keys, renew: bool) -> tuple[bytes, bytes]:
    """A valid PKCSReq (self-signed signer) or RenewalReq (signed by a certificate we issued), and its signer."""
    ra, _ = ra_and_ca(service)
    renew_with = None
    if renew:
        old_key = keys.new()
        issued, _ = enroll(service, old_key, "fuzzed-signer")
        renew_with = (old_key, issued.certificate)
    key = keys.new()
    enrollment = new_enrollment(key, make_csr(key, "fuzzed-signer", CHALLENGE), renew_with)
    signer_der = enrollment.signer.certificate.public_bytes(serialization.Encoding.DER)
    return build_request(enrollment, ra, RequestOptions()), signer_der


@pytest.mark.parametrize("renew", [False, True], ids=["self-signed", "issued"])
def test_damaged_signer_certificates_are_refused_quietly(service, keys, caplog, renew):
    valid, signer_der = _signed_by(service, keys, renew)
    fields: dict[str, set[int]] = {}
    with caplog.at_level(logging.INFO):
        for name, damaged in _signer_mutations(signer_der, random.Random(SEED + 2), 40):
            reply = web.handle_scep(
                service, "POST", {"operation": "PKIOperation"}, valid.replace(signer_der, damaged)
            )
            assert reply.status in (200, 400), reply.body[:200]
            fields.setdefault(name, set()).add(reply.status)
            if reply.status == 200:
                assert parse_pki_message(reply.body).pki_status in (PkiStatus.FAILURE, PkiStatus.SUCCESS)
    assert set(fields) == set(SIGNER_FIELDS) - ({"extensions"} if not renew else set())
    assert any(200 in statuses for statuses in fields.values())  # the damage reached the service
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert not [r for r in caplog.records if r.exc_info]  # no traceback at any level
