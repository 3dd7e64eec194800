"""`scep certs list|show|revoke`: the admin API's operations (scep/http/admin_api.py) from the command line, on the
store the settings select (SQLite in SCEP_DATA_DIR, or Azure Tables), as the server would."""

from __future__ import annotations

import argparse
import json
import sys

from scep import config
from scep.http import admin_api
from scep.store import Store, UnknownSerial


def add_certs_parser(commands) -> None:
    certs = commands.add_parser("certs", help="issued certificates: list, show, revoke (local store or Azure Tables)")
    certs_commands = certs.add_subparsers(title="certs commands")

    listing = certs_commands.add_parser("list", help="the inventory, filtered")
    listing.add_argument("--subject", help="subjects starting with this (RFC 4514), e.g. CN=device-")
    listing.add_argument("--status", type=_status, help="issued, confirming, undelivered or revoked")
    listing.add_argument("--expiring-within", type=_days, metavar="DAYS", help="expiring within DAYS days")
    listing.add_argument("--limit", type=int, default=admin_api.DEFAULT_PAGE_SIZE, help="page size (100)")
    listing.add_argument("--page", help="the nextPage token of the previous page")
    listing.add_argument("--json", action="store_true", help="the API's JSON instead of a table")
    listing.set_defaults(run=_list)

    show = certs_commands.add_parser("show", help="one certificate by serial")
    show.add_argument("--serial", required=True, type=_serial, help="hex, as openssl x509 -serial prints it")
    show.set_defaults(run=_show)

    revoke = certs_commands.add_parser("revoke", help="revoke by serial; publishes a new CRL")
    revoke.add_argument("--serial", required=True, type=_serial, help="hex, as openssl x509 -serial prints it")
    revoke.add_argument("--reason", required=True, type=_reason, help="RFC 5280 reason, e.g. keyCompromise")
    revoke.set_defaults(run=_revoke)


def _argument(parse):
    def convert(text: str):
        try:
            return parse(text)
        except admin_api.BadInput as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return convert


_serial = _argument(admin_api.parse_serial)
_reason = _argument(admin_api.parse_reason)
_status = _argument(admin_api.parse_status)
_days = _argument(lambda text: admin_api.parse_count("--expiring-within", text, 0, admin_api.MAX_DAYS))


def _settings() -> config.Settings:
    return config.load_settings(for_serving=False)


def _store() -> Store:
    return config.build_store(_settings())


def _list(args) -> int:
    wanted = admin_api.InventoryFilter(args.subject, args.status, args.expiring_within, args.limit, args.page)
    page = admin_api.list_certificates(_store(), wanted)
    if args.json:
        print(json.dumps(page, indent=2))
        return 0
    for item in page["items"]:
        print(f"{item['serial']}  {item['status']:<11}  {item['notAfter'][:10]}  {item['subject']}")
    if page["nextPage"]:
        print(f"more: --page {page['nextPage']}")
    return 0


def _show(args) -> int:
    try:
        print(json.dumps(admin_api.show_certificate(_store(), args.serial), indent=2))
    except UnknownSerial as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _revoke(args) -> int:
    try:
        settings = _settings()
        store, home = config.build_store(settings), config.build_key_home(settings)
        result = admin_api.revoke_certificate(
            store, home, args.serial, args.reason, settings.service.options.crl_validity
        )
    except UnknownSerial as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    when = "was already revoked" if result["alreadyRevoked"] else "revoked"
    print(f"{result['serial']} {when} at {result['revokedAt']} ({result['reason']})")
    return 0
