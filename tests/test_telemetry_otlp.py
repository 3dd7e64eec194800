"""`scep serve` with SCEP_TELEMETRY=otlp sends an enrollment's spans to an OTLP/HTTP collector: here a stand-in on
127.0.0.1 that decodes the protobuf requests (opentelemetry-proto) the way a collector does."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from scep.core import telemetry
from scep.core.protocol import PkiStatus
from scep.tools.client import ScepClient, make_csr, new_enrollment
from tests.conftest import CHALLENGE
from tests.serverproc import ScepServer

pytestmark = pytest.mark.e2e

ARRIVAL_SECONDS = 20.0  # the batch span processor exports every 5 s, and on shutdown


class Collector(ThreadingHTTPServer):
    """Accepts OTLP/HTTP protobuf exports; keeps every span's name and attributes."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Receiver)
        self.spans: list[tuple[str, dict[str, str]]] = []
        self.lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def spans_named(self, name: str) -> list[dict[str, str]]:
        with self.lock:
            return [attributes for span_name, attributes in self.spans if span_name == name]


class _Receiver(BaseHTTPRequestHandler):
    server: Collector

    def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == "/v1/traces":
            self._keep(body)
            answer = ExportTraceServiceResponse().SerializeToString()
        else:
            answer = b""  # metrics: an empty ExportMetricsServiceResponse is zero bytes too
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def _keep(self, body: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    attributes = {item.key: item.value.string_value for item in span.attributes}
                    with self.server.lock:
                        self.server.spans.append((span.name, attributes))

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[Collector]:
    server = Collector()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_an_enrollments_spans_reach_the_otlp_collector(collector: Collector, keys) -> None:
    environment = {"SCEP_CHALLENGE": CHALLENGE, "SCEP_TELEMETRY": "otlp", "SCEP_OTLP_ENDPOINT": collector.endpoint}
    with ScepServer(env=environment) as server:
        client = ScepClient(server.scep_url)
        ra, _ = client.ca_certificates()
        key = keys.new()
        enrollment = new_enrollment(key, make_csr(key, "otlp-device", CHALLENGE))
        assert client.enroll(enrollment, ra).status is PkiStatus.SUCCESS
        deadline = time.monotonic() + ARRIVAL_SECONDS
        while not collector.spans_named(telemetry.STEP_SIGN_REPLY) and time.monotonic() < deadline:
            time.sleep(0.2)

    roots = collector.spans_named(telemetry.ENROLLMENT_SPAN)
    assert [root[telemetry.ATTR_TRANSACTION_ID] for root in roots] == [enrollment.transaction_id]
    assert roots[0][telemetry.ATTR_OUTCOME] == "issued"
    arrived = {name for name, _ in collector.spans}
    assert {telemetry.STEP_UNWRAP, telemetry.STEP_VALIDATE, telemetry.STEP_SIGN_CERTIFICATE} <= arrived
    assert all(CHALLENGE not in value for _, attributes in collector.spans for value in attributes.values())
