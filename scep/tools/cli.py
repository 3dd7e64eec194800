"""The `scep` command: serve, enroll, ca ..., doctor, intune check."""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from scep import __version__, config, logs
from scep.core.ca import DEFAULT_OCSP_DAYS, CaOptions, LifecycleError
from scep.core.issuer import fingerprint
from scep.findings import Finding
from scep.keys import CustodyError, KeySpec, Slot
from scep.store import serial_hex
from scep.store.sqlite import SqliteStore
from scep.tools.certs import add_certs_parser
from scep.tools.challenge import add_challenge_parser

DEFAULT_PORT = 7071


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        level = args.log_level or config.load_settings(for_serving=False).log_level or "warning"
    except config.ConfigError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    logs.configure_console(level)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except config.ConfigError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    except (LifecycleError, CustodyError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scep", description="SCEP certification authority for Microsoft Intune")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", choices=logs.LEVELS, help="default: SCEP_LOG_LEVEL, else warning")
    commands = parser.add_subparsers(title="commands")

    serve = commands.add_parser(
        "serve", help="run the server on this machine (gunicorn; same request handling as `func start`)"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT)
    serve.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: CPUs)")
    serve.add_argument("--data-dir", help="overrides SCEP_DATA_DIR")
    serve.set_defaults(run=_serve)

    enroll = commands.add_parser("enroll", help="enrol (or renew) a test device against any SCEP server")
    enroll.add_argument("--url", required=True, help="SCEP URL, e.g. http://127.0.0.1:7071/api/scep")
    enroll.add_argument("--challenge", help="challenge password (default: SCEP_CHALLENGE)")
    enroll.add_argument("--cn", required=True, help="subject common name")
    enroll.add_argument("--dns", action="append", default=[], help="DNS subjectAltName (repeatable)")
    enroll.add_argument("--out", required=True, help="file prefix: writes PREFIX.key and PREFIX.pem")
    enroll.add_argument("--renew", action="store_true", help="renew PREFIX.pem (RenewalReq, new key)")
    enroll.add_argument("--get", action="store_true", help="send PKIOperation over GET instead of POST")
    enroll.add_argument(
        "--key", default="rsa:2048", help="new device key: rsa:<bits> or ec:P-256, ec:P-384, ec:P-521 (rsa:2048)"
    )
    enroll.set_defaults(run=_enroll)

    _ca_parser(commands)
    add_challenge_parser(commands)
    add_certs_parser(commands)

    doctor = commands.add_parser("doctor", help="check the settings and every backend, say what to fix")
    doctor.set_defaults(run=_doctor)

    intune = commands.add_parser("intune", help="Intune integration")
    intune_commands = intune.add_subparsers(title="intune commands")
    check = intune_commands.add_parser("check", help="token, discovery and a validateRequest round trip")
    check.set_defaults(run=_intune_check)
    revocations = intune_commands.add_parser(
        "revocations", help="one cycle of Intune's revocation requests now: download, revoke, report back"
    )
    revocations.set_defaults(run=_intune_revocations)
    grant = intune_commands.add_parser("grant", help="grant the Intune app roles to a principal (post-provision)")
    grantee = grant.add_mutually_exclusive_group(required=True)
    grantee.add_argument("--principal-id", help="object id of the service principal (a managed identity)")
    grantee.add_argument("--client-id", help="client (application) id of an app registration")
    grant.add_argument("--wait", type=float, default=900.0, help="seconds to wait for Entra replication (900)")
    grant.set_defaults(run=_intune_grant)
    return parser


def _ca_parser(commands) -> None:
    ca = commands.add_parser("ca", help="CA lifecycle (local files or Key Vault, by settings)")
    ca_commands = ca.add_subparsers(title="ca commands")

    init = ca_commands.add_parser("init", help="create the root CA (or a subordinate CA's CSR) and the RA")
    _key_options(init)
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    init.add_argument("--subordinate", action="store_true", help="write a CSR for an enterprise root instead")
    init.add_argument("--csr-out", default="scep-ca.csr", help="where --subordinate writes the CSR (PEM)")
    init.set_defaults(run=_ca_init)

    imp = ca_commands.add_parser("import", help="attach the enterprise root's signed certificate to the pending key")
    imp.add_argument("--cert", required=True, help="signed CA certificate (PEM or DER)")
    imp.add_argument("--chain", help="certificates above it up to the root (PEM)")
    imp.set_defaults(run=_ca_import)

    ra = ca_commands.add_parser("ra", help="the RA certificate")
    ra_commands = ra.add_subparsers(title="ra commands")
    for name in ("issue", "renew"):
        command = ra_commands.add_parser(name, help=f"{name} the RA certificate (new key, issued by the CA)")
        command.add_argument("--days", type=int, default=730)
        command.set_defaults(run=_ca_ra)

    ocsp = ca_commands.add_parser("ocsp", help="the delegated OCSP signer certificate")
    ocsp_commands = ocsp.add_subparsers(title="ocsp commands")
    for name in ("issue", "renew"):
        command = ocsp_commands.add_parser(name, help=f"{name} the OCSP signer (new key, issued by the CA)")
        command.add_argument("--days", type=int, default=DEFAULT_OCSP_DAYS, help="short: it carries ocsp-nocheck")
        command.set_defaults(run=_ca_ocsp)

    roll = ca_commands.add_parser("rollover", help="create the next CA, served by GetNextCACert")
    _key_options(roll)
    roll.add_argument("--subordinate", action="store_true", help="write a CSR for an enterprise root instead")
    roll.add_argument("--csr-out", default="scep-next-ca.csr", help="where --subordinate writes the CSR (PEM)")
    roll.set_defaults(run=_ca_rollover)

    promote = ca_commands.add_parser("promote", help="make the next CA current (and issue a new RA)")
    promote.set_defaults(run=_ca_promote)

    show = ca_commands.add_parser("show", help="subject, fingerprints, validity, key type, versions")
    show.set_defaults(run=_ca_show)


def _key_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subject", default="CN=SCEP Root CA,O=scep-intune-ca")
    parser.add_argument("--days", type=int, default=3650)
    parser.add_argument("--key-type", choices=["RSA", "EC"], default="RSA")
    parser.add_argument("--key-size", type=int, choices=[2048, 3072, 4096], default=2048)
    parser.add_argument("--curve", choices=["P-256", "P-384"], default="P-256")
    parser.add_argument("--hsm", action="store_true", help="HSM-backed key (Key Vault Premium)")


def _ca_options(args) -> CaOptions:
    spec = KeySpec(kty=args.key_type, size=args.key_size, curve=args.curve, hsm=args.hsm)
    return CaOptions(subject=args.subject, days=args.days, spec=spec)


# --- serve ---


def _serve(args) -> int:
    from scep.core import maintenance
    from scep.http.serving import ScepServer, listening_url

    if args.workers < 1:
        raise ValueError("--workers must be at least 1")
    overrides = {name: value for name, value in (("SCEP_DATA_DIR", args.data_dir), ("SCEP_LOG_LEVEL", args.log_level))
                 if value}
    preliminary = config.load_settings(overrides=overrides, for_serving=False)
    if preliminary.service.options.profile.public_base_url is None:  # certificates name this server
        overrides.update({"SCEP_PUBLIC_BASE_URL": listening_url((args.host, args.port))})
    generated = _generated_challenge(preliminary)
    settings = config.load_settings(overrides=dict(overrides, SCEP_CHALLENGE=generated) if generated else overrides)
    config.reset(settings)  # the forked workers inherit these settings
    home = config.build_key_home(settings)
    created = config.ensure_local_ca(settings, home)
    admin_credential = _admin_credential(settings)
    store = config.build_store(settings)
    store.ping()
    if isinstance(store, SqliteStore):
        store.release_abandoned_leases()  # no worker runs yet: whatever is PROCESSING was cut off by a crash
    keys = home.keys()
    maintenance.report_expiry(keys)  # once, here: the forked workers inherit what was reported

    def ready(url: str) -> None:
        _print_banner(url, settings, keys.ca.certificate, created, generated, args.workers)
        if admin_credential:
            print(f"Admin:       {url}/api/admin/certificates   Authorization: Bearer {admin_credential}", flush=True)
        print(f"Ready: {url}", flush=True)

    level = config.log_level(settings) or "warning"
    options = {"bind": _bind_address(args.host, args.port), "workers": args.workers, "loglevel": level}
    ScepServer(options, ready).run()  # returns on SIGTERM/SIGINT, after the workers stopped
    return 0


def _admin_credential(settings: config.Settings) -> str | None:
    """The local admin credential (created once in the data directory); None when admins sign in with Entra ID."""
    from scep.http.admin_auth import ensure_local_credential

    if settings.admin.mode != "credential":
        return None
    return ensure_local_credential(settings.data_dir)[0]


def _bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _generated_challenge(settings: config.Settings) -> str | None:
    """A generated static challenge when none is set (the embedded default); None otherwise."""
    challenge = settings.challenge
    if "static" not in challenge.modes or challenge.static or challenge.static_secret_name:
        return None
    return secrets.token_urlsafe(18)


def _print_banner(
    url: str, settings: config.Settings, ca: x509.Certificate, created: bool, generated: str | None, workers: int
) -> None:
    scep_url = f"{url}/api/scep"
    where = settings.key_vault.url if settings.key_vault else str(settings.data_dir.resolve())
    lines = [
        f"scep-intune-ca {__version__}: {workers} worker(s)",
        f"CA:          {ca.subject.rfc4514_string()} ({'created now' if created else 'existing'}, keys in {where})",
        f"CA SHA-256:  {fingerprint(ca)}",
        f"CA download: {url}/api/ca.pem",
        f"SCEP URL:    {scep_url}",
        f"Health:      {url}/api/health",
    ]
    if generated:
        lines.append(f"Challenge:   {generated}   (generated; set SCEP_CHALLENGE to choose one)")
    challenge = generated or "$SCEP_CHALLENGE"
    lines += [
        "Enrol a test device:",
        f"  scep enroll --url {scep_url} --challenge '{challenge}' --cn test-device --out test-device",
        f"  openssl verify -CAfile <(curl -s {url}/api/ca.pem) test-device.pem",
    ]
    print("\n".join(lines), flush=True)


# --- enroll ---


def _enroll(args) -> int:
    from scep.tools import client as scep_client

    scep = scep_client.ScepClient(args.url)
    caps = scep.capabilities()
    ra, ca = scep.ca_certificates()
    key = scep_client.new_device_key(args.key)
    key_path, cert_path = Path(f"{args.out}.key"), Path(f"{args.out}.pem")
    renew_with = None
    if args.renew:
        old_key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        renew_with = (old_key, x509.load_pem_x509_certificate(cert_path.read_bytes()))
    challenge = args.challenge or config.load_settings(for_serving=False).challenge.static or None
    csr = scep_client.make_csr(key, args.cn, challenge, tuple(args.dns))
    enrollment = scep_client.new_enrollment(key, csr, renew_with)
    options = scep_client.RequestOptions(
        cipher=scep_client.ContentCipher.AES256 if "AES" in caps else scep_client.ContentCipher.DES3,
        digest="sha512" if "SHA-512" in caps else "sha256",
        method="GET" if args.get or "POSTPKIOperation" not in caps else "POST",
    )
    result = scep.enroll(enrollment, ra, options)
    if result.certificate is None:
        print(
            f"enrolment {result.status.name}: failInfo {result.fail_info!s} {result.fail_info_text or ''}",
            file=sys.stderr,
        )
        return 1
    _write_private(
        key_path,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    cert_path.write_bytes(result.certificate.public_bytes(serialization.Encoding.PEM))
    print(
        f"issued {result.certificate.subject.rfc4514_string()} serial {result.certificate.serial_number:x} "
        f"by {ca.subject.rfc4514_string()}: {cert_path} (key {key_path})"
    )
    return 0


def _write_private(path: Path, data: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)


# --- ca ---


def _home():
    return config.build_key_home(config.load_settings(for_serving=False))


def _ca_init(args) -> int:
    from scep.core import ca

    home = _home()
    if args.subordinate:
        csr = x509.load_der_x509_csr(ca.init_subordinate(home, _ca_options(args), force=args.force))
        Path(args.csr_out).write_bytes(csr.public_bytes(serialization.Encoding.PEM))
        print(f"CSR for the subordinate CA written to {args.csr_out}; have the root sign it, then `scep ca import`")
        return 0
    certificate = ca.init_root(home, _ca_options(args), force=args.force)
    print(f"root CA {certificate.subject.rfc4514_string()} created in {home.describe()}")
    print(f"SHA-256 {fingerprint(certificate)}; RA issued")
    return 0


def _ca_import(args) -> int:
    from scep.core import ca

    certificate = _load_certificate(Path(args.cert).read_bytes())
    chain = x509.load_pem_x509_certificates(Path(args.chain).read_bytes()) if args.chain else []
    home = _home()
    ca.import_signed(home, certificate, chain)
    print(f"imported {certificate.subject.rfc4514_string()} into {home.describe()}")
    return 0


def _ca_ra(args) -> int:
    from scep.core import ca

    certificate = ca.issue_ra(_home(), days=args.days)
    print(f"RA {certificate.subject.rfc4514_string()} issued, valid until {certificate.not_valid_after_utc:%Y-%m-%d}")
    return 0


def _ca_ocsp(args) -> int:
    from scep.core import ca
    from scep.core.maintenance import OCSP_RENEW_DAYS

    certificate = ca.issue_ocsp_signer(_home(), days=args.days)
    print(
        f"OCSP signer {certificate.subject.rfc4514_string()} issued, valid until "
        f"{certificate.not_valid_after_utc:%Y-%m-%d}; the daily maintenance job renews it {OCSP_RENEW_DAYS} days before"
    )
    return 0


def _ca_rollover(args) -> int:
    from scep.core import ca

    if args.subordinate:
        csr = x509.load_der_x509_csr(ca.rollover_subordinate(_home(), _ca_options(args)))
        Path(args.csr_out).write_bytes(csr.public_bytes(serialization.Encoding.PEM))
        print(f"CSR for the next CA written to {args.csr_out}; have the root sign it, then `scep ca import`")
        return 0
    certificate = ca.rollover(_home(), _ca_options(args))
    print(f"next CA {certificate.subject.rfc4514_string()} created; GetNextCACert serves it")
    print(f"SHA-256 {fingerprint(certificate)}; distribute it, then run `scep ca promote`")
    return 0


def _ca_promote(args) -> int:
    from scep.core import ca

    certificate = ca.promote(_home())
    print(f"{certificate.subject.rfc4514_string()} (SHA-256 {fingerprint(certificate)}) is now the issuing CA")
    return 0


def _ca_show(args) -> int:
    home = _home()
    inventory = home.inventory()
    if not any(info.slot is Slot.CA for info in inventory):
        print(f"no CA in {home.describe()}: run `scep ca init`", file=sys.stderr)
        return 1
    print(f"custody: {home.describe()}")
    for info in inventory:
        certificate = info.certificate
        print(f"[{info.slot.value}] {certificate.subject.rfc4514_string()}")
        print(f"  issuer:   {certificate.issuer.rfc4514_string()}")
        print(f"  validity: {certificate.not_valid_before_utc:%Y-%m-%d} .. {certificate.not_valid_after_utc:%Y-%m-%d}")
        print(f"  SHA-256:  {fingerprint(certificate)}")
        print(f"  SHA-1:    {fingerprint(certificate, 'sha1')}")
        print(f"  key:      {info.key_type} ({'HSM' if info.hardware else 'software'}), version {info.version}")
    return 0


def _load_certificate(data: bytes) -> x509.Certificate:
    if b"-----BEGIN" in data:
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


# --- doctor, intune ---


def _doctor(args) -> int:
    from scep.tools.doctor import run_doctor

    return _print_findings(run_doctor())


def _intune_check(args) -> int:
    from scep.azure.intune.check import run_check

    settings = config.load_settings()
    return _print_findings(run_check(config.build_intune_client(settings)).lines)


def _intune_revocations(args) -> int:
    from scep.azure.intune.revocation import run_cycle
    from scep.core import revocation

    settings = config.load_settings(for_serving=False)
    if "intune" not in settings.modes:
        raise config.ConfigError("SCEP_CHALLENGE_MODE", "must include intune for Intune's revocation requests")
    client = config.build_intune_client(settings)
    try:
        store, home = config.build_store(settings), config.build_key_home(settings)
        validity = settings.service.options.crl_validity
        report = run_cycle(client, store, lambda: revocation.publish_now(store, home, validity))
    finally:
        client.close()
    if not report.ran:
        print("another instance is running the cycle now; nothing done")
        return 0
    print(f"downloaded {report.downloaded} revocation requests")
    for result in report.results:
        outcome = "revoked" if result.succeeded else f"error {result.error_code}: {result.error_message}"
        print(f"  {result.context}: {outcome}")
    for serial in report.revoked:
        print(f"{serial_hex(serial)} revoked")
    print(f"reported to Intune: {'yes' if report.reported else 'no'}")
    if report.crl_published is not None:
        print(f"CRL published: {'yes' if report.crl_published else 'no (the next scheduled publication lists it)'}")
    for problem in report.problems:
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if report.problems else 0


def _print_findings(findings: Iterable[Finding]) -> int:
    """One line per finding as it comes ("[ok] step: message"); exit status 1 when any of them failed."""
    failed = False
    for finding in findings:
        failed = failed or not finding.ok
        step = f"{finding.step}: " if finding.step else ""
        print(f"[{finding.status.value}] {step}{finding.message}", flush=True)
    return 1 if failed else 0


def _intune_grant(args) -> int:
    from scep.azure.intune.grant import GrantError, GraphApi, grant_intune_roles

    # Only the Graph URL and the credential matter here, not the app's other settings.
    settings = config.load_settings(for_serving=False)
    api = GraphApi(config.build_credential(settings), settings.intune.client.graph_url)
    try:
        lines = grant_intune_roles(
            api, principal_id=args.principal_id, client_id=args.client_id, wait_seconds=args.wait
        )
    except GrantError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
