"""Smoke tests of the benchmark (bench/): the load generator counts what the servers really answered.

Tiny request counts, no timing assertions: they check that successes, refusals, transport errors and
duplicate serial numbers are counted right, against the product's server and (when installed) micromdm's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench import compare, loadgen
from tests.serverproc import ScepServer, free_port

CHALLENGE = "bench smoke challenge"
REQUESTS = 6
WARMUP = 2
REFUSED = 3  # keys never enrolled: a transactionID the server has seen is answered with its certificate again


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


def test_memory_and_cpu_of_the_server_tree_are_measured(product_server: ScepServer, key_ders: list[bytes]) -> None:
    assert product_server.pid is not None
    with compare.TreeMemorySampler(product_server.pid, interval=0.05) as sampler:
        loadgen.benchmark(
            product_server.scep_url, key_ders[:2], CHALLENGE, concurrency=2, timed_phase=sampler.timed_phase
        )
    assert sampler.peak_processes == 3  # the supervisor and its two workers
    assert sampler.peak_rss_bytes > sampler.peak_pss_bytes > 0
    assert sampler.timed_cpu_seconds > 0


@pytest.mark.skipif(shutil.which(compare.MICROMDM_BINARY) is None, reason="micromdm scepserver not installed")
def test_micromdm_replies_are_read_and_counted(key_ders: list[bytes]) -> None:
    # Concurrency 1: micromdm's file depot hands out serial numbers racily under concurrent requests.
    with compare.MicromdmServer(2048, CHALLENGE) as server:
        report = loadgen.benchmark(server.scep_url, key_ders[:3], CHALLENGE, concurrency=1, label="mdm-smoke")
    assert report.successes == 3, report.error_samples
    assert report.errors == 0 and report.duplicate_serials == 0


def test_compare_command_writes_results(tmp_path: Path, cache_dir: Path) -> None:
    servers = ["product", "micromdm"] if shutil.which(compare.MICROMDM_BINARY) else ["product"]
    argv = ["-n", "3", "--warmup", "1", "--concurrency", "1", "--workers", "1", "--challenge", CHALLENGE]
    argv += ["--servers", *servers, "--cache-dir", str(cache_dir), "--results-dir", str(tmp_path)]
    assert compare.main(argv) == 0
    [written] = tmp_path.glob("compare-*.json")
    document = json.loads(written.read_text())
    assert [run["server"] for run in document["runs"]] == servers
    product = document["runs"][0]
    assert product["successes"] == 3 and product["errors"] == 0
    assert product["peak_rss_mib"] > 0
    assert document["machine"]["nproc"] >= 1
    assert len(document["verdicts"]) == (1 if len(servers) == 2 else 0)
