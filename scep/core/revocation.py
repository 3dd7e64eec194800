"""CRLs (RFC 5280 v2): built from the store's revocation state, signed through custody, published when due.

For whoever wires HTTP, the admin API, the CLI and timers:

    publish_due(store, signing_generations(home))   the publication job: revokes withheld certificates, then
                                                      publishes a CRL for every CA generation that needs one;
                                                      returns a PublicationReport saying what it did
    store.latest_crl(ca_id)                           what GET /api/crl/<ca_id>.crl serves (StoredCrl.der)
    crl_headers(crl, now)                             the caching headers for that answer
    store.revoke(serial, reason, when)                a revocation; the next publish_due publishes at once
    publish_now(store, home, validity)                what every revocation path calls right after revoking:
                                                      publish_due, a custody or store failure logged (the
                                                      revocation stands; the scheduled job publishes it)

`ca_id` (scep.core.issuer) names a CA generation everywhere: the lower-case hex SHA-256 of its certificate.

A CRL is published for every generation still in use: the current CA, the next CA (rolled over, not yet
promoted) and every retired CA whose own certificate has not expired (the certificates it issued end no later
than it does). A generation's CRL is due when it has none, when a revocation was recorded after its CRL was
built (the store's revocation revision is higher than the CRL's), or at half-life (thisUpdate plus half of the
validity). Each publication is one key operation. Concurrent publishers (several instances, one timer each) are
safe: the store keeps only a CRL with a higher cRLNumber, and a publisher that loses re-reads and publishes again
if the winner's CRL misses a revocation.

Contents: issuer, thisUpdate, nextUpdate (thisUpdate + validity, 7 days by default), the extensions cRLNumber and
authorityKeyIdentifier, and one entry per revoked certificate with its revocation date and a reasonCode entry
extension (left out for `unspecified`, as RFC 5280 section 5.3.1 asks); no invalidityDate. Entries stay until
the CA generation itself expires.

Withheld certificates: a certificate whose issuance Intune never confirmed (UNDELIVERED) was signed but never
handed to the device; publish_due revokes each with reason cessationOfOperation (RFC 5280: "no longer needed for
the purpose for which it was issued", with no suspicion on the key), so it can never be used if it leaks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from scep.core.issuer import authority_key_id, ca_id, draft, sign_through_custody
from scep.keys import CustodyError, KeyHandle, KeyHome
from scep.store import (
    CertificateQuery,
    CertStatus,
    Revocation,
    RevocationReason,
    Store,
    StoredCrl,
    StoreError,
)

log = logging.getLogger("scep.core.revocation")

DEFAULT_CRL_VALIDITY = timedelta(days=7)
WITHHELD_REASON = RevocationReason.CESSATION_OF_OPERATION
MAX_PUBLISH_ROUNDS = 16  # rounds lost to other publishers (each loss means another CRL was stored) before giving up
CRL_FIELD_SIGNATURE = 1  # TBSCertList: version, signature, ...
CRL_CONTENT_TYPE = "application/pkix-crl"


@dataclass(frozen=True)
class Publication:
    """What publish_due did for one CA generation: published CRL `number`, or kept `number` (not due)."""

    ca_id: str
    number: int
    published: bool
    why: str  # "first", "revocation", "half-life", or "current" when nothing was due


@dataclass(frozen=True)
class PublicationReport:
    withheld_revoked: tuple[int, ...]  # serials of UNDELIVERED certificates revoked by this run
    publications: tuple[Publication, ...]


def signing_generations(home: KeyHome) -> list[KeyHandle]:
    """The CA keys that sign CRLs now: current, next (if any) and every unexpired retired CA."""
    keys = home.keys()
    generations = [keys.ca]
    if keys.next_ca is not None:
        generations.append(keys.next_ca)
    generations.extend(home.retired_handle(certificate) for certificate in keys.retired)
    return generations


def build_crl(
    ca: KeyHandle,
    entries: Sequence[Revocation],
    number: int,
    this_update: datetime,
    validity: timedelta = DEFAULT_CRL_VALIDITY,
) -> x509.CertificateRevocationList:
    """A v2 CRL of ca listing entries, signed by one custody operation."""
    # All entries go in at construction: add_revoked_certificate copies the list each time (quadratic).
    builder = (
        x509.CertificateRevocationListBuilder(revoked_certificates=[_entry(entry) for entry in entries])
        .issuer_name(ca.certificate.subject)
        .last_update(this_update)
        .next_update(this_update + validity)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(authority_key_id(ca.certificate), critical=False)
    )
    tbs = draft(builder).tbs_certlist_bytes
    return x509.load_der_x509_crl(sign_through_custody(tbs, ca, algorithm_field=CRL_FIELD_SIGNATURE))


def _entry(revocation: Revocation) -> x509.RevokedCertificate:
    builder = x509.RevokedCertificateBuilder().serial_number(revocation.serial).revocation_date(revocation.revoked_at)
    if revocation.reason is not RevocationReason.UNSPECIFIED:
        builder = builder.add_extension(x509.CRLReason(x509.ReasonFlags(revocation.reason.value)), critical=False)
    return builder.build()


def revoke_withheld(store: Store, now: datetime) -> tuple[int, ...]:
    """Revoke every UNDELIVERED certificate (reason cessationOfOperation); the serials revoked."""
    revoked: list[int] = []
    page: str | None = None
    while True:
        found = store.find_certificates(CertificateQuery(status=CertStatus.UNDELIVERED, limit=200, page=page))
        for certificate in found.items:
            if not store.revoke(certificate.serial, WITHHELD_REASON, now).already:
                revoked.append(certificate.serial)
        if found.next_page is None:
            return tuple(revoked)
        page = found.next_page


def publish_due(
    store: Store,
    generations: Sequence[KeyHandle],
    now: datetime | None = None,
    validity: timedelta = DEFAULT_CRL_VALIDITY,
) -> PublicationReport:
    """The publication job: revoke withheld certificates, then publish every CA generation's CRL that is due."""
    now = now or datetime.now(timezone.utc)
    withheld = revoke_withheld(store, now)
    publications = tuple(_publish_one(store, ca, now, validity) for ca in generations)
    return PublicationReport(withheld, publications)


def publish_now(store: Store, home: KeyHome, validity: timedelta = DEFAULT_CRL_VALIDITY) -> bool:
    """Publish the CRLs a revocation just made due; False (logged) when custody or the store fails, in which case
    the revocation stands and the scheduled publication lists it."""
    try:
        publish_due(store, signing_generations(home), validity=validity)
    except (CustodyError, StoreError) as error:
        log.error("revocation recorded, CRL not published now: %s", error)
        return False
    return True


def _publish_one(store: Store, ca: KeyHandle, now: datetime, validity: timedelta) -> Publication:
    identifier = ca_id(ca.certificate)
    for _ in range(MAX_PUBLISH_ROUNDS):
        latest = store.latest_crl(identifier)
        why = _due(store, identifier, latest, now)
        if why is None:
            assert latest is not None
            return Publication(identifier, latest.number, published=False, why="current")
        listing = store.revocations(identifier)
        number = 1 if latest is None else latest.number + 1
        this_update = now.replace(microsecond=0)
        crl = build_crl(ca, listing.entries, number, this_update, validity)
        stored = StoredCrl(
            identifier, number, listing.revision, this_update, this_update + validity, crl.public_bytes(Encoding.DER)
        )
        if store.save_crl(stored):
            return Publication(identifier, number, published=True, why=why)
    latest = store.latest_crl(identifier)
    number = 0 if latest is None else latest.number
    return Publication(identifier, number, published=False, why="lost to other publishers")


def _due(store: Store, identifier: str, latest: StoredCrl | None, now: datetime) -> str | None:
    if latest is None:
        return "first"
    if store.revocation_revision(identifier) > latest.revision:
        return "revocation"
    if now >= latest.this_update + (latest.next_update - latest.this_update) / 2:
        return "half-life"
    return None


def crl_headers(crl: StoredCrl, now: datetime | None = None) -> dict[str, str]:
    """HTTP headers for serving a stored CRL: cacheable until its nextUpdate, never past it."""
    now = now or datetime.now(timezone.utc)
    return caching_headers(
        CRL_CONTENT_TYPE, f'"{crl.issuer_sha256[:16]}-{crl.number}"', crl.this_update, crl.next_update, now
    )


def caching_headers(
    content_type: str, etag: str, this_update: datetime, expires: datetime, now: datetime
) -> dict[str, str]:
    """Content-Type, Last-Modified, Expires, ETag and a Cache-Control max-age that ends at `expires`
    (RFC 5019 section 6.2 asks the same of OCSP responses)."""
    max_age = max(0, int((expires - now).total_seconds()))
    return {
        "Content-Type": content_type,
        "Cache-Control": f"public, max-age={max_age}, no-transform, must-revalidate",
        "Last-Modified": format_datetime(this_update.astimezone(timezone.utc), usegmt=True),
        "Expires": format_datetime(expires.astimezone(timezone.utc), usegmt=True),
        "ETag": etag,
    }
