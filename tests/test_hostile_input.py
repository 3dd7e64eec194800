"""Hostile input: thousands of mutated, truncated and spliced PKIMessages. Each gets a 4xx or a signed CertRep
(FAILURE, or SUCCESS only for a message that still verifies), never a 5xx, and the service keeps working."""

from __future__ import annotations

import random

import pytest

from scep import web
from scep.client import RequestOptions, build_request, make_csr, new_enrollment, read_reply
from scep.message import parse_pki_message
from scep.protocol import PkiStatus
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
