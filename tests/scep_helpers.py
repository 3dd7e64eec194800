"""Test helpers: enrol against an in-process ScepService with the project's own client functions."""

from __future__ import annotations

from cryptography import x509

from scep.core import message as msg
from scep.core.service import ScepService
from scep.tools.client import (
    DEFAULT_OPTIONS,
    Enrollment,
    RequestOptions,
    Result,
    build_request,
    make_csr,
    new_enrollment,
    read_reply,
)
from scep.tools.client import split_ra_and_ca as split
from tests.conftest import CHALLENGE


def ra_and_ca(service: ScepService) -> tuple[x509.Certificate, x509.Certificate]:
    return split(msg.read_certs_only(service.ca_certificates()))


def enroll(
    service: ScepService,
    key,
    cn: str = "device",
    challenge: str | None = CHALLENGE,
    options: RequestOptions = DEFAULT_OPTIONS,
    renew_with=None,
    transaction_id: str | None = None,
    dns: tuple[str, ...] = (),
    extensions: tuple = (),
) -> tuple[Result, Enrollment]:
    ra, _ = ra_and_ca(service)
    csr = make_csr(key, cn, challenge, dns, extensions)
    enrollment = new_enrollment(key, csr, renew_with, transaction_id)
    reply = service.pki_operation(build_request(enrollment, ra, options))
    return read_reply(reply.der, enrollment, ra), enrollment


def send(service: ScepService, enrollment: Enrollment, options: RequestOptions = DEFAULT_OPTIONS) -> Result:
    ra, _ = ra_and_ca(service)
    reply = service.pki_operation(build_request(enrollment, ra, options))
    return read_reply(reply.der, enrollment, ra)
