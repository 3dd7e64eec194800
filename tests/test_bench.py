"""Smoke tests of the benchmark (bench/): the load generator counts what the servers really answered.

Tiny request counts, no timing assertions: they check that successes, refusals, transport errors and
duplicate serial numbers are counted right, against the product's server and (when installed) the peers,
micromdm's scepserver and step-ca (built from Debian's Go sources when the Go toolchain is installed). CPU time
is checked with processes that burn a set amount of CPU, never with how long a server run took.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bench import compare, loadgen, measure, servers, stepca
from tests.interop import require_binary
from tests.serverproc import ScepServer, free_port

CHALLENGE = "bench smoke challenge"
REQUESTS = 6
WARMUP = 2
REFUSED = 3  # keys never enrolled: a transactionID the server has seen is answered with its certificate again
STEP_CA_MISSING = stepca.toolchain_problem()
BURN_SECONDS = 0.2
# A process tree that burns CPU when told to: a child that exits (and is reaped), a child that stays alive, and the
# root itself, each BURN_SECONDS of CPU time (not of wall time: a busy machine only makes it slower).
BURNER = f"""
import subprocess, sys, time

def burn():
    end = time.process_time() + {BURN_SECONDS}
    while time.process_time() < end:
        pass

if sys.argv[1:] == ["reaped"]:
    burn()
elif sys.argv[1:] == ["alive"]:
    burn()
    print("burnt", flush=True)
    sys.stdin.read()
else:
    sys.stdin.readline()
    subprocess.run([sys.executable, __file__, "reaped"], check=True)
    alive = subprocess.Popen([sys.executable, __file__, "alive"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    alive.stdout.readline()
    burn()
    print("done", flush=True)
    sys.stdin.read()
    alive.stdin.close()
    alive.wait()
"""


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench-keys")


@pytest.fixture(scope="module")
def key_ders(cache_dir: Path) -> list[bytes]:
    return loadgen.KeyCache(cache_dir).key_ders(REQUESTS + WARMUP + REFUSED)


@pytest.fixture(scope="module")
def product_server():
    with ScepServer(env={"SCEP_CHALLENGE": CHALLENGE}, workers=2) as server:
        yield server


def test_key_cache_reuses_the_keys_it_generated(cache_dir: Path, key_ders: list[bytes]) -> None:
    again = loadgen.KeyCache(cache_dir).key_ders(REQUESTS + WARMUP + REFUSED)
    assert again == key_ders
    assert len(set(key_ders)) == len(key_ders)


def test_every_enrollment_is_counted_and_verified(product_server: ScepServer, key_ders: list[bytes]) -> None:
    report = loadgen.benchmark(
        product_server.scep_url,
        key_ders[:REQUESTS],
        CHALLENGE,
        concurrency=3,
        warmup_key_ders=key_ders[REQUESTS : REQUESTS + WARMUP],
        label="smoke",
    )
    assert report.requests == REQUESTS
    assert report.successes == REQUESTS, report.error_samples
    assert report.errors == 0 and report.errors_by_kind == {}
    assert report.duplicate_serials == 0
    assert report.warmup_requests == WARMUP and report.warmup_errors == 0
    assert report.enrollments_per_second > 0
    assert 0 < report.p50_ms <= report.p99_ms <= report.max_ms
    assert report.connections_opened >= 1


def test_refused_enrollments_count_as_failure_replies(product_server: ScepServer, key_ders: list[bytes]) -> None:
    refused = key_ders[REQUESTS + WARMUP :]
    report = loadgen.benchmark(product_server.scep_url, refused, "not the challenge", concurrency=2, label="bad")
    assert report.successes == 0
    assert report.errors_by_kind == {loadgen.FAILURE_REPLY: REFUSED}
    assert report.enrollments_per_second == 0


def test_replies_to_other_requests_do_not_verify(product_server: ScepServer, key_ders: list[bytes]) -> None:
    ra, ca = loadgen.ScepClient(product_server.scep_url).ca_certificates()
    prepared = loadgen.prepare_requests(key_ders[:2], ra, CHALLENGE, "swap")
    run = loadgen.run_load(product_server.scep_url, [request.body for request in prepared], concurrency=1)
    swapped = [run.exchanges[1], run.exchanges[0]]
    outcomes = loadgen.judge_replies(prepared, swapped, ra, ca)
    assert [outcome.kind for outcome in outcomes] == [loadgen.UNPARSABLE, loadgen.UNPARSABLE]


def test_a_server_that_is_not_there_gives_transport_errors() -> None:
    run = loadgen.run_load(f"http://127.0.0.1:{free_port()}/api/scep", [b"x", b"y", b"z"], concurrency=2)
    assert [exchange.status for exchange in run.exchanges] == [0, 0, 0]
    assert all(exchange.error for exchange in run.exchanges)


def test_http_errors_are_counted_apart() -> None:
    exchange = loadgen.Exchange(500, "text/plain", b"boom", 0.01)
    outcome = loadgen._judge_one((None, exchange, b"", b""))  # type: ignore[arg-type]
    assert outcome.kind == loadgen.HTTP_ERROR


def test_duplicate_serials_and_percentiles() -> None:
    assert loadgen.duplicate_serials([1, 2, 3]) == 0
    assert loadgen.duplicate_serials([7, 7, 7, 8, 8]) == 3
    assert loadgen.percentile([], 0.5) == 0.0
    values = [float(value) for value in range(1, 101)]
    assert loadgen.percentile(values, 0.50) == 50.0
    assert loadgen.percentile(values, 0.99) == 99.0
    assert loadgen.percentile([3.0], 0.99) == 3.0


def test_memory_of_the_server_tree_is_measured(product_server: ScepServer) -> None:
    assert product_server.pid is not None
    with measure.TreeMemorySampler(product_server.pid, interval=0.05) as sampler:
        pass  # leaving samples once more, so there is at least one sample
    assert sampler.peak_processes == 3  # the supervisor and its two workers
    assert sampler.peak_rss_bytes > sampler.peak_pss_bytes > 0


def test_cpu_of_a_process_tree_counts_live_and_reaped_children(tmp_path: Path) -> None:
    script = tmp_path / "burner.py"
    script.write_text(BURNER)
    with subprocess.Popen(
        [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as root:
        assert root.stdin is not None and root.stdout is not None
        sampler = measure.TreeMemorySampler(root.pid)
        with sampler.timed_phase():
            root.stdin.write("go\n")
            root.stdin.flush()
            assert root.stdout.readline() == "done\n"
        sampler.sample()
        root.stdin.close()
    assert sampler.peak_processes == 2  # the root and its live child
    # Three burns; the clock ticks (1/100 s) that /proc reports in round each of them down by at most one tick.
    assert sampler.timed_cpu_seconds >= 3 * (BURN_SECONDS - 0.01)


def test_micromdm_replies_are_read_and_counted(key_ders: list[bytes]) -> None:
    require_binary(servers.MICROMDM_BINARY)
    # Concurrency 1: micromdm's file depot hands out serial numbers racily under concurrent requests.
    with servers.MicromdmServer(2048, CHALLENGE) as server:
        report = loadgen.benchmark(server.scep_url, key_ders[:3], CHALLENGE, concurrency=1, label="mdm-smoke")
    assert report.successes == 3, report.error_samples
    assert report.errors == 0 and report.duplicate_serials == 0


def test_compare_command_writes_results(tmp_path: Path, cache_dir: Path) -> None:
    # step-ca is left out here: its build would start from an empty cache in this test's directory.
    require_binary(servers.MICROMDM_BINARY)
    kinds = ["product", "micromdm"]
    argv = ["-n", "3", "--warmup", "1", "--concurrency", "1", "--workers", "1", "--challenge", CHALLENGE]
    argv += ["--servers", *kinds, "--cache-dir", str(cache_dir), "--results-dir", str(tmp_path), "--rounds", "2"]
    assert compare.main(argv) == 0
    [written] = tmp_path.glob("compare-*.json")
    document = json.loads(written.read_text())
    assert [(run["round"], run["server"]) for run in document["runs"]] == [(1, "product"), (1, "micromdm"),
                                                                          (2, "product"), (2, "micromdm")]
    assert [(run["server"], run["rounds"]) for run in document["combined"]] == [("product", 2), ("micromdm", 2)]
    product = document["combined"][0]
    assert product["successes"] == 6 and product["errors"] == 0
    assert product["peak_rss_mib"] > 0
    floor = document["rsa_floor"]
    assert floor["key_size"] == 2048 and floor["enrollment_ms"] == floor["decrypt_ms"] + 2 * floor["sign_ms"]
    cpu_ms = product["server_cpu_ms_per_enrollment"]
    assert product["rsa_floor_multiple"] == pytest.approx(cpu_ms / floor["enrollment_ms"])
    assert document["machine"]["nproc"] >= 1
    [verdict] = document["verdicts"]  # step-ca is left out: the throughput target stays undetermined
    assert verdict["step_ca_ratio"] is None and verdict["targets_met"] is False
    assert verdict["rsa_floor_multiple"] == product["rsa_floor_multiple"]


def test_rounds_combine_into_medians_and_totals() -> None:
    def run(round_number: int, server: str, rate: float, errors: int) -> dict:
        return {"round": round_number, "server": server, "concurrency": 8, "enrollments_per_second": rate,
                "server_cpu_ms_per_enrollment": 1000 / rate, "requests": 10, "successes": 10 - errors,
                "errors": errors, "duplicate_serials": 0}

    runs = [run(1, "product", 300, 0), run(1, "step-ca", 200, 0), run(2, "product", 500, 1),
            run(2, "step-ca", 260, 0), run(3, "product", 400, 0), run(3, "step-ca", 100, 0)]
    product, step_ca = compare.combine_rounds(runs)
    assert (product["server"], product["rounds"], product["enrollments_per_second"]) == ("product", 3, 400)
    assert product["server_cpu_ms_per_enrollment"] == 1000 / 400
    assert (product["requests"], product["successes"], product["errors"]) == (30, 29, 1)
    assert (step_ca["server"], step_ca["enrollments_per_second"]) == ("step-ca", 200)


def test_fewer_than_one_round_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        compare.main(["--rounds", "0"])
    assert "--rounds must be at least 1" in capsys.readouterr().err


def test_the_rsa_floor_is_one_decryption_and_two_signatures() -> None:
    floor = measure.measure_rsa_floor(2048, operations=3, repeats=1)
    assert floor.decrypt_ms > 0 and floor.sign_ms > 0
    assert floor.enrollment_ms == floor.decrypt_ms + 2 * floor.sign_ms
    assert floor.multiple(3 * floor.enrollment_ms) == pytest.approx(3.0)
    assert "OpenSSL" in floor.library and "RSA-2048" in floor.describe()


def test_side_by_side_table_puts_the_servers_in_columns_with_ratios() -> None:
    def run(server: str, concurrency: int, rate: float, cpu_ms: float, errors: int = 0) -> dict:
        return {
            "server": server, "concurrency": concurrency, "enrollments_per_second": rate, "errors": errors,
            "duplicate_serials": 0, "server_cpu_ms_per_enrollment": cpu_ms, "rsa_floor_multiple": cpu_ms / 2,
            "peak_pss_mib": 50.0, "peak_rss_mib": 100.0,
        }  # fmt: skip

    runs = [run("product", 8, 300, 6), run("step-ca", 8, 150, 4), run("micromdm", 8, 100, 8, errors=7)]
    runs.append(run("product", 16, 310, 6))
    lines = compare.format_side_by_side(runs, (8, 16)).splitlines()
    assert lines[0].split() == ["c", "metric", "product", "step-ca", "micromdm", "product/step-ca", "product/micromdm"]
    assert lines[1].split() == ["8", "enrollments/s", "300.0", "150.0", "100.0", "2.00x", "3.00x"]
    assert lines[2].split() == ["8", "errors", "0", "0", "7"]
    assert lines[4].split() == ["8", "server", "CPU", "ms/enrollment", "6.00", "4.00", "8.00", "1.50x", "0.75x"]
    assert lines[5].split() == ["8", "multiple", "of", "the", "RSA", "floor", "3.0x", "2.0x", "4.0x"]
    # A level where only the product ran: the peers' cells and the ratios are dashes.
    assert lines[8].split() == ["16", "enrollments/s", "310.0", "-", "-", "-", "-"]


def test_a_missing_toolchain_is_reported_with_the_packages_to_install(tmp_path: Path) -> None:
    no_go = stepca.toolchain_problem(go="no-such-go-toolchain")
    no_sources = stepca.toolchain_problem(go=sys.executable, source_root=tmp_path)
    for problem in (no_go, no_sources):
        assert problem is not None and all(package in problem for package in stepca.APT_PACKAGES)
    assert "no-such-go-toolchain" in no_go and str(tmp_path) in no_sources


def test_compare_skips_a_peer_without_its_toolchain(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(stepca, "toolchain_problem", lambda: "step-ca: no Go here")
    assert compare.main(["--servers", "step-ca", "--results-dir", str(tmp_path)]) == 2
    assert "skipped: step-ca: no Go here" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_step_ca_configuration_listens_on_loopback_with_one_scep_provisioner() -> None:
    with contextlib.closing(stepca.StepCaServer(2048, CHALLENGE, Path("step-ca"))) as server:
        server.initialize()
        assert server.pki is not None
        config = json.loads(server.config_path.read_text())
        root = x509.load_pem_x509_certificate(server.pki.root_certificate.read_bytes())
        intermediate = x509.load_pem_x509_certificate(server.pki.certificate.read_bytes())
        password = server.pki.password_file.read_bytes()
        key = serialization.load_pem_private_key(server.pki.key.read_bytes(), password=password)
        command = server.command()
        expected_command = ["step-ca", "--password-file", str(server.pki.password_file), str(server.config_path)]
    assert config["address"] == f"127.0.0.1:{server.tls_port}"
    assert config["insecureAddress"] == f"127.0.0.1:{server.port}"
    assert server.scep_url == f"http://127.0.0.1:{server.port}/scep/{stepca.PROVISIONER}"
    assert config["db"]["type"] == "badgerv2"
    assert config["authority"]["provisioners"] == [
        {"type": "SCEP", "name": stepca.PROVISIONER, "challenge": CHALLENGE, "forceCN": True,
         "minimumPublicKeyLength": 2048, "encryptionAlgorithmIdentifier": 1},
    ]  # fmt: skip
    intermediate.verify_directly_issued_by(root)
    usage = intermediate.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment and usage.key_cert_sign
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    assert key.public_key() == intermediate.public_key()
    assert command == expected_command


@pytest.mark.skipif(STEP_CA_MISSING is not None, reason=str(STEP_CA_MISSING))
def test_step_ca_built_from_debian_sources_answers_and_enrols(key_ders: list[bytes]) -> None:
    settings = compare.Settings(
        requests=4, concurrency_levels=(2,), warmup=0, key_size=2048, device_key_size=2048, challenge=CHALLENGE,
        workers=1, servers=("step-ca",), time_limit=120,
    )  # fmt: skip
    # The default cache: the build is quick once Go's build cache there is warm.
    factories, skipped = compare.server_factories(settings, loadgen.DEFAULT_CACHE_DIR)
    assert skipped == []
    with factories["step-ca"]() as server:
        with urllib.request.urlopen(server.ready_url(), timeout=30) as response:
            capabilities = response.read().decode().split()
        report = loadgen.benchmark(server.scep_url, key_ders[:4], CHALLENGE, concurrency=2, label="step-ca-smoke")
    assert {"POSTPKIOperation", "AES", "SHA-256"} <= set(capabilities)
    assert report.successes == 4, report.error_samples
    assert report.errors == 0 and report.duplicate_serials == 0
