"""Revocation benchmark: cached OCSP answers per second and their p99 latency at a given concurrency against
`scep serve` on loopback, the CPU time of a CRL with 100,000 entries, and key operations per OCSP answer and per
CRL counted through a counting key handle. Never a timed test; see bench/README.md.

    python -m bench.revocation [-n 20000] [--concurrency 8] [--devices 20] [--crl-entries 100000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from bench.loadgen import percentile, run_load
from bench.servers import REPO_ROOT, ProductServer
from scep.core.issuer import random_serial
from scep.core.ocsp import Authority, OcspResponder, home_authorities
from scep.core.revocation import build_crl
from scep.keys import KeyHandle, KeyTransport, SignaturePadding
from scep.keys.local import LocalHome
from scep.store import Revocation, RevocationReason
from scep.store.sqlite import SqliteStore

CHALLENGE = "bench-revocation"
OCSP_GOAL_PER_SECOND = 2000
CRL_GOAL_CPU_SECONDS = 2.0


@dataclass
class CountingKey:
    """A KeyHandle that counts the signatures it makes (each is one vault operation with Key Vault custody)."""

    key: KeyHandle
    signatures: int = field(default=0)

    @property
    def certificate(self) -> x509.Certificate:
        return self.key.certificate

    def sign_digest(
        self, digest: bytes, hash_name: str, padding: SignaturePadding = SignaturePadding.PKCS1V15
    ) -> bytes:
        self.signatures += 1
        return self.key.sign_digest(digest, hash_name, padding)

    def unwrap_key(self, wrapped_key: bytes, transport: KeyTransport) -> bytes:
        return self.key.unwrap_key(wrapped_key, transport)


def enroll_devices(server: ProductServer, count: int, directory: Path) -> list[x509.Certificate]:
    devices = []
    for index in range(count):
        out = directory / f"device-{index}"
        subprocess.run(
            [sys.executable, "-m", "scep.tools.cli", "enroll", "--url", server.scep_url, "--challenge", CHALLENGE,
             "--cn", f"bench-ocsp-{index}", "--out", str(out)],
            cwd=REPO_ROOT, env=server.environment(), check=True, capture_output=True,
        )
        devices.append(x509.load_pem_x509_certificate(out.with_suffix(".pem").read_bytes()))
    return devices


def ocsp_requests(devices: list[x509.Certificate], ca: x509.Certificate) -> list[bytes]:
    """One nonce-free SHA-1 request per device, as Windows and openssl send them by default (cacheable)."""
    return [
        ocsp.OCSPRequestBuilder().add_certificate(device, ca, hashes.SHA1()).build().public_bytes(
            serialization.Encoding.DER
        )
        for device in devices
    ]


def measure_ocsp_http(server: ProductServer, requests: list[bytes], total: int, concurrency: int) -> dict:
    url = server.base_url + "/api/ocsp"
    run_load(url, requests * 2, concurrency)  # warm-up: every answer signed once and cached in every worker
    bodies = [requests[index % len(requests)] for index in range(total)]
    run = run_load(url, bodies, concurrency)
    good = [e for e in run.exchanges if e.status == 200 and e.content_type == "application/ocsp-response"]
    successful = sum(
        ocsp.load_der_ocsp_response(e.body).response_status is ocsp.OCSPResponseStatus.SUCCESSFUL for e in good
    )
    latencies = [e.latency for e in good]
    return {
        "requests": total,
        "successful": successful,
        "wall_seconds": round(run.wall_seconds, 3),
        "responses_per_second": round(len(good) / run.wall_seconds, 1),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "loadgen_cpu_seconds": round(run.cpu_seconds, 2),
    }


def measure_ocsp_key_operations(data_dir: Path, requests: list[bytes], rounds: int) -> dict:
    """Signatures per answer from a responder in this process, over the server's own store and keys."""
    home, store = LocalHome(data_dir), SqliteStore(data_dir / "scep.db")
    counted: list[CountingKey] = []

    def counting_authorities() -> list[Authority]:
        authorities = []
        for authority in home_authorities(home):
            signer = CountingKey(authority.signer)
            counted.append(signer)
            authorities.append(Authority(authority.ca, signer))
        return authorities

    responder = OcspResponder(store, counting_authorities)
    answers = 0
    for _ in range(rounds):
        for request in requests:
            assert responder.respond(request).status == "successful"
            answers += 1
    signatures = sum(key.signatures for key in counted)
    return {"answers": answers, "signatures": signatures, "signatures_per_answer": round(signatures / answers, 4)}


def measure_crl(data_dir: Path, entries: int) -> dict:
    ca = CountingKey(LocalHome(data_dir).keys().ca)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    revocations = [
        Revocation(random_serial(), now - timedelta(seconds=index % 86400), RevocationReason.KEY_COMPROMISE)
        for index in range(entries)
    ]
    cpu_before, wall_before = time.process_time(), time.perf_counter()
    crl = build_crl(ca, revocations, 1, now)
    cpu, wall = time.process_time() - cpu_before, time.perf_counter() - wall_before
    return {
        "entries": entries,
        "cpu_seconds": round(cpu, 3),
        "wall_seconds": round(wall, 3),
        "bytes": len(crl.public_bytes(serialization.Encoding.DER)),
        "signatures": ca.signatures,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.revocation", description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20000, help="timed OCSP requests [20000]")
    parser.add_argument("--concurrency", type=int, default=8, help="client connections [8]")
    parser.add_argument("--devices", type=int, default=20, help="certificates asked about [20]")
    parser.add_argument("--workers", type=int, default=2, help="workers of scep serve [2]")
    parser.add_argument("--crl-entries", type=int, default=100_000, help="revoked entries in the CRL [100000]")
    args = parser.parse_args(argv)

    with ProductServer(2048, CHALLENGE, args.workers) as server:
        devices = enroll_devices(server, args.devices, server.workdir)
        ca = x509.load_pem_x509_certificate((server.data_dir / "ca.pem").read_bytes())
        requests = ocsp_requests(devices, ca)
        http = measure_ocsp_http(server, requests, args.n, args.concurrency)
        data_dir = server.data_dir
        key_operations = measure_ocsp_key_operations(data_dir, requests, rounds=50)
        crl = measure_crl(data_dir, args.crl_entries)

    print(f"OCSP over HTTP, cached, concurrency {args.concurrency}, {args.workers} workers: "
          f"{http['responses_per_second']} responses/s, p50 {http['p50_ms']} ms, p99 {http['p99_ms']} ms "
          f"({http['successful']}/{http['requests']} successful; goal {OCSP_GOAL_PER_SECOND}/s: "
          f"{'met' if http['responses_per_second'] >= OCSP_GOAL_PER_SECOND else 'missed'})")
    print(f"OCSP key operations: {key_operations['signatures']} signatures for {key_operations['answers']} answers "
          f"({key_operations['signatures_per_answer']} per answer; one per certificate per cache window)")
    print(f"CRL of {crl['entries']} entries: {crl['cpu_seconds']} s CPU ({crl['wall_seconds']} s wall), "
          f"{crl['bytes']} bytes, {crl['signatures']} key operation(s) (goal {CRL_GOAL_CPU_SECONDS} s CPU: "
          f"{'met' if crl['cpu_seconds'] < CRL_GOAL_CPU_SECONDS else 'missed'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
