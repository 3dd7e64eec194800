"""Side-by-side enrollment benchmark on this machine: the product's server against two peers, step-ca
(smallstep/certificates, built from Debian's Go sources) and micromdm's scepserver.

For each concurrency level, a fresh product server (`scep serve`, one worker per CPU), then a fresh step-ca and
then a fresh micromdm `scepserver` (one at a time) get the same number of PKCSReqs, the same CA key size and the
same challenge. Before the runs it measures the RSA floor (the CPU time of the three RSA private-key operations
an enrollment needs, with the product's OpenSSL, on one core). The command prints a table per run, a side-by-side
table with the product/peer ratios and each server's CPU per enrollment as a multiple of the floor, whether the
product meets its targets at every level (at least 1.5x step-ca's enrollments/s, server CPU per enrollment at most
2x the RSA floor, no errors and no duplicate serial numbers), and writes the figures as JSON under
bench/results/. A peer whose toolchain is missing is skipped with a message.

    python -m bench.compare                      # defaults: -n 2000, concurrency 8 and 16, RSA-2048
    python -m bench.compare -n 300 --concurrency 8 --servers product step-ca
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from bench import loadgen, stepca
from bench.measure import RsaFloor, TreeMemorySampler, measure_rsa_floor
from bench.servers import MICROMDM_BINARY, REPO_ROOT, ManagedServer, MicromdmServer, ProductServer, micromdm_version

DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent / "results"
STEP_CA_RATIO_TARGET = 1.5  # product enrollments/s over step-ca's
RSA_FLOOR_MULTIPLE_TARGET = 2.0  # product server CPU per enrollment over the RSA floor
SERVER_KINDS = ("product", "step-ca", "micromdm")
PEERS = ("step-ca", "micromdm")
QUIET_LOAD_AVERAGE = 0.5

ServerFactory = Callable[[], ManagedServer]


# --- runs ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    requests: int
    concurrency_levels: tuple[int, ...]
    warmup: int
    key_size: int
    device_key_size: int
    challenge: str
    workers: int
    servers: tuple[str, ...]
    time_limit: float
    rounds: int = 1


def server_factories(settings: Settings, cache_dir: Path) -> tuple[dict[str, ServerFactory], list[str]]:
    """How to start each requested server whose toolchain is here (step-ca is built now, into `cache_dir`), and
    why the others are skipped."""
    factories: dict[str, ServerFactory] = {}
    skipped = []
    for kind in settings.servers:
        problem = _missing_toolchain(kind)
        if problem is None:
            factories[kind] = _factory(kind, settings, cache_dir)
        else:
            skipped.append(problem)
    return factories, skipped


def _missing_toolchain(kind: str) -> str | None:
    if kind == "step-ca":
        return stepca.toolchain_problem()
    if kind == "micromdm" and shutil.which(MICROMDM_BINARY) is None:
        return f"micromdm: {MICROMDM_BINARY} is not installed; install Debian's scep package"
    return None


def _factory(kind: str, settings: Settings, cache_dir: Path) -> ServerFactory:
    if kind == "product":
        return lambda: ProductServer(settings.key_size, settings.challenge, settings.workers)
    if kind == "micromdm":
        return lambda: MicromdmServer(settings.key_size, settings.challenge)
    binary = stepca.build(cache_dir)
    return lambda: stepca.StepCaServer(settings.key_size, settings.challenge, binary)


def run_one(
    server: ManagedServer,
    concurrency: int,
    settings: Settings,
    keys: list[bytes],
    warmup_keys: list[bytes],
    rsa_floor: RsaFloor,
) -> dict:
    kind = server.name
    with server, TreeMemorySampler(server.pid) as memory:
        report = loadgen.benchmark(
            server.scep_url,
            keys,
            settings.challenge,
            concurrency,
            warmup_key_ders=warmup_keys,
            label=f"{kind}-c{concurrency}",
            time_limit=settings.time_limit,
            timed_phase=memory.timed_phase,
        )
    cpu_ms_per_enrollment = 1000 * memory.timed_cpu_seconds / max(1, report.successes)
    result = report.to_dict()
    result.update(
        server=kind,
        replies_per_second=_answered(report) / report.wall_seconds if report.wall_seconds > 0 else 0.0,
        peak_rss_mib=memory.peak_rss_bytes / 2**20,
        peak_pss_mib=memory.peak_pss_bytes / 2**20,
        peak_processes=memory.peak_processes,
        server_cpu_seconds=memory.timed_cpu_seconds,
        # CPU that neither the server nor the load generator used: other work on the machine, skewing the run.
        other_cpu_seconds=max(
            0.0, memory.timed_machine_busy_seconds - memory.timed_cpu_seconds - report.loadgen_cpu_seconds
        ),
        server_cpu_ms_per_enrollment=cpu_ms_per_enrollment,
        rsa_floor_multiple=rsa_floor.multiple(cpu_ms_per_enrollment),
        server_cpu_utilization=memory.timed_cpu_seconds / report.wall_seconds / (os.cpu_count() or 1)
        if report.wall_seconds > 0
        else 0.0,
    )
    return result


def _answered(report: loadgen.Report) -> int:
    return report.requests - report.errors_by_kind.get(loadgen.TRANSPORT_ERROR, 0)


# Over several rounds: the median of each rate, latency, CPU and memory figure, and the sum of each count (an error or
# a repeated serial in any round counts).
_MEDIAN_KEYS = (
    "enrollments_per_second", "unique_enrollments_per_second", "replies_per_second", "p50_ms", "p99_ms",
    "peak_rss_mib", "peak_pss_mib", "server_cpu_ms_per_enrollment", "rsa_floor_multiple", "server_cpu_utilization",
    "loadgen_cpu_seconds", "other_cpu_seconds",
)  # fmt: skip
_SUM_KEYS = ("requests", "successes", "errors", "duplicate_serials")


def combine_rounds(runs: list[dict]) -> list[dict]:
    """One run per concurrency level and server, in the order they first ran, with the medians and sums over its
    rounds (`rounds` says how many; over one round, that run's own figures)."""
    groups: dict[tuple[int, str], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["concurrency"], run["server"]), []).append(run)
    combined = []
    for group in groups.values():
        merged = dict(group[-1], rounds=len(group))
        merged.update({key: statistics.median(run[key] for run in group) for key in _MEDIAN_KEYS if key in merged})
        merged.update({key: sum(run[key] for run in group) for key in _SUM_KEYS if key in merged})
        combined.append(merged)
    return combined


def compare(runs: list[dict], concurrency_levels: tuple[int, ...]) -> list[dict]:
    """Per concurrency level with a product run: the product against its targets (step-ca's rate is needed for the
    throughput target; without a step-ca run it stays undetermined)."""
    verdicts = []
    for concurrency in concurrency_levels:
        by_server = {run["server"]: run for run in runs if run["concurrency"] == concurrency}
        product, step_ca = by_server.get("product"), by_server.get("step-ca")
        if product is None:
            continue
        clean = product["errors"] == 0 and product["duplicate_serials"] == 0
        ratio = None
        if step_ca is not None and step_ca["successes"] > 0:
            ratio = _ratio(product["enrollments_per_second"], step_ca["enrollments_per_second"])
        verdicts.append(
            {
                "concurrency": concurrency,
                "step_ca_ratio": ratio,
                "rsa_floor_multiple": product["rsa_floor_multiple"],
                "product_clean": clean,
                "targets_met": (
                    clean
                    and ratio is not None
                    and ratio >= STEP_CA_RATIO_TARGET
                    and product["rsa_floor_multiple"] <= RSA_FLOOR_MULTIPLE_TARGET
                ),
            }
        )
    return verdicts


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else float("inf")


# --- output --------------------------------------------------------------------------------------------------


def machine() -> dict:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "micromdm": micromdm_version(),
        "step-ca": stepca.version(),
        "product_commit": _product_commit(),
    }


def _product_commit() -> str:
    """The product's git commit (with "+changes" when the work tree differs), or "unknown" outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, timeout=30)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "scep"], cwd=REPO_ROOT, capture_output=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.decode().strip() + ("+changes" if dirty.stdout.strip() else "")


_COLUMNS = (
    ("round", "round", "{:>5}"),
    ("c", "concurrency", "{:>3}"),
    ("server", "server", "{:<9}"),
    ("enrol/s", "enrollments_per_second", "{:>8.1f}"),
    ("unique-serial enrol/s", "unique_enrollments_per_second", "{:>8.1f}"),
    ("replies/s", "replies_per_second", "{:>9.1f}"),
    ("p50 ms", "p50_ms", "{:>7.1f}"),
    ("p99 ms", "p99_ms", "{:>7.1f}"),
    ("ok", "successes", "{:>5}"),
    ("errors", "errors", "{:>6}"),
    ("dup serials", "duplicate_serials", "{:>11}"),
    ("RSS MiB", "peak_rss_mib", "{:>7.0f}"),
    ("PSS MiB", "peak_pss_mib", "{:>7.0f}"),
    ("server CPU ms/enrol", "server_cpu_ms_per_enrollment", "{:.1f}"),
    ("x RSA floor", "rsa_floor_multiple", "{:.1f}"),
    ("server CPU busy", "server_cpu_utilization", "{:.0%}"),
    ("loadgen CPU s", "loadgen_cpu_seconds", "{:.2f}"),
    ("other CPU s", "other_cpu_seconds", "{:.2f}"),
)


def format_table(runs: list[dict]) -> str:
    """One row per run, every figure."""
    cells = [[spec.format(run[key]).strip() for _, key, spec in _COLUMNS] for run in runs]
    return _aligned([title for title, _, _ in _COLUMNS], cells)


# Side by side: (title, run key, format, whether the product/peer ratio means something).
_SIDE_BY_SIDE_METRICS = (
    ("enrollments/s", "enrollments_per_second", "{:.1f}", True),
    ("errors", "errors", "{}", False),
    ("duplicate serials", "duplicate_serials", "{}", False),
    ("server CPU ms/enrollment", "server_cpu_ms_per_enrollment", "{:.2f}", True),
    ("multiple of the RSA floor", "rsa_floor_multiple", "{:.1f}x", False),
    ("peak PSS MiB", "peak_pss_mib", "{:.0f}", True),
    ("peak RSS MiB", "peak_rss_mib", "{:.0f}", True),
)


def format_side_by_side(runs: list[dict], concurrency_levels: tuple[int, ...]) -> str:
    """Per concurrency level and metric: the product and each peer in columns, then product/peer ratios."""
    header = ["c", "metric", *SERVER_KINDS, *(f"product/{peer}" for peer in PEERS)]
    rows = []
    for concurrency in concurrency_levels:
        by_server = {run["server"]: run for run in runs if run["concurrency"] == concurrency}
        for title, key, spec, has_ratio in _SIDE_BY_SIDE_METRICS:
            values = [spec.format(by_server[kind][key]) if kind in by_server else "-" for kind in SERVER_KINDS]
            ratios = [_ratio_cell(by_server, peer, key) if has_ratio else "" for peer in PEERS]
            rows.append([str(concurrency), title, *values, *ratios])
    return _aligned(header, rows)


def _ratio_cell(by_server: dict[str, dict], peer: str, key: str) -> str:
    if "product" not in by_server or peer not in by_server or by_server[peer][key] <= 0:
        return "-"
    return f"{by_server['product'][key] / by_server[peer][key]:.2f}x"


def _aligned(header: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell: the second (names) flush left, the others flush right."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) if i == 1 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in [header, *rows]
    )


def format_verdicts(verdicts: list[dict]) -> str:
    lines = []
    for verdict in verdicts:
        ratio = verdict["step_ca_ratio"]
        state = "MET" if verdict["targets_met"] else "NOT MET"
        if ratio is None:
            state = "UNDETERMINED (no verified step-ca enrollment)"
        lines.append(
            f"concurrency {verdict['concurrency']}: product/step-ca = "
            f"{'n/a' if ratio is None else f'{ratio:.2f}x'} enrollments/s (target {STEP_CA_RATIO_TARGET:g}x), "
            f"{verdict['rsa_floor_multiple']:.1f}x the RSA floor (target {RSA_FLOOR_MULTIPLE_TARGET:g}x), "
            f"product errors+duplicates {'none' if verdict['product_clean'] else 'PRESENT'}: {state}"
        )
    if verdicts:
        overall = "MET" if all(verdict["targets_met"] for verdict in verdicts) else "NOT MET"
        lines.append(f"targets at every level: {overall}")
    return "\n".join(lines)


def write_results(directory: Path, document: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = directory / f"compare-{stamp}.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


# --- command -------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--requests", type=int, default=2000, help="timed PKCSReqs per run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--warmup", type=int, default=20, help="requests before the timed phase, each run")
    parser.add_argument("--key-size", type=int, default=2048, choices=[2048, 3072, 4096], help="CA key size")
    parser.add_argument("--device-key-size", type=int, default=2048, choices=[2048, 3072, 4096])
    parser.add_argument("--challenge", default="bench-challenge")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="product worker processes")
    parser.add_argument("--servers", nargs="+", choices=SERVER_KINDS, default=list(SERVER_KINDS))
    parser.add_argument("--time-limit", type=float, default=loadgen.DEFAULT_TIME_LIMIT, help="seconds per run")
    parser.add_argument("--cache-dir", type=Path, default=loadgen.DEFAULT_CACHE_DIR)
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    parser.add_argument("--require-targets", action="store_true", help="exit 1 when a target is not met")
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="run every server at every level this many times, in turn; the comparison takes the medians",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    settings = Settings(
        requests=args.requests,
        concurrency_levels=tuple(args.concurrency),
        warmup=args.warmup,
        key_size=args.key_size,
        device_key_size=args.device_key_size,
        challenge=args.challenge,
        workers=args.workers,
        servers=tuple(args.servers),
        time_limit=args.time_limit,
        rounds=args.rounds,
    )
    factories, skipped = server_factories(settings, args.cache_dir)
    for reason in skipped:
        print(f"skipped: {reason}", file=sys.stderr, flush=True)
    if not factories:
        return 2
    busy = os.getloadavg()[0]
    if busy > QUIET_LOAD_AVERAGE:
        print(f"warning: load average {busy:.2f} before the benchmark: other work will skew the figures", flush=True)
    rsa_floor = measure_rsa_floor(settings.key_size)
    print(rsa_floor.describe(), flush=True)
    runs = _run_all(settings, factories, loadgen.KeyCache(args.cache_dir, settings.device_key_size), rsa_floor)
    combined = combine_rounds(runs)
    verdicts = compare(combined, settings.concurrency_levels)
    print()
    print(format_table(runs))
    print()
    print(rsa_floor.describe())
    if settings.rounds > 1:
        print(f"medians over {settings.rounds} rounds (errors and duplicate serials: totals)")
    print(format_side_by_side(combined, settings.concurrency_levels))
    print(format_verdicts(verdicts))
    document = {
        "machine": machine(),
        "settings": asdict(settings),
        "skipped": skipped,
        "rsa_floor": rsa_floor.to_dict(),
        "runs": runs,
        "combined": combined,
        "verdicts": verdicts,
    }
    document["targets_met"] = bool(verdicts) and all(verdict["targets_met"] for verdict in verdicts)
    print(f"results: {write_results(args.results_dir, document)}")
    if args.require_targets and not document["targets_met"]:
        return 1
    return 0


def _run_all(
    settings: Settings, factories: dict[str, ServerFactory], cache: loadgen.KeyCache, rsa_floor: RsaFloor
) -> list[dict]:
    keys = cache.key_ders(settings.requests)
    warmup_keys = cache.key_ders(settings.warmup, start=settings.requests)
    runs = []
    for round_number in range(1, settings.rounds + 1):
        for concurrency in settings.concurrency_levels:
            for kind, factory in factories.items():
                print(f"--- {kind}, concurrency {concurrency}, {settings.requests} requests, round {round_number}"
                      f" of {settings.rounds}", flush=True)
                run = run_one(factory(), concurrency, settings, keys, warmup_keys, rsa_floor)
                run["round"] = round_number
                print(_run_summary(run), flush=True)
                runs.append(run)
    return runs


def _run_summary(run: dict) -> str:
    lines = [
        f"{run['server']}: {run['successes']}/{run['requests']} in {run['wall_seconds']:.1f} s = "
        f"{run['enrollments_per_second']:.1f} enrollments/s; p50 {run['p50_ms']:.0f} ms p99 {run['p99_ms']:.0f} ms; "
        f"errors {run['errors']} {run['errors_by_kind'] or ''}; duplicate serials {run['duplicate_serials']}; "
        f"peak RSS {run['peak_rss_mib']:.0f} MiB (PSS {run['peak_pss_mib']:.0f} MiB, "
        f"{run['peak_processes']} processes); "
        f"server CPU {run['server_cpu_ms_per_enrollment']:.1f} ms per enrollment "
        f"({run['rsa_floor_multiple']:.1f}x the RSA floor), "
        f"{run['server_cpu_utilization']:.0%} of the machine's CPUs; "
        f"other processes used {run['other_cpu_seconds']:.1f} s CPU meanwhile"
    ]
    lines += [f"  e.g. {sample}" for sample in run["error_samples"]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
