"""What an enrollment costs besides its cryptography: the SQLite statements it runs and the telemetry it starts
while no OpenTelemetry SDK is installed."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from scep.store import sqlite as sqlite_store
from tests.test_store_contract import issue, new_transaction_id


def test_enrollment_commits_the_record_with_fsync_and_switches_no_pragma(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    statements: list[str] = []
    connections: list[sqlite3.Connection] = []
    connect = sqlite3.connect

    def traced_connect(*args, **kwargs) -> sqlite3.Connection:
        connection = connect(*args, **kwargs)
        connection.set_trace_callback(statements.append)
        connections.append(connection)
        return connection

    monkeypatch.setattr(sqlite_store.sqlite3, "connect", traced_connect)
    store = sqlite_store.SqliteStore(tmp_path / "store.db")
    issue(store, new_transaction_id())  # opens this thread's connections
    statements.clear()
    issue(store, new_transaction_id())

    assert not [statement for statement in statements if statement.upper().startswith("PRAGMA")]
    assert statements.count("COMMIT") == 2  # the claim and the record
    synchronous = sorted(connection.execute("PRAGMA synchronous").fetchone()[0] for connection in connections)
    assert synchronous == [1, 2]  # NORMAL for claims and failures, FULL for issued certificates
    store.close()


NO_SDK_PROBE = """
from opentelemetry import trace
from scep.core import telemetry
from scep.core.protocol import MessageType, PkiStatus

started = []
real_start = trace.ProxyTracer.start_as_current_span
trace.ProxyTracer.start_as_current_span = lambda self, *a, **k: started.append(a) or real_start(self, *a, **k)
with telemetry.enrollment_span("local") as enrollment:
    telemetry.identify("TX", MessageType.PKCS_REQ)
    with telemetry.step(telemetry.STEP_SIGN_REPLY) as span:
        assert not span.is_recording()
    enrollment.finish(PkiStatus.SUCCESS, None)
assert started == [], started
"""


def test_no_span_is_started_without_a_tracer_provider() -> None:
    # A process has one global tracer provider and other test modules install one: probe a fresh interpreter.
    result = subprocess.run([sys.executable, "-c", NO_SDK_PROBE], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
