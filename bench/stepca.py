"""step-ca (smallstep/certificates 0.19) as a benchmark peer, built from Debian's Go sources.

Debian packages the library (`golang-github-smallstep-certificates-dev`, with every Go dependency in GOPATH layout
under /usr/share/gocode) but not the `step-ca` command. The benchmark writes the few lines of `main` that
upstream's cmd/step-ca/main.go has (a urfave/cli app running `commands.AppCommand`, with the software KMS and
CAS linked in) into its cache directory and builds it there in GOPATH mode. Nothing is installed.

The CA it runs: an RSA root and intermediate made with openssl (the intermediate also decrypts and signs the
SCEP messages, so it has digitalSignature and keyEncipherment), a badger database, one SCEP provisioner with
the benchmark's challenge and AES-128-CBC replies, HTTPS and plain HTTP both on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.servers import ManagedServer, free_port, run_setup

GO_BINARY = "go"
GO_SOURCE_ROOT = Path("/usr/share/gocode")
CERTIFICATES_PACKAGE = "github.com/smallstep/certificates"
APT_PACKAGES = ("golang-go", "golang-github-smallstep-certificates-dev")
MAIN_PACKAGE = "scep-bench-step-ca"
PROVISIONER = "bench"
# The provisioner's reply cipher, numbered as in github.com/mozilla-services/pkcs7 (authority/provisioner/scep.go):
# 0 DES-CBC (the default), 1 AES-128-CBC, 2 AES-256-CBC, 3 AES-128-GCM, 4 AES-256-GCM.
AES_128_CBC = 1
CERTIFICATE_DAYS = 2

MAIN_GO = """\
// step-ca's command, as upstream's cmd/step-ca/main.go sets it up; written by the SCEP benchmark.
package main

import (
	"fmt"
	"os"

	_ "github.com/smallstep/certificates/cas/softcas"
	"github.com/smallstep/certificates/commands"
	_ "github.com/smallstep/certificates/kms/softkms"
	"github.com/urfave/cli"
)

func main() {
	app := cli.NewApp()
	app.Name = "step-ca"
	app.HelpName = "step-ca"
	app.Usage = "an online certificate authority"
	app.Flags = commands.AppCommand.Flags
	app.Action = commands.AppCommand.Action
	if err := app.Run(os.Args); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
"""

INTERMEDIATE_EXTENSIONS = """\
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, digitalSignature, keyEncipherment, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def toolchain_problem(go: str = GO_BINARY, source_root: Path = GO_SOURCE_ROOT) -> str | None:
    """Why step-ca cannot be built here, or None when it can."""
    install = f"install Debian's {' and '.join(APT_PACKAGES)}"
    if shutil.which(go) is None:
        return f"step-ca: the Go toolchain ('{go}') is not installed; {install}"
    if not (source_root / "src" / CERTIFICATES_PACKAGE / "commands").is_dir():
        return f"step-ca: the sources of {CERTIFICATES_PACKAGE} are not under {source_root}; {install}"
    return None


def build(cache_dir: Path, source_root: Path = GO_SOURCE_ROOT) -> Path:
    """Write main.go and build step-ca into `cache_dir`/step-ca (Go's build cache there too: reruns are quick)."""
    gopath = Path(cache_dir).resolve() / "step-ca"
    source = gopath / "src" / MAIN_PACKAGE / "main.go"
    source.parent.mkdir(parents=True, exist_ok=True)
    if not source.exists() or source.read_text() != MAIN_GO:
        source.write_text(MAIN_GO)
    binary = gopath / "bin" / "step-ca"
    binary.parent.mkdir(exist_ok=True)
    environment = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": f"{gopath}:{source_root}",
        "CGO_ENABLED": "0",
        "GOFLAGS": "",
        "GOCACHE": str(gopath / "go-build"),
    }
    # Built under a temporary name and renamed: a concurrent run never executes a half-written binary.
    temporary = binary.with_name(f"step-ca.tmp{os.getpid()}")
    print(f"building step-ca into {binary} (about 30 s the first time) ...", file=sys.stderr, flush=True)
    run_setup([GO_BINARY, "build", "-o", str(temporary), MAIN_PACKAGE], environment, "step-ca build")
    os.replace(temporary, binary)
    return binary


def version() -> str:
    """The Debian version of the smallstep/certificates sources and the Go toolchain, or "not installed"."""
    if toolchain_problem() is not None:
        return "not installed"
    package = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", APT_PACKAGES[1]], capture_output=True, text=True, timeout=30
    )
    go = subprocess.run([GO_BINARY, "version"], capture_output=True, text=True, timeout=30)
    return f"smallstep/certificates {package.stdout.strip() or 'unknown'}, {go.stdout.strip()}"


@dataclass(frozen=True)
class StepCaPki:
    root_certificate: Path
    certificate: Path
    key: Path
    password_file: Path


def make_pki(directory: Path, key_size: int, environment: dict[str, str]) -> StepCaPki:
    """An RSA root and an intermediate (its key encrypted with a random password) made with openssl."""
    pki = StepCaPki(directory / "root.crt", directory / "intermediate.crt", directory / "intermediate.key",
                    directory / "password")  # fmt: skip
    descriptor = os.open(pki.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_urlsafe(24))
    root_key, request, extensions = directory / "root.key", directory / "intermediate.csr", directory / "int.ext"
    extensions.write_text(INTERMEDIATE_EXTENSIONS)
    days = str(CERTIFICATE_DAYS)
    commands = [
        ["openssl", "req", "-x509", "-newkey", f"rsa:{key_size}", "-noenc", "-keyout", str(root_key),
         "-out", str(pki.root_certificate), "-subj", "/CN=SCEP benchmark step-ca root", "-days", days,
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["openssl", "req", "-newkey", f"rsa:{key_size}", "-passout", f"file:{pki.password_file}",
         "-keyout", str(pki.key), "-out", str(request), "-subj", "/CN=SCEP benchmark step-ca intermediate"],
        ["openssl", "x509", "-req", "-in", str(request), "-CA", str(pki.root_certificate), "-CAkey", str(root_key),
         "-set_serial", str(secrets.randbits(63)), "-days", days, "-extfile", str(extensions),
         "-out", str(pki.certificate)],
    ]  # fmt: skip
    for command in commands:
        run_setup(command, environment, "step-ca PKI")
    return pki


def configuration(pki: StepCaPki, tls_port: int, http_port: int, challenge: str, database: Path) -> dict:
    """ca.json: loopback listeners only, a badger database and the one SCEP provisioner."""
    return {
        "root": str(pki.root_certificate),
        "crt": str(pki.certificate),
        "key": str(pki.key),
        "address": f"127.0.0.1:{tls_port}",
        "insecureAddress": f"127.0.0.1:{http_port}",
        "dnsNames": ["127.0.0.1"],
        "db": {"type": "badgerv2", "dataSource": str(database)},
        "authority": {
            "provisioners": [
                {
                    "type": "SCEP",
                    "name": PROVISIONER,
                    "challenge": challenge,
                    "forceCN": True,
                    "minimumPublicKeyLength": 2048,
                    "encryptionAlgorithmIdentifier": AES_128_CBC,
                }
            ]
        },
    }


class StepCaServer(ManagedServer):
    """step-ca with a fresh PKI and database. SCEP clients use its plain-HTTP listener (`insecureAddress`).

    It has no GET PKIOperation and no retransmission memory (a resent request gets a new certificate): the load
    generator POSTs each request once."""

    name = "step-ca"
    scep_path = f"/scep/{PROVISIONER}"

    def __init__(self, key_size: int, challenge: str, binary: Path) -> None:
        super().__init__(key_size, challenge)
        self.binary = binary
        self.tls_port = free_port()
        self.config_path = self.workdir / "ca.json"
        self.pki: StepCaPki | None = None

    def environment(self) -> dict[str, str]:
        # step-ca keeps its contexts and defaults under $STEPPATH (default ~/.step): keep them in the workdir.
        return {**super().environment(), "STEPPATH": str(self.workdir / "step")}

    def initialize(self) -> None:
        self.pki = make_pki(self.workdir, self.key_size, self.environment())
        document = configuration(self.pki, self.tls_port, self.port, self.challenge, self.workdir / "db")
        self.config_path.write_text(json.dumps(document, indent=2) + "\n")

    def command(self) -> list[str]:
        assert self.pki is not None
        # urfave/cli (v1) reads flags only before the first argument.
        return [str(self.binary), "--password-file", str(self.pki.password_file), str(self.config_path)]

    def ready_url(self) -> str:
        return self.scep_url + "?operation=GetCACaps"
