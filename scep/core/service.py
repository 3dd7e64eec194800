"""The SCEP operations, framework-free: capabilities, CA certificates, the PKIOperation state machine.

Every failure after the message could be read is a signed CertRep FAILURE; only messages too broken to
answer raise MalformedMessage (the HTTP layer turns it into a 400).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import cast

from asn1crypto import csr as asn1_csr
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from scep.challenge import (
    ChallengeValidator,
    EnrollmentRequest,
    HResult,
    NotificationFailed,
    Verdict,
    challenge_password,
)
from scep.core import message as msg
from scep.core import telemetry
from scep.core.der import fingerprint
from scep.core.issuer import (
    PolicyError,
    Profile,
    ca_id,
    check_request_key,
    device_certificate,
    is_ca_certificate,
    random_serial,
)
from scep.core.protocol import CAPABILITIES_BASE, FailInfo, MessageType, PkiStatus
from scep.core.revocation import DEFAULT_CRL_VALIDITY, publish_now
from scep.keys import CaKeys, Custody, CustodyError, KeyHome, time_budget
from scep.store import (
    CertStatus,
    Claim,
    ClaimOutcome,
    IssuedCertificate,
    RevocationReason,
    SerialInUse,
    Store,
    StoreError,
    TxState,
)

log = logging.getLogger("scep.core.service")

LEASE = timedelta(seconds=60)
SERIAL_ATTEMPTS = 3


@dataclass(frozen=True)
class ServiceOptions:
    allow_legacy: bool = False  # single DES and MD5, for clients that speak nothing else
    profile: Profile = field(default_factory=Profile)
    key_budget_seconds: float = 20.0  # shared by the key operations of one PKIOperation, retries included
    key_custody: str = "local"  # where the keys live (local or keyvault), for telemetry and the status page
    store_kind: str = "sqlite"  # where the inventory lives (sqlite or tables), for the status page
    revoke_superseded: bool = False  # revoke the certificate a RenewalReq renewed (reason superseded)
    crl_validity: timedelta = DEFAULT_CRL_VALIDITY


@dataclass(frozen=True)
class Reply:
    """A CertRep to send back (DER) and what it said, for logs and tests."""

    der: bytes
    status: PkiStatus
    fail_info: FailInfo | None = None
    certificate: x509.Certificate | None = None


class ScepService:
    def __init__(self, custody: Custody, store: Store, validator: ChallengeValidator, options: ServiceOptions):
        self.custody = custody
        self.store = store
        self.validator = validator
        self.options = options

    # --- simple operations ---

    def capabilities(self) -> list[str]:
        caps = list(CAPABILITIES_BASE)
        if self.custody.keys().next_ca is not None:
            caps.append("GetNextCACert")
        return caps

    def ca_certificates(self) -> bytes:
        """GetCACert: the RA, the issuing CA (nothing above it) and the RA's encryption-only twin when there is
        one (clients written for NDES encrypt to it). The DER SET OF sorts them by encoding: the RA comes before
        its twin (see ca.ra_encryption_certificate), so clients taking the first non-CA as the RA still do."""
        keys = self.custody.keys()
        return msg.certs_only([keys.ra.certificate, keys.ca.certificate, *keys.ra_certificates()[1:]])

    def next_ca_certificates(self) -> bytes | None:
        """GetNextCACert: the next CA in a certs-only SignedData, signed by the current CA."""
        keys = self.custody.keys()
        if keys.next_ca is None:
            return None
        inner = msg.certs_only([keys.next_ca.certificate])
        return msg.sign_message(keys.ca, "sha256", [], inner)

    # --- PKIOperation ---

    def pki_operation(self, der: bytes) -> Reply:
        """One PKIOperation; its key operations (unwrap, sign, sign) share one time budget, so a custody that
        retries (Key Vault) gives up in time for a signed FAILURE or, with no signature possible, a 503."""
        with time_budget(self.options.key_budget_seconds), telemetry.enrollment_span(self.options.key_custody) as span:
            reply = self._pki_operation(der)
            span.finish(reply.status, reply.fail_info)
            return reply

    def _pki_operation(self, der: bytes) -> Reply:
        keys = self.custody.keys()
        telemetry.note_certificates(keys.ca.certificate, keys.ra.certificate)
        try:
            request = msg.parse_pki_message(der, self.options.allow_legacy)
        except msg.MalformedMessage:
            raise
        except msg.MessageError as error:
            if error.attributes is None:
                raise msg.MalformedMessage(error.reason) from None
            telemetry.identify(error.attributes.transaction_id, error.attributes.message_type)
            return self._signed_failure(
                keys,
                error.attributes.transaction_id,
                error.attributes.sender_nonce,
                "sha256",
                error.fail_info,
                error.reason,
            )
        except Exception as error:  # whatever a hostile message makes a parser raise, it is still malformed
            raise msg.MalformedMessage(f"unreadable message ({type(error).__name__})") from None
        telemetry.identify(request.transaction_id, request.message_type)
        try:
            return self._dispatch(keys, request)
        except msg.MessageError as error:
            return self._refuse(keys, request, error.fail_info, error.reason)
        except CustodyError as error:
            log.error("transaction %s: key custody failed: %s", request.transaction_id, error)
            return self._refuse(keys, request, FailInfo.BAD_REQUEST, "the CA is temporarily unavailable; retry later")
        except StoreError as error:
            log.error("transaction %s: store failed: %s", request.transaction_id, error)
            return self._refuse(keys, request, FailInfo.BAD_REQUEST, "the CA is temporarily unavailable; retry later")
        except Exception:  # never a 500 for a readable request: log the bug, answer a signed FAILURE
            log.exception("transaction %s: unexpected error", request.transaction_id)
            return self._refuse(keys, request, FailInfo.BAD_REQUEST, "the request could not be processed")

    def _dispatch(self, keys: CaKeys, request: msg.PkiMessage) -> Reply:
        kind = request.message_type
        if kind in (MessageType.PKCS_REQ, MessageType.RENEWAL_REQ):
            return self._enroll(keys, request)
        if kind == MessageType.CERT_POLL:
            return self._poll(keys, request)
        if kind == MessageType.GET_CERT:
            return self._get_cert(keys, request)
        if kind == MessageType.GET_CRL:
            return self._get_crl(keys, request)
        return self._refuse(keys, request, FailInfo.BAD_REQUEST, f"unsupported messageType {kind}")

    def _enroll(self, keys: CaKeys, request: msg.PkiMessage) -> Reply:
        envelope = self._envelope(keys, request)
        with telemetry.step(telemetry.STEP_UNWRAP):
            csr_der = msg.open_envelope(envelope, keys.ra)
        csr = _load_csr(csr_der)
        renewal = self._renewal_signer(keys, request)
        if request.message_type == MessageType.RENEWAL_REQ and renewal is None:
            raise msg.MessageError(
                FailInfo.BAD_MESSAGE_CHECK, "RenewalReq must be signed by a valid certificate this CA issued"
            )
        if renewal is not None:
            _check_renewal_identity(renewal, csr)
        # what the reply needs is checked before anything is validated, signed, recorded or notified
        msg.envelope_recipient_key(request.signer_certificate, envelope.cipher)
        _check_request_key(csr, self.options.profile)
        enrollment = EnrollmentRequest(
            transaction_id=request.transaction_id,
            csr=csr,
            csr_der=csr_der,
            challenge=challenge_password(csr),
            renewal=renewal is not None,
        )
        claim = self.store.claim(_store_transaction_id(request, renewal), _key_id(csr.public_key()), LEASE)
        if claim.outcome is ClaimOutcome.ISSUED:
            return self._deliver_again(keys, request, envelope, claim)
        if claim.outcome is ClaimOutcome.BUSY:
            self.store.count_pending()
            return self._pending(keys, request)
        if claim.outcome is ClaimOutcome.KEY_MISMATCH:
            return self._refuse(keys, request, FailInfo.BAD_REQUEST, "this transactionID belongs to another key")
        return self._issue(keys, request, envelope, enrollment, claim)

    def _issue(
        self,
        keys: CaKeys,
        request: msg.PkiMessage,
        envelope: msg.Envelope,
        enrollment: EnrollmentRequest,
        claim: Claim,
    ) -> Reply:
        with telemetry.step(telemetry.STEP_VALIDATE, **{telemetry.ATTR_VALIDATOR: self.validator.name}):
            verdict = self._validate(enrollment)
        if not verdict.accepted:
            self.store.record_failed(claim, int(verdict.fail_info), verdict.reason)
            return self._refuse(keys, request, verdict.fail_info, verdict.reason or "the request was not authorised")
        validator = verdict.validator or self.validator
        try:
            issued = self._sign_and_record(keys, enrollment, claim, validator.requires_notification)
        except PolicyError as error:
            validator.notify_failure(enrollment, HResult.CERTSRV_E_UNSUPPORTED_CERT_TYPE, error.reason)
            self.store.record_failed(claim, int(error.fail_info), error.reason)
            return self._refuse(keys, request, error.fail_info, error.reason)
        except (CustodyError, StoreError) as error:
            validator.notify_failure(enrollment, HResult.E_FAIL, "the CA could not issue the certificate")
            self._record_failed_quietly(claim, str(error))
            raise
        try:
            with telemetry.step(telemetry.STEP_NOTIFY, **{telemetry.ATTR_VALIDATOR: validator.name}):
                validator.notify_success(enrollment, issued)
        except NotificationFailed as error:
            self.store.mark_undelivered(issued.serial_number)
            log.error(
                "transaction %s: serial %x withheld, success notification failed: %s",
                request.transaction_id,
                issued.serial_number,
                error,
            )
            return self._refuse(keys, request, FailInfo.BAD_REQUEST, "the issuance could not be confirmed; retry")
        if validator.requires_notification:
            self.store.mark_delivered(issued.serial_number)
        if enrollment.renewal and self.options.revoke_superseded:
            self._revoke_superseded(request.signer_certificate.serial_number)
        log.info(
            "transaction %s issued serial %x to %s",
            request.transaction_id,
            issued.serial_number,
            issued.subject,  # formatted only when the log level lets the line through
        )
        return self._success(keys, request, envelope, issued)

    def _revoke_superseded(self, serial: int) -> None:
        """SCEP_REVOKE_SUPERSEDED: the renewed certificate is revoked once its successor is delivered; a failure
        here leaves it valid (logged) and never fails the renewal."""
        try:
            self.store.revoke(serial, RevocationReason.SUPERSEDED, datetime.now(timezone.utc))
        except StoreError as error:
            log.error("serial %x renewed but not revoked as superseded: %s", serial, error)
            return
        publish_now(self.store, cast(KeyHome, self.custody), self.options.crl_validity)

    def _validate(self, enrollment: EnrollmentRequest) -> Verdict:
        try:
            return self.validator.validate(enrollment)
        except Exception:  # a validator must fail closed, whatever went wrong inside it
            log.exception("transaction %s: validator %s failed", enrollment.transaction_id, self.validator.name)
            return Verdict(False, FailInfo.BAD_REQUEST, "the request could not be validated")

    def _sign_and_record(
        self, keys: CaKeys, enrollment: EnrollmentRequest, claim: Claim, notify: bool
    ) -> x509.Certificate:
        for _ in range(SERIAL_ATTEMPTS):
            with telemetry.step(telemetry.STEP_SIGN_CERTIFICATE):
                certificate = device_certificate(enrollment.csr, keys.ca, self.options.profile, random_serial())
            if is_ca_certificate(certificate):  # belt and braces: the profile never builds one
                raise PolicyError(FailInfo.BAD_REQUEST, "refusing to issue a CA certificate")
            record = _record(
                certificate,
                claim.transaction_id,
                keys.ca.certificate,
                CertStatus.CONFIRMING if notify else CertStatus.ISSUED,
            )
            try:
                self.store.record_issued(claim, record)
                return certificate
            except SerialInUse:
                continue
            except StoreError:
                log.error(
                    "transaction %s: certificate serial %x signed but not recorded as delivered: %s",
                    enrollment.transaction_id,
                    certificate.serial_number,
                    certificate.public_bytes(serialization.Encoding.PEM).decode().replace("\n", "|"),
                )
                raise
        raise StoreError("could not find a free serial number")

    def _record_failed_quietly(self, claim: Claim, reason: str) -> None:
        try:
            self.store.record_failed(claim, int(FailInfo.BAD_REQUEST), reason)
        except StoreError:
            log.warning("transaction %s: could not record the failure", claim.transaction_id)

    def _deliver_again(self, keys: CaKeys, request: msg.PkiMessage, envelope: msg.Envelope, claim: Claim) -> Reply:
        record = claim.certificate
        assert record is not None
        if record.status is CertStatus.CONFIRMING and not self._confirmation_abandoned(record):
            return self._pending(keys, request)  # the validator is still being told: the client polls
        if record.status is not CertStatus.ISSUED:
            return self._refuse(keys, request, FailInfo.BAD_REQUEST, "the certificate of this transaction was withheld")
        log.info("transaction %s retransmitted: same certificate %x", request.transaction_id, record.serial)
        return self._success(keys, request, envelope, x509.load_der_x509_certificate(record.der))

    def _confirmation_abandoned(self, record: IssuedCertificate) -> bool:
        """A confirmation older than a lease was cut off (a crash while telling the validator): withheld for good."""
        issued_at = record.not_before + self.options.profile.backdate
        return datetime.now(timezone.utc) - issued_at > LEASE

    def _poll(self, keys: CaKeys, request: msg.PkiMessage) -> Reply:
        envelope = self._envelope(keys, request)  # its IssuerAndSubject adds nothing: the transactionID identifies it
        state = self.store.transaction_state(request.transaction_id)
        if state is TxState.PROCESSING:
            return self._pending(keys, request)
        record = self.store.certificate_for_transaction(request.transaction_id)
        if state is TxState.ISSUED and record is not None:
            if record.status is CertStatus.CONFIRMING and not self._confirmation_abandoned(record):
                return self._pending(keys, request)
            if record.status is CertStatus.ISSUED:
                return self._success(keys, request, envelope, x509.load_der_x509_certificate(record.der))
        return self._refuse(keys, request, FailInfo.BAD_CERT_ID, "no certificate was issued for this transaction")

    def _get_cert(self, keys: CaKeys, request: msg.PkiMessage) -> Reply:
        envelope = self._envelope(keys, request)
        issuer, serial = _issuer_and_serial(msg.open_envelope(envelope, keys.ra))
        ours = {c.subject.public_bytes() for c in keys.trusted_issuers()}
        record = self.store.certificate_by_serial(serial) if issuer in ours else None
        if record is None or record.status is not CertStatus.ISSUED:
            return self._refuse(keys, request, FailInfo.BAD_CERT_ID, "no such certificate")
        return self._success(keys, request, envelope, x509.load_der_x509_certificate(record.der))

    def _get_crl(self, keys: CaKeys, request: msg.PkiMessage) -> Reply:
        """GetCRL (RFC 8894 3.3.4): the latest CRL of the CA generation that issued the named certificate."""
        envelope = self._envelope(keys, request)
        issuer, _ = _issuer_and_serial(msg.open_envelope(envelope, keys.ra))
        generation = next((c for c in keys.trusted_issuers() if c.subject.public_bytes() == issuer), None)
        latest = self.store.latest_crl(ca_id(generation)) if generation is not None else None
        if latest is None:
            return self._refuse(keys, request, FailInfo.BAD_CERT_ID, "no CRL is published for that issuer")
        return self._sealed_success(keys, request, envelope, msg.crls_only([latest.der]))

    def _envelope(self, keys: CaKeys, request: msg.PkiMessage) -> msg.Envelope:
        if not request.content:
            raise msg.MessageError(FailInfo.BAD_REQUEST, "the message has no pkcsPKIEnvelope")
        return msg.read_envelope(request.content, keys.ra_certificates(), self.options.allow_legacy)

    def _renewal_signer(self, keys: CaKeys, request: msg.PkiMessage) -> x509.Certificate | None:
        """The signer certificate when this CA issued it, it is unexpired and not withheld; else None."""
        signer = request.signer_certificate
        if signer.issuer == signer.subject:
            return None
        now = datetime.now(timezone.utc)
        if not signer.not_valid_before_utc <= now <= signer.not_valid_after_utc:
            return None
        for issuer in keys.trusted_issuers():
            if issuer.subject != signer.issuer:
                continue
            try:
                signer.verify_directly_issued_by(issuer)
            except (InvalidSignature, ValueError, TypeError):
                continue
            record = self.store.certificate_by_serial(signer.serial_number)
            if record is not None and (record.status is CertStatus.ISSUED or self._renewed_as(record, request)):
                return signer
        return None

    def _renewed_as(self, record: IssuedCertificate, request: msg.PkiMessage) -> bool:
        """A certificate revoked as superseded still signs the retransmission (or poll) of the very renewal that
        superseded it, so a device that lost the reply gets its new certificate; it renews nothing else."""
        if record.status is not CertStatus.REVOKED or record.revocation_reason is not RevocationReason.SUPERSEDED:
            return False
        renewal_transaction = _store_transaction_id(request, request.signer_certificate)
        return self.store.transaction_state(renewal_transaction) is TxState.ISSUED

    # --- replies ---

    def _success(
        self, keys: CaKeys, request: msg.PkiMessage, envelope: msg.Envelope, certificate: x509.Certificate
    ) -> Reply:
        return self._sealed_success(keys, request, envelope, msg.certs_only([certificate]), certificate)

    def _sealed_success(
        self,
        keys: CaKeys,
        request: msg.PkiMessage,
        envelope: msg.Envelope,
        inner: bytes,
        certificate: x509.Certificate | None = None,
    ) -> Reply:
        sealed = msg.seal_envelope(inner, request.signer_certificate, envelope.cipher, envelope.transport)
        with telemetry.step(telemetry.STEP_SIGN_REPLY):
            der = msg.cert_rep(
                keys.ra, _reply_digest(request.digest_name), PkiStatus.SUCCESS, request.transaction_id,
                request.sender_nonce, sealed,
            )
        return Reply(der, PkiStatus.SUCCESS, certificate=certificate)

    def _pending(self, keys: CaKeys, request: msg.PkiMessage) -> Reply:
        digest = _reply_digest(request.digest_name)
        with telemetry.step(telemetry.STEP_SIGN_REPLY):
            der = msg.cert_rep(keys.ra, digest, PkiStatus.PENDING, request.transaction_id, request.sender_nonce)
        return Reply(der, PkiStatus.PENDING)

    def _refuse(self, keys: CaKeys, request: msg.PkiMessage, fail_info: FailInfo, reason: str) -> Reply:
        """A signed FAILURE answering a parsed request."""
        return self._signed_failure(
            keys, request.transaction_id, request.sender_nonce, request.digest_name, fail_info, reason
        )

    def _signed_failure(
        self, keys: CaKeys, transaction_id: str, nonce: bytes, digest_name: str, fail_info: FailInfo, reason: str
    ) -> Reply:
        """A signed FAILURE from the fields it answers (also for a message readable only up to its attributes)."""
        log.info("transaction %s refused (failInfo %s): %s", transaction_id, fail_info.name, reason)
        with telemetry.step(telemetry.STEP_SIGN_REPLY):
            der = msg.cert_rep(
                keys.ra, _reply_digest(digest_name), PkiStatus.FAILURE, transaction_id, nonce,
                fail_info=fail_info, fail_info_text=reason,
            )
        return Reply(der, PkiStatus.FAILURE, fail_info)


def _reply_digest(request_digest: str) -> str:
    """The request's digest for the CertRep, but never below SHA-256 (Key Vault signs no SHA-1 with RSA)."""
    return request_digest if request_digest in ("sha256", "sha384", "sha512") else "sha256"


def _load_csr(der: bytes) -> x509.CertificateSigningRequest:
    """The CSR with its signature verified: cryptography's strict reader first (the common case), and what it
    refuses or cannot verify goes to the lenient reader, which has the last word."""
    with contextlib.suppress(Exception):  # InvalidVersion, ValueError and more on hostile input
        csr = x509.load_der_x509_csr(der)
        if csr.is_signature_valid:
            return csr
    return _load_lenient_csr(der)


def _load_lenient_csr(der: bytes) -> x509.CertificateSigningRequest:
    """A CSR the strict reader refuses: attributes not in DER order (strongSwan), version 1 or 2 (Apple devices;
    the field carries no meaning), or a SHA-1 signature (cryptography's check is false for it under OpenSSL 3).
    Verify the signature over the bytes as sent, then re-encode version 0 and canonical attributes."""
    try:
        request = asn1_csr.CertificationRequest.load(der, strict=True)
        info = request["certification_request_info"]
        public_key = serialization.load_der_public_key(info["subject_pk_info"].dump())
        original = info.dump()
        msg.verify_signature(public_key, request["signature"].native, original, request["signature_algorithm"])
    except InvalidSignature:
        raise msg.MessageError(
            FailInfo.BAD_MESSAGE_CHECK, "the certificate request signature does not verify"
        ) from None
    except Exception:
        raise msg.MessageError(FailInfo.BAD_REQUEST, "the certificate request is not a valid PKCS#10") from None
    attributes = sorted(info["attributes"], key=lambda attribute: attribute.dump())
    canonical = asn1_csr.CertificationRequest(
        {
            "certification_request_info": {
                "version": "v1",
                "subject": info["subject"],
                "subject_pk_info": info["subject_pk_info"],
                "attributes": asn1_csr.CRIAttributes(attributes),
            },
            "signature_algorithm": request["signature_algorithm"],
            "signature": request["signature"],
        }
    )
    try:
        return x509.load_der_x509_csr(canonical.dump(force=True))
    except ValueError:
        raise msg.MessageError(FailInfo.BAD_REQUEST, "the certificate request is not a valid PKCS#10") from None


def _check_request_key(csr: x509.CertificateSigningRequest, profile: Profile) -> None:
    try:
        check_request_key(csr, profile)
    except PolicyError as error:
        raise msg.MessageError(error.fail_info, error.reason) from None


def _check_renewal_identity(signer: x509.Certificate, csr: x509.CertificateSigningRequest) -> None:
    """A renewal may re-certify what the old certificate said, nothing more."""
    if csr.subject != signer.subject:
        raise msg.MessageError(FailInfo.BAD_REQUEST, "a renewal must keep the subject of the certificate it renews")
    if _san(csr.extensions) != _san(signer.extensions):
        raise msg.MessageError(FailInfo.BAD_REQUEST, "a renewal must keep the subjectAltName of the old certificate")


def _san(extensions: x509.Extensions) -> frozenset:
    try:
        return frozenset(extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return frozenset()


def _store_transaction_id(request: msg.PkiMessage, renewal: x509.Certificate | None) -> str:
    """Clients that derive the transactionID from a key they keep (micromdm) renew under the same ID: a renewal
    is its own transaction, identified by the certificate it renews."""
    if renewal is None:
        return request.transaction_id
    return f"{request.transaction_id}:renewal:{renewal.serial_number:x}"


def _key_id(public_key) -> str:
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def _record(
    certificate: x509.Certificate, transaction_id: str, ca: x509.Certificate, status: CertStatus
) -> IssuedCertificate:
    der = certificate.public_bytes(serialization.Encoding.DER)
    return IssuedCertificate(
        serial=certificate.serial_number,
        transaction_id=transaction_id,
        subject=certificate.subject.rfc4514_string(),
        issuer_sha256=ca_id(ca),  # the CA generation: what CRLs, OCSP and their URLs are keyed by
        not_before=certificate.not_valid_before_utc,
        not_after=certificate.not_valid_after_utc,
        thumbprint_sha1=fingerprint(certificate, "sha1"),
        der=der,
        status=status,
    )


def _issuer_and_serial(der: bytes) -> tuple[bytes, int]:
    try:
        return msg.issuer_and_serial_of(der)
    except Exception:
        raise msg.MessageError(FailInfo.BAD_REQUEST, "GetCert content is not an IssuerAndSerialNumber") from None
