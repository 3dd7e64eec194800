"""scep.http.localhost: a FunctionApp's HTTP functions served over real HTTP, in one process and pre-forked."""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from scep.http.localhost import LocalFunctionsServer, load_function_app, read_route_prefix

REPOSITORY = Path(__file__).resolve().parents[1]
MAX_BODY = 1024

APP_SOURCE = '''
import json
import os

import azure.functions as func

blueprint = func.Blueprint()


@blueprint.route(route="hello/{name}", methods=["GET"])
def hello(req: func.HttpRequest) -> func.HttpResponse:
    seen = {"method": req.method, "url": req.url, "params": dict(req.params),
            "route_params": dict(req.route_params), "agent": req.headers.get("User-Agent")}
    return func.HttpResponse(json.dumps(seen), mimetype="application/json")


app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)
app.register_functions(blueprint)


@app.route(route="echo", methods=["POST", "PUT"])
def echo(req: func.HttpRequest) -> func.HttpResponse:
    body = req.get_body()
    return func.HttpResponse(body, status_code=201, headers={"X-Body-Length": str(len(body))},
                             mimetype="application/octet-stream")


@app.route(route="files/{*rest}")
def files(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse("rest=" + req.route_params.get("rest", "<none>"))


@app.route(route="items/special", methods=["GET"])
def special_item(req: func.HttpRequest) -> str:
    return "special"


@app.route(route="items/{id:int}")
def item(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse("item " + req.route_params["id"])


@app.route(route="boom")
def boom(req: func.HttpRequest) -> func.HttpResponse:
    raise RuntimeError("the database password is hunter2")


@app.route(route="pid")
def pid(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse(str(os.getpid()))


@app.route(route="keyed", auth_level=func.AuthLevel.FUNCTION)
def keyed(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse("keyed")


@app.function_name("named_with_context")
@app.route(route="context")
def with_context(req: func.HttpRequest, context: func.Context) -> func.HttpResponse:
    return func.HttpResponse(context.function_name)


@app.route(route="later")
async def later(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse("awaited")


@app.route(route="nothing")
def nothing(req: func.HttpRequest) -> None:
    return None


@app.timer_trigger(schedule="0 0 * * * *", arg_name="timer", run_on_startup=False)
def hourly(timer: func.TimerRequest) -> None:
    raise AssertionError("timers are not served over HTTP")
'''

SERVE_SCRIPT = '''
import sys
from pathlib import Path

from scep.http.localhost import LocalFunctionsServer, load_function_app

app, prefix = load_function_app(sys.argv[1], Path(sys.argv[2]))
server = LocalFunctionsServer(app, prefix, port=0, workers=int(sys.argv[3]))
print(server.url, flush=True)
server.serve_forever()
'''


# ------------------------------------------------------------------------------------------ fixtures


def write_app(directory: Path, host_json: dict | None) -> str:
    module = f"localhost_test_app_{uuid.uuid4().hex}"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{module}.py").write_text(APP_SOURCE)
    if host_json is not None:
        (directory / "host.json").write_text(json.dumps(host_json))
    return f"{module}:app"


@pytest.fixture(scope="module")
def app_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    directory = tmp_path_factory.mktemp("function_app")
    spec = write_app(directory, {"version": "2.0", "extensions": {"http": {"routePrefix": "api"}}})
    yield spec, directory
    sys.modules.pop(spec.partition(":")[0], None)
    with contextlib.suppress(ValueError):
        sys.path.remove(str(directory.resolve()))


@pytest.fixture(scope="module")
def loaded(app_dir: tuple[str, Path]) -> tuple[object, str]:
    spec, directory = app_dir
    return load_function_app(spec, directory)


@contextlib.contextmanager
def serving(app: object, prefix: str, **options: object) -> Iterator[LocalFunctionsServer]:
    server = LocalFunctionsServer(app, prefix, port=0, workers=1, **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.close()
        thread.join(timeout=15)
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def server(loaded: tuple[object, str]) -> Iterator[LocalFunctionsServer]:
    app, prefix = loaded
    with serving(app, prefix, max_body_bytes=MAX_BODY, function_key="s3cret-key") as running:
        yield running


def request(server: LocalFunctionsServer, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def raw_exchange(server: LocalFunctionsServer, data: bytes, *, wait: float = 10) -> bytes:
    """Send bytes, then read whatever comes back until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=wait) as raw:
        raw.sendall(data)
        received = b""
        while chunk := raw.recv(65536):
            received += chunk
        return received


# ------------------------------------------------------------------------------------------ loading


def test_route_prefix_comes_from_host_json(tmp_path: Path) -> None:
    host_json = tmp_path / "host.json"
    assert read_route_prefix(host_json) == "api"
    host_json.write_text(json.dumps({"version": "2.0"}))
    assert read_route_prefix(host_json) == "api"
    host_json.write_text(json.dumps({"extensions": {"http": {"routePrefix": ""}}}))
    assert read_route_prefix(host_json) == ""
    host_json.write_text(json.dumps({"extensions": {"http": {"routePrefix": "/v1/"}}}))
    assert read_route_prefix(host_json) == "v1"
    host_json.write_text("{not json")
    with pytest.raises(ValueError, match="host.json"):
        read_route_prefix(host_json)


def test_load_function_app_imports_the_app_and_its_prefix(tmp_path: Path) -> None:
    spec = write_app(tmp_path, {"extensions": {"http": {"routePrefix": ""}}})
    try:
        app, prefix = load_function_app(spec, tmp_path)
        assert prefix == ""
        assert {fn.get_function_name() for fn in app.get_functions()} >= {"hello", "echo", "boom"}
        with pytest.raises(TypeError, match="FunctionApp"):
            load_function_app(spec.replace(":app", ":json"), tmp_path)
        with pytest.raises(ValueError, match="module:attribute"):
            load_function_app("no_attribute", tmp_path)
    finally:
        sys.modules.pop(spec.partition(":")[0], None)
        sys.path.remove(str(tmp_path.resolve()))


def test_routes_lists_the_http_functions_only(server: LocalFunctionsServer) -> None:
    routes = {name: (path, methods) for name, path, methods in server.routes()}
    assert routes["hello"] == ("/api/hello/{name}", ["GET"])
    assert routes["echo"] == ("/api/echo", ["POST", "PUT"])
    assert routes["pid"] == ("/api/pid", None)
    assert "named_with_context" in routes
    assert "hourly" not in routes
    assert server.url == f"http://127.0.0.1:{server.port}" and server.port != 0
    assert server.api_url == server.url + "/api"


# ------------------------------------------------------------------------------------------ routing


def test_blueprint_route_with_parameter_and_query(server: LocalFunctionsServer) -> None:
    path = "/api/hello/J%C3%BCrgen?x=1&x=2&message=ab+c%2Bd&blank="
    status, headers, body = request(server, "GET", path, headers={"User-Agent": "probe/1"})
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert headers["content-length"] == str(len(body))
    seen = json.loads(body)
    assert seen["method"] == "GET"
    assert seen["route_params"] == {"name": "Jürgen"}
    # First value per key; '+' decodes to a space, as the Functions host does.
    assert seen["params"] == {"x": "1", "message": "ab c+d", "blank": ""}
    assert seen["url"] == f"http://127.0.0.1:{server.port}{path}"
    assert seen["agent"] == "probe/1"


def test_literal_segments_match_case_insensitively(server: LocalFunctionsServer) -> None:
    status, _, body = request(server, "GET", "/API/Hello/World/")
    assert status == 200
    assert json.loads(body)["route_params"] == {"name": "World"}


def test_literal_route_wins_over_parameter_and_constraints_apply(server: LocalFunctionsServer) -> None:
    assert request(server, "GET", "/api/items/special")[2] == b"special"
    assert request(server, "GET", "/api/items/42")[2] == b"item 42"
    assert request(server, "GET", "/api/items/forty-two")[0] == 404
    # Only the literal route matches this path ("special" is no int), and it takes GET only.
    status, headers, _ = request(server, "POST", "/api/items/special", body=b"")
    assert (status, headers["allow"]) == (405, "GET")


def test_catch_all_route(server: LocalFunctionsServer) -> None:
    assert request(server, "GET", "/api/files/a/b/c.txt")[2] == b"rest=a/b/c.txt"
    assert request(server, "GET", "/api/files")[2] == b"rest=<none>"


def test_unknown_path_is_404_and_wrong_method_is_405(server: LocalFunctionsServer) -> None:
    assert request(server, "GET", "/api/nowhere")[0] == 404
    assert request(server, "GET", "/hello/x")[0] == 404  # the prefix is required
    status, headers, _ = request(server, "GET", "/api/echo")
    assert status == 405
    assert headers["allow"] == "POST, PUT"
    status, headers, _ = request(server, "DELETE", "/api/hello/x")
    assert (status, headers["allow"]) == (405, "GET")


@pytest.mark.parametrize(("prefix", "good", "bad"), [("", "/hello/x", "/api/hello/x"),
                                                      ("v1/scep", "/v1/scep/hello/x", "/api/hello/x")])
def test_route_prefix_from_host_json(tmp_path: Path, loaded: tuple[object, str], prefix: str, good: str,
                                     bad: str) -> None:
    host_json = tmp_path / "host.json"
    host_json.write_text(json.dumps({"version": "2.0", "extensions": {"http": {"routePrefix": prefix}}}))
    app, _ = loaded
    with serving(app, read_route_prefix(host_json)) as running:
        assert request(running, "GET", good)[0] == 200
        assert request(running, "GET", bad)[0] == 404


def test_context_async_string_and_none_results(server: LocalFunctionsServer) -> None:
    assert request(server, "GET", "/api/context")[2] == b"named_with_context"
    assert request(server, "GET", "/api/later")[2] == b"awaited"
    status, headers, body = request(server, "GET", "/api/items/special")
    assert headers["content-type"] == "text/plain; charset=utf-8"
    status, headers, body = request(server, "GET", "/api/nothing")
    assert (status, body) == (204, b"")


def test_head_sends_length_without_body(server: LocalFunctionsServer) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request("HEAD", "/api/pid")
        response = connection.getresponse()
        assert response.status == 200
        assert int(response.getheader("Content-Length")) == len(str(os.getpid()))
        assert response.read() == b""
        connection.request("GET", "/api/pid")  # the connection is still usable: nothing was left unread
        assert connection.getresponse().read() == str(os.getpid()).encode()
    finally:
        connection.close()


def test_function_key_guards_non_anonymous_functions(server: LocalFunctionsServer,
                                                     loaded: tuple[object, str]) -> None:
    assert request(server, "GET", "/api/keyed")[0] == 401
    assert request(server, "GET", "/api/keyed", headers={"x-functions-key": "wrong"})[0] == 401
    assert request(server, "GET", "/api/keyed", headers={"x-functions-key": "s3cret-key"})[2] == b"keyed"
    assert request(server, "GET", "/api/keyed?code=s3cret-key")[2] == b"keyed"
    app, prefix = loaded
    with serving(app, prefix) as keyless:
        assert request(keyless, "GET", "/api/keyed?code=")[0] == 401


# ------------------------------------------------------------------------------------------ bodies


def test_post_echo_with_content_length_and_chunked(server: LocalFunctionsServer) -> None:
    payload = bytes(range(256)) * 3
    status, headers, body = request(server, "POST", "/api/echo", body=payload)
    assert (status, body, headers["x-body-length"]) == (201, payload, str(len(payload)))
    assert headers["content-type"] == "application/octet-stream"
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        pieces = [b"first piece ", b"", b"second", b" and the last"]
        connection.request("PUT", "/api/echo", body=iter(pieces), encode_chunked=True,
                           headers={"Transfer-Encoding": "chunked"})
        response = connection.getresponse()
        assert (response.status, response.read()) == (201, b"".join(pieces))
    finally:
        connection.close()


def test_body_at_the_limit_is_accepted(server: LocalFunctionsServer) -> None:
    payload = b"x" * MAX_BODY
    assert request(server, "POST", "/api/echo", body=payload)[2] == payload


def test_declared_body_over_the_limit_is_refused_before_it_is_sent(server: LocalFunctionsServer) -> None:
    head = (f"POST /api/echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n").encode()
    reply = raw_exchange(server, head)  # the body never follows: the server must answer anyway
    assert reply.startswith(b"HTTP/1.1 413 ")
    assert b"Connection: close" in reply


def test_expect_continue_over_the_limit_gets_413_instead_of_100(server: LocalFunctionsServer) -> None:
    head = (f"POST /api/echo HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\n"
            f"Content-Length: {10 * MAX_BODY}\r\n\r\n").encode()
    reply = raw_exchange(server, head)
    assert reply.startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in reply


def test_chunked_body_over_the_limit_is_refused(server: LocalFunctionsServer) -> None:
    head = b"POST /api/echo HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
    # One chunk announced larger than the limit: refused from its size line, before its data.
    one_big = head + f"{MAX_BODY + 1:x}\r\n".encode()
    assert raw_exchange(server, one_big).startswith(b"HTTP/1.1 413 ")
    # Small chunks adding up past the limit.
    chunk = b"x" * 300
    many_small = head + b"".join(b"12c\r\n" + chunk + b"\r\n" for _ in range(4))
    assert raw_exchange(server, many_small).startswith(b"HTTP/1.1 413 ")


@pytest.mark.parametrize(("headers", "status"), [
    ("", 411),
    ("Content-Length: abc\r\n", 400),
    ("Content-Length: -1\r\n", 400),
    ("Content-Length: 3\r\nContent-Length: 4\r\n", 400),
    ("Content-Length: 3\r\nTransfer-Encoding: chunked\r\n", 400),
    ("Transfer-Encoding: gzip\r\n", 501),
])
def test_bad_or_missing_length_on_post(server: LocalFunctionsServer, headers: str, status: int) -> None:
    reply = raw_exchange(server, f"POST /api/echo HTTP/1.1\r\nHost: localhost\r\n{headers}\r\nabc".encode())
    assert reply.startswith(f"HTTP/1.1 {status} ".encode())


@pytest.mark.parametrize(("head", "status"), [
    (b"GET /api/pid HTTP/1.1\r\nHost : x\r\n\r\n", 400),
    (b"GET /api/pid HTTP/1.1\r\nHost: x\r\n folded: value\r\n\r\n", 400),
    (b"GET /api/pid HTTP/1.1\r\nNo colon here\r\n\r\n", 400),
    (b"GET /api/pid HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    (b"GET /api/pid\r\n\r\n", 400),
    (b"GET /api/pid HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 101 + b"\r\n", 431),
    (b"POST /api/echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
])
def test_malformed_request_head(server: LocalFunctionsServer, head: bytes, status: int) -> None:
    assert raw_exchange(server, head).startswith(f"HTTP/1.1 {status} ".encode())


def test_malformed_chunk_size_is_400(server: LocalFunctionsServer) -> None:
    data = b"POST /api/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0x10\r\n"
    assert raw_exchange(server, data).startswith(b"HTTP/1.1 400 ")


def test_slow_client_is_dropped(loaded: tuple[object, str]) -> None:
    app, prefix = loaded
    with serving(app, prefix, connection_timeout=0.5) as running:
        started = time.monotonic()
        # Headers never finished.
        assert raw_exchange(running, b"GET /api/pid HTTP/1.1\r\nHost: x\r\n") == b""
        # Body shorter than announced.
        partial = b"POST /api/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc"
        assert raw_exchange(running, partial) == b""
        assert time.monotonic() - started < 5
        assert request(running, "GET", "/api/pid")[0] == 200


# ------------------------------------------------------------------------------------------ failures


def test_exception_becomes_a_generic_500_and_a_logged_traceback(server: LocalFunctionsServer,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="scep.http.localhost"):
        status, headers, body = request(server, "GET", "/api/boom")
    assert status == 500
    assert body == b"Internal Server Error\n"
    assert b"hunter2" not in body and b"Traceback" not in body
    logged = [record for record in caplog.records if record.exc_info]
    assert logged and "hunter2" in str(logged[0].exc_info[1])
    assert request(server, "GET", "/api/pid")[0] == 200  # the server carries on


# ------------------------------------------------------------------------------------------ connections


def test_keep_alive_reuses_the_connection(server: LocalFunctionsServer) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request("GET", "/api/pid")
        assert connection.getresponse().read() == str(os.getpid()).encode()
        first_socket = connection.sock
        for path, body in [("/api/echo", b"abc"), ("/api/nowhere", None), ("/api/echo", b"x" * 500)]:
            connection.request("POST" if body else "GET", path, body=body)
            response = connection.getresponse()
            response.read()
            assert response.getheader("Connection") is None
            assert connection.sock is first_socket
    finally:
        connection.close()


def test_http_1_0_keep_alive(server: LocalFunctionsServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        for _ in range(2):
            raw.sendall(b"GET /api/pid HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            response = http.client.HTTPResponse(raw)
            response.begin()
            assert response.getheader("Connection") == "keep-alive"
            assert response.read() == str(os.getpid()).encode()
        raw.sendall(b"GET /api/pid HTTP/1.0\r\n\r\n")
        response = http.client.HTTPResponse(raw)
        response.begin()
        assert response.getheader("Connection") == "close"
        response.read()


# ------------------------------------------------------------------------------------------ processes


def children_of(parent: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == parent and state != "Z":
            found.add(int(entry.name))
    return found


def workers_of(parent: int, count: int, without: set[int] = frozenset()) -> set[int] | None:
    """The parent's live children once there are `count` of them and none of `without`."""
    found = children_of(parent)
    return found if len(found) == count and not found & without else None


def wait_for(condition, seconds: float = 15):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


@contextlib.contextmanager
def server_process(app_dir: tuple[str, Path], workers: int) -> Iterator[tuple[subprocess.Popen, str]]:
    spec, directory = app_dir
    environment = dict(os.environ, PYTHONPATH=str(REPOSITORY))
    process = subprocess.Popen([sys.executable, "-c", SERVE_SCRIPT, spec, str(directory), str(workers)],
                               cwd=REPOSITORY, env=environment, stdout=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        yield process, url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)
        process.stdout.close()


def get_pid(url: str) -> int:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("GET", "/api/pid")
        response = connection.getresponse()
        assert response.status == 200
        return int(response.read())
    finally:
        connection.close()


def test_prefork_workers_share_the_socket_and_are_replaced(app_dir: tuple[str, Path]) -> None:
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc to see the worker processes")
    with server_process(app_dir, workers=2) as (process, url):
        original = wait_for(lambda: workers_of(process.pid, count=2))
        assert get_pid(url) in original

        first, second = sorted(original)
        os.kill(first, signal.SIGKILL)
        replaced = wait_for(lambda: workers_of(process.pid, count=2, without={first}))
        assert second in replaced
        assert get_pid(url) in replaced  # served throughout

        os.kill(second, signal.SIGKILL)
        fresh = wait_for(lambda: workers_of(process.pid, count=2, without=original))
        assert {get_pid(url) for _ in range(10)} <= fresh

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        for pid in fresh:
            assert not Path(f"/proc/{pid}").exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_stops_the_server_cleanly(app_dir: tuple[str, Path], workers: int) -> None:
    with server_process(app_dir, workers=workers) as (process, url):
        get_pid(url)
        workers_seen = children_of(process.pid) if Path("/proc").is_dir() else set()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers_seen)
        host, port = url.removeprefix("http://").split(":")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, int(port)), timeout=5).close()
