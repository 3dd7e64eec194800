"""What the benchmark measures besides the load generator's counts: a server process tree's memory and CPU time,
and the RSA floor (the CPU time of the RSA private-key operations every enrollment needs, with this machine's
OpenSSL on one core).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import cryptography
from cryptography.hazmat.backends.openssl import backend
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

MEMORY_SAMPLE_SECONDS = 0.2
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
FLOOR_OPERATIONS = 200
FLOOR_REPEATS = 3


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


# --- RSA floor -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RsaFloor:
    """CPU time of the RSA private-key operations one enrollment cannot avoid, measured in this process.

    Every server decrypts the request's content-encryption key (RSA, PKCS#1 v1.5) and signs twice: the issued
    certificate and the CertRep's SignedData (RSA, PKCS#1 v1.5, SHA-256)."""

    key_size: int
    decrypt_ms: float
    sign_ms: float
    library: str

    @property
    def enrollment_ms(self) -> float:
        return self.decrypt_ms + 2 * self.sign_ms

    def multiple(self, cpu_ms_per_enrollment: float) -> float:
        """How many floors a server's CPU time per enrollment is."""
        return cpu_ms_per_enrollment / self.enrollment_ms

    def to_dict(self) -> dict:
        return {**asdict(self), "enrollment_ms": self.enrollment_ms}

    def describe(self) -> str:
        return (
            f"RSA floor: {self.enrollment_ms:.2f} ms CPU per enrollment = decrypt {self.decrypt_ms:.3f} ms "
            f"+ 2 x sign {self.sign_ms:.3f} ms (RSA-{self.key_size}, {self.library}, one thread)"
        )


def measure_rsa_floor(key_size: int, operations: int = FLOOR_OPERATIONS, repeats: int = FLOOR_REPEATS) -> RsaFloor:
    """Per-operation CPU time of RSA decrypt and sign with a fresh key: the best of `repeats` batches, the batch
    least disturbed by other work on the machine."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
    content_key = os.urandom(16)
    encrypted = key.public_key().encrypt(content_key, padding.PKCS1v15())
    to_sign = os.urandom(64)

    def decrypt() -> None:
        if key.decrypt(encrypted, padding.PKCS1v15()) != content_key:
            raise AssertionError("RSA decryption returned something else")

    def sign() -> None:
        key.sign(to_sign, padding.PKCS1v15(), hashes.SHA256())

    return RsaFloor(
        key_size=key_size,
        decrypt_ms=_best_cpu_ms(decrypt, operations, repeats),
        sign_ms=_best_cpu_ms(sign, operations, repeats),
        library=f"cryptography {cryptography.__version__}, {backend.openssl_version_text()}",
    )


def _best_cpu_ms(operation: Callable[[], None], operations: int, repeats: int) -> float:
    batches = []
    for _ in range(repeats):
        started = time.thread_time()
        for _ in range(operations):
            operation()
        batches.append(time.thread_time() - started)
    return 1000 * min(batches) / operations
