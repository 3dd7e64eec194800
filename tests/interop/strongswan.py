"""Driving strongSwan's `pki --scepca` and `pki --scep` (shared by the interop and Azure end-to-end tests)."""

from __future__ import annotations

from pathlib import Path

from tests.serverproc import ScepServer

from . import run_client

POLL_OPTIONS = ["--interval", "1", "--maxpolltime", "20"]


def fetch_ca_certificates(pki: str, server: ScepServer, directory: Path):
    return run_client(
        [pki, "--scepca", "--url", server.scep_url,
         "--caout", directory / "ca.pem", "--raout", directory / "ra.pem", "--outform", "pem"],
        cwd=directory,
    )


def generate_key(pki: str, path: Path) -> None:
    result = run_client([pki, "--gen", "--type", "rsa", "--size", "2048", "--outform", "pem"])
    assert result.succeeded, result.describe()
    path.write_text(result.stdout)


def enrol(pki: str, server: ScepServer, ca_files: tuple[Path, Path], directory: Path, *extra):
    ca_pem, ra_pem = ca_files
    result = run_client(
        [pki, "--scep", "--url", server.scep_url,
         "--cacert-enc", ra_pem, "--cacert-sig", ca_pem, "--outform", "pem", *POLL_OPTIONS, *extra],
        cwd=directory,
    )
    if result.succeeded:
        (directory / "issued.pem").write_text(result.stdout)
    return result
