"""Side-by-side enrollment benchmark: the product's server against micromdm's scepserver, on this machine.

For each concurrency level, a fresh product server (`scep serve`, one worker per CPU) and then a fresh micromdm
`scepserver` (never both at once) get the same number of PKCSReqs, the same CA key size and the same challenge.
The command prints a table, the product/micromdm ratio and whether the product meets its floor (at least 3x
micromdm's enrollments/s with no errors and no duplicate serial numbers at every level), and writes the figures
as JSON under bench/results/.

    python -m bench.compare                      # defaults: -n 2000, concurrency 8 and 16, RSA-2048
    python -m bench.compare -n 300 --concurrency 8 --servers product
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType

from bench import loadgen

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent / "results"
FLOOR_RATIO = 3.0
STARTUP_TIMEOUT = 60.0
STOP_GRACE_SECONDS = 10.0
MEMORY_SAMPLE_SECONDS = 0.2
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SERVER_KINDS = ("product", "micromdm")
MICROMDM_BINARY = "scepserver"
QUIET_LOAD_AVERAGE = 0.5


class ServerError(RuntimeError):
    """A server would not start; the message carries its output."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- servers -------------------------------------------------------------------------------------------------


class ManagedServer(ABC):
    """A server subprocess in its own process group, with a throwaway data directory."""

    name = ""
    scep_path = ""

    def __init__(self, key_size: int, challenge: str) -> None:
        self.key_size = key_size
        self.challenge = challenge
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"scep-bench-{self.name}-"))
        self.log_path = self.workdir / "server.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def scep_url(self) -> str:
        return self.base_url + self.scep_path

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @abstractmethod
    def initialize(self) -> None:
        """Create the CA before the server starts."""

    @abstractmethod
    def command(self) -> list[str]:
        """The server's command line."""

    @abstractmethod
    def ready_url(self) -> str:
        """A URL that answers 200 once the server serves."""

    def environment(self) -> dict[str, str]:
        return {name: value for name, value in os.environ.items() if not name.startswith("SCEP_")}

    def start(self) -> ManagedServer:
        self.initialize()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                cwd=REPO_ROOT,
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_until_ready()
        return self

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise ServerError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(self.ready_url(), timeout=2) as response,
            ):
                if response.status == 200:
                    return
            time.sleep(0.1)
        raise ServerError(f"{self.name} not ready after {STARTUP_TIMEOUT:.0f} s:\n{self.log_tail()}")

    def log_tail(self, limit: int = 4000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-limit:]

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=STOP_GRACE_SECONDS)
        # Whatever is left of the group (pre-forked workers included) goes too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=STOP_GRACE_SECONDS)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> ManagedServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


class ProductServer(ManagedServer):
    """`scep serve` with a local CA of the given key size and a static challenge."""

    name = "product"
    scep_path = "/api/scep"

    def __init__(self, key_size: int, challenge: str, workers: int) -> None:
        super().__init__(key_size, challenge)
        self.workers = workers
        self.data_dir = self.workdir / "data"

    def environment(self) -> dict[str, str]:
        environment = super().environment()
        environment.update(SCEP_DATA_DIR=str(self.data_dir), SCEP_CHALLENGE=self.challenge, PYTHONUNBUFFERED="1")
        return environment

    def initialize(self) -> None:
        command = [sys.executable, "-m", "scep.cli", "ca", "init", "--key-size", str(self.key_size)]
        _run_setup(command, self.environment(), self.name)

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "scep.cli", "serve",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers),
        ]  # fmt: skip

    def ready_url(self) -> str:
        return self.base_url + "/api/health"


class MicromdmServer(ManagedServer):
    """micromdm's `scepserver` with a fresh depot. It has no RA: its CA certificate is the recipient and signer.

    It takes only a port and listens on every interface (no bind-address option); the benchmark talks to it
    on 127.0.0.1 only.
    """

    name = "micromdm"
    scep_path = "/scep"

    def __init__(self, key_size: int, challenge: str, binary: str = MICROMDM_BINARY) -> None:
        super().__init__(key_size, challenge)
        self.binary = binary
        self.depot = self.workdir / "depot"

    def initialize(self) -> None:
        command = [self.binary, "ca", "-init", "-depot", str(self.depot), "-keySize", str(self.key_size)]
        _run_setup(command, self.environment(), self.name)

    def command(self) -> list[str]:
        return [self.binary, "-depot", str(self.depot), "-port", str(self.port), "-challenge", self.challenge]

    def ready_url(self) -> str:
        return self.scep_url + "?operation=GetCACaps"


def _run_setup(command: list[str], environment: dict[str, str], name: str) -> None:
    finished = subprocess.run(
        command, cwd=REPO_ROOT, env=environment, stdin=subprocess.DEVNULL, capture_output=True, timeout=300
    )
    if finished.returncode != 0:
        output = (finished.stdout + finished.stderr).decode(errors="replace")
        raise ServerError(f"{name}: `{' '.join(command[:4])} ...` failed ({finished.returncode}):\n{output}")


def micromdm_version(binary: str = MICROMDM_BINARY) -> str:
    if shutil.which(binary) is None:
        return "not installed"
    finished = subprocess.run([binary, "-version"], capture_output=True, timeout=30)
    lines = (finished.stdout + finished.stderr).decode(errors="replace").strip().splitlines()
    return lines[0] if lines else "unknown"


# --- memory --------------------------------------------------------------------------------------------------


def _process_tree(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(parents.get(pid, []))
    return tree


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm", "rb") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE


def _pss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup", "rb") as rollup:
        for line in rollup:
            if line.startswith(b"Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def _cpu_seconds(pid: int, include_reaped_children: bool) -> float:
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    # Fields after the command: state is [0], so utime, stime, cutime, cstime are [11]..[14].
    ticks = int(fields[11]) + int(fields[12])
    if include_reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU time all CPUs of the machine spent busy (not idle, not waiting for I/O) since boot."""
    with open("/proc/stat", "rb") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


def tree_cpu_seconds(root: int) -> float:
    """CPU time (user + system) used so far by a process tree, its reaped children included."""
    total = 0.0
    for pid in _process_tree(root):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += _cpu_seconds(pid, include_reaped_children=pid == root)
    return total


class TreeMemorySampler(threading.Thread):
    """Peak memory of a process tree, sampled: summed RSS (counts pages shared by forked workers once per
    process) and summed PSS (shares them out, so it adds up to what the tree really occupies).

    It also measures the tree's CPU time over the timed phase (`timed_phase`)."""

    def __init__(self, root_pid: int, interval: float = MEMORY_SAMPLE_SECONDS) -> None:
        super().__init__(daemon=True)
        self.root_pid = root_pid
        self.interval = interval
        self.peak_rss_bytes = 0
        self.peak_pss_bytes = 0
        self.peak_processes = 0
        self.timed_cpu_seconds = 0.0
        self.timed_machine_busy_seconds = 0.0
        self._stop_event = threading.Event()

    @contextlib.contextmanager
    def timed_phase(self) -> Iterator[None]:
        tree_before, machine_before = tree_cpu_seconds(self.root_pid), machine_busy_seconds()
        try:
            yield
        finally:
            self.timed_cpu_seconds = tree_cpu_seconds(self.root_pid) - tree_before
            self.timed_machine_busy_seconds = machine_busy_seconds() - machine_before

    def run(self) -> None:
        while True:
            self.sample()
            if self._stop_event.wait(self.interval):
                return

    def sample(self) -> None:
        rss = pss = count = 0
        for pid in _process_tree(self.root_pid):
            with contextlib.suppress(OSError, ValueError):
                rss += _rss_bytes(pid)
                pss += _pss_bytes(pid)
                count += 1
        self.peak_rss_bytes = max(self.peak_rss_bytes, rss)
        self.peak_pss_bytes = max(self.peak_pss_bytes, pss)
        self.peak_processes = max(self.peak_processes, count)

    def __enter__(self) -> TreeMemorySampler:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop_event.set()
        self.join()
        self.sample()


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


def make_server(kind: str, settings: Settings) -> ManagedServer:
    if kind == "product":
        return ProductServer(settings.key_size, settings.challenge, settings.workers)
    return MicromdmServer(settings.key_size, settings.challenge)


def run_one(kind: str, concurrency: int, settings: Settings, keys: list[bytes], warmup_keys: list[bytes]) -> dict:
    with make_server(kind, settings) as server, TreeMemorySampler(server.pid) as memory:
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
        server_cpu_ms_per_enrollment=1000 * memory.timed_cpu_seconds / max(1, report.successes),
        server_cpu_utilization=memory.timed_cpu_seconds / report.wall_seconds / (os.cpu_count() or 1)
        if report.wall_seconds > 0
        else 0.0,
    )
    return result


def _answered(report: loadgen.Report) -> int:
    return report.requests - report.errors_by_kind.get(loadgen.TRANSPORT_ERROR, 0)


def compare(runs: list[dict], concurrency_levels: tuple[int, ...]) -> list[dict]:
    """Per concurrency level: product/micromdm ratios and whether the floor is met."""
    verdicts = []
    for concurrency in concurrency_levels:
        by_server = {run["server"]: run for run in runs if run["concurrency"] == concurrency}
        product, micromdm = by_server.get("product"), by_server.get("micromdm")
        if product is None or micromdm is None:
            continue
        ratio = _ratio(product["enrollments_per_second"], micromdm["enrollments_per_second"])
        clean = product["errors"] == 0 and product["duplicate_serials"] == 0
        # Without one verified micromdm enrollment there is nothing to compare against.
        comparable = micromdm["successes"] > 0
        verdicts.append(
            {
                "concurrency": concurrency,
                "ratio": ratio,
                "ratio_replies": _ratio(product["replies_per_second"], micromdm["replies_per_second"]),
                "ratio_unique": _ratio(
                    product["unique_enrollments_per_second"], micromdm["unique_enrollments_per_second"]
                ),
                "product_clean": clean,
                "micromdm_errors": micromdm["errors"],
                "micromdm_duplicate_serials": micromdm["duplicate_serials"],
                "comparable": comparable,
                "floor_met": comparable and clean and ratio >= FLOOR_RATIO,
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
    ("server CPU busy", "server_cpu_utilization", "{:.0%}"),
    ("loadgen CPU s", "loadgen_cpu_seconds", "{:.2f}"),
    ("other CPU s", "other_cpu_seconds", "{:.2f}"),
)


def format_table(runs: list[dict]) -> str:
    cells = [[spec.format(run[key]) for _, key, spec in _COLUMNS] for run in runs]
    widths = [max([len(title), *(len(row[i]) for row in cells)]) for i, (title, _, _) in enumerate(_COLUMNS)]
    lines = []
    for row in [[title for title, _, _ in _COLUMNS], *cells]:
        lines.append(
            "  ".join(
                cell.strip().ljust(w) if i == 1 else cell.strip().rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(lines)


def format_verdicts(verdicts: list[dict]) -> str:
    lines = []
    for verdict in verdicts:
        state = "MET" if verdict["floor_met"] else "NOT MET"
        if not verdict["comparable"]:
            state = "UNDETERMINED (no verified micromdm enrollment)"
        lines.append(
            f"concurrency {verdict['concurrency']}: product/micromdm = {verdict['ratio']:.2f}x enrollments/s "
            f"({verdict['ratio_replies']:.2f}x replies/s, {verdict['ratio_unique']:.2f}x unique-serial enrollments/s); "
            "product errors+duplicates "
            f"{'none' if verdict['product_clean'] else 'PRESENT'}; micromdm errors {verdict['micromdm_errors']}, "
            f"duplicate serials {verdict['micromdm_duplicate_serials']}; floor {FLOOR_RATIO:g}x: {state}"
        )
    if verdicts:
        overall = "MET" if all(verdict["floor_met"] for verdict in verdicts) else "NOT MET"
        lines.append(f"floor (>= {FLOOR_RATIO:g}x micromdm enrollments/s, zero errors, every level): {overall}")
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
    parser.add_argument("--require-floor", action="store_true", help="exit 1 when the floor is not met")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
    )
    if "micromdm" in settings.servers and shutil.which(MICROMDM_BINARY) is None:
        print(f"{MICROMDM_BINARY} not found: install Debian's `scep` package, or --servers product", file=sys.stderr)
        return 2
    busy = os.getloadavg()[0]
    if busy > QUIET_LOAD_AVERAGE:
        print(f"warning: load average {busy:.2f} before the benchmark: other work will skew the figures", flush=True)
    cache = loadgen.KeyCache(args.cache_dir, settings.device_key_size)
    keys = cache.key_ders(settings.requests)
    warmup_keys = cache.key_ders(settings.warmup, start=settings.requests)
    runs = []
    for concurrency in settings.concurrency_levels:
        for kind in settings.servers:
            print(f"--- {kind}, concurrency {concurrency}, {settings.requests} requests", flush=True)
            run = run_one(kind, concurrency, settings, keys, warmup_keys)
            print(_run_summary(run), flush=True)
            runs.append(run)
    verdicts = compare(runs, settings.concurrency_levels)
    print()
    print(format_table(runs))
    print(format_verdicts(verdicts))
    document = {"machine": machine(), "settings": asdict(settings), "runs": runs, "verdicts": verdicts}
    document["floor_met"] = bool(verdicts) and all(verdict["floor_met"] for verdict in verdicts)
    print(f"results: {write_results(args.results_dir, document)}")
    if args.require_floor and not document["floor_met"]:
        return 1
    return 0


def _run_summary(run: dict) -> str:
    lines = [
        f"{run['server']}: {run['successes']}/{run['requests']} in {run['wall_seconds']:.1f} s = "
        f"{run['enrollments_per_second']:.1f} enrollments/s; p50 {run['p50_ms']:.0f} ms p99 {run['p99_ms']:.0f} ms; "
        f"errors {run['errors']} {run['errors_by_kind'] or ''}; duplicate serials {run['duplicate_serials']}; "
        f"peak RSS {run['peak_rss_mib']:.0f} MiB (PSS {run['peak_pss_mib']:.0f} MiB, "
        f"{run['peak_processes']} processes); "
        f"server CPU {run['server_cpu_ms_per_enrollment']:.1f} ms per enrollment, "
        f"{run['server_cpu_utilization']:.0%} of the machine's CPUs; "
        f"other processes used {run['other_cpu_seconds']:.1f} s CPU meanwhile"
    ]
    lines += [f"  e.g. {sample}" for sample in run["error_samples"]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
