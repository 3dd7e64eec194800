"""Where one enrollment's CPU goes: the product's ASGI application in this process, on one thread, with a CPU-time
counter around each step of the request path (the functions of scep.core the service calls, wrapped in place).

    python -m bench.profile -n 300

Requests are built as the benchmark builds them (bench.loadgen) before anything is timed; a warm-up runs first.
Each step's figure is the thread CPU time spent inside it per enrollment; nested steps (the RSA operations inside
unwrap and the signatures) are shown indented and are part of their parent's figure. `--cprofile FILE` also writes
a cProfile of the timed requests (read it with `python -m pstats FILE`).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench import loadgen
from scep import config
from scep.core import message, service
from scep.http import asgi
from scep.keys import local
from scep.store import sqlite

CHALLENGE = "profile challenge"
SCEP_PATH = "/api/scep"

# (label, module, attribute, depth): the steps of one enrollment in the order they run.
STEPS: list[tuple[str, Any, str, int]] = [
    ("parse + verify request signature (message.parse_pki_message)", message, "parse_pki_message", 0),
    ("read envelope (message.read_envelope)", message, "read_envelope", 0),
    ("unwrap + CBC (message.open_envelope)", message, "open_envelope", 0),
    ("RSA decrypt (LocalKey.unwrap_key)", local.LocalKey, "unwrap_key", 1),
    ("CSR load + verify (service._load_csr)", service, "_load_csr", 0),
    ("store claim (SqliteStore.claim)", sqlite.SqliteStore, "claim", 0),
    ("validation (validator.validate)", None, "validate", 0),
    ("issue + sign certificate (issuer.device_certificate)", service, "device_certificate", 0),
    ("record (service._record + SqliteStore.record_issued)", service, "_record", 0),
    ("", sqlite.SqliteStore, "record_issued", 0),
    ("CertRep content (message.certs_only + seal_envelope)", message, "certs_only", 0),
    ("", message, "seal_envelope", 0),
    ("CertRep build + sign (message.cert_rep)", message, "cert_rep", 0),
    ("RSA sign (LocalKey.sign_digest, certificate and CertRep)", local.LocalKey, "sign_digest", 1),
]


class StepClock:
    """Thread CPU time spent inside wrapped callables, summed per label (a re-entered label counts once)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._active: set[str] = set()

    def wrap(self, label: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if label in self._active:
                return function(*args, **kwargs)
            self._active.add(label)
            started = time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[label] += time.thread_time() - started
                self._active.discard(label)

        return timed

    def reset(self) -> None:
        self.seconds.clear()


@contextlib.contextmanager
def instrumented(clock: StepClock, validator: Any) -> Iterator[None]:
    patched: list[tuple[Any, str, Any]] = []
    label = ""
    for step_label, owner, attribute, _depth in STEPS:
        label = step_label or label  # an empty label adds its callable to the step above
        target = validator if owner is None else owner
        original = getattr(target, attribute)
        patched.append((target, attribute, original if owner is not None else None))
        setattr(target, attribute, clock.wrap(label, original))
    try:
        yield
    finally:
        for target, attribute, original in reversed(patched):
            if original is None:
                delattr(target, attribute)  # the instance attribute shadowed the class's method
            else:
                setattr(target, attribute, original)


SCOPE = {
    "type": "http", "method": "POST", "path": SCEP_PATH, "query_string": b"operation=PKIOperation", "scheme": "http",
    "headers": [(b"host", b"127.0.0.1"), (b"content-type", loadgen.PKI_MESSAGE_TYPE.encode()),
                (b"connection", b"keep-alive")],
}  # fmt: skip


def serve(app: asgi.AsgiApp, body: bytes) -> None:
    """One request through the ASGI application, driven without an event loop: its receive and send never wait,
    so the coroutine runs to its end in one step (what the worker's loop does, less the scheduling)."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with contextlib.suppress(StopIteration):
        app(SCOPE, receive, send).send(None)
    if len(sent) != 2 or sent[0]["status"] != 200 or not sent[1]["body"]:
        raise RuntimeError(f"the product answered {sent[0]['status'] if sent else 'nothing'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=300, help="timed enrollments [300]")
    parser.add_argument("--warmup", type=int, default=30, help="enrollments before the clock starts [30]")
    parser.add_argument("--cache-dir", type=Path, default=loadgen.DEFAULT_CACHE_DIR)
    parser.add_argument("--cprofile", type=Path, help="also write a cProfile of the timed enrollments here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="scep-profile-") as data_dir:
        environ = {"SCEP_DATA_DIR": data_dir, "SCEP_CHALLENGE": CHALLENGE}
        config.reset(config.load_settings(environ))
        try:
            profile_enrollments(args)
        finally:
            config.reset()
    return 0


def profile_enrollments(args: argparse.Namespace) -> None:
    app = asgi.create_app()
    the_service = config.service()
    ra = the_service.custody.keys().ra.certificate
    keys = loadgen.KeyCache(args.cache_dir).key_ders(args.warmup + args.n)
    bodies = [r.body for r in loadgen.prepare_requests(keys, ra, CHALLENGE, "profile")]
    for body in bodies[: args.warmup]:
        serve(app, body)
    clock = StepClock()
    timed = bodies[args.warmup :]
    profiler = cProfile.Profile() if args.cprofile else None
    with instrumented(clock, the_service.validator):
        started = time.thread_time()
        with profiler or contextlib.nullcontext():
            for body in timed:
                serve(app, body)
        total = time.thread_time() - started
    if profiler is not None:
        profiler.dump_stats(args.cprofile)
    print_table(clock, total, len(timed))


def print_table(clock: StepClock, total: float, count: int) -> None:
    def ms(seconds: float) -> float:
        return seconds * 1000 / count

    top_level = 0.0
    print(f"{'step':<66} {'ms CPU':>7}")
    for label, _owner, _attribute, depth in STEPS:
        if not label:
            continue
        print(f"{'  ' * depth + label:<66} {ms(clock.seconds[label]):7.3f}")
        top_level += clock.seconds[label] if depth == 0 else 0.0
    print(f"{'everything else (ASGI, dispatch, telemetry, attributes, logging)':<66} {ms(total - top_level):7.3f}")
    print(f"{'total per enrollment (ASGI application call)':<66} {ms(total):7.3f}")


if __name__ == "__main__":
    raise SystemExit(main())
