"""Issue 14: a hostile (or merely unusual) client against the running stack, loopback only, bounded in count and time.

Each class of probe from the issue has a test here: bursts past the processor cluster's old limit, every legal framing
of a chat body, methods Envoy used to hold or cut, Envoy's own edge limits (connection cap, header timeout), HTTP/2
floods and rapid reset, request smuggling, path tricks toward admin, Shimmy's native API and the emulator's control
routes, JSON abuse. The stack runs with small limits (settings below) so that every probe stays cheap.
"""

from __future__ import annotations

import json
import resource
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import httpx
import pytest

from tests.integration.conftest import Stack, free_port, start_stack, stop_stack
from tests.integration.test_observability import access_log, metric
from tests.integration.test_security import http_body, json_error_status, raw_request

CHAT = {"model": "phi3-lora", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3}
BODY = json.dumps(CHAT).encode()
MAX_CONNECTIONS = 100
HEADERS_TIMEOUT_S = 1


@pytest.fixture(scope="module")
def hostile() -> Iterator[Stack]:
    stack = start_stack({
        "MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        "REQUEST_HEADERS_TIMEOUT_S": str(HEADERS_TIMEOUT_S),
        "MAX_ACTIVE_REQUESTS": "2",
        "MAX_QUEUED_REQUESTS": "4",
    })
    try:
        yield stack
    finally:
        stop_stack(stack)


def assert_openai_error(status: int, headers: dict[str, str], body: bytes) -> dict:
    assert headers.get("content-type") == "application/json", (status, headers, body)
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


# -- HTTP/2 by hand (the h2 library), so a test controls every frame ---------------------------------------------


@dataclass
class H2Answer:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    reset: bool = False


class H2Client:
    """One HTTP/2 connection to the gateway; `send` queues frames, `collect` reads until the given streams end."""

    def __init__(self, port: int, timeout: float = 10) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.flush()
        self.answers: dict[int, H2Answer] = {}
        self.closed = False

    def flush(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    def request(self, method: str, path: str, headers: list[tuple[str, str]] | None = None,
                body: bytes | None = None, end: bool = True) -> int:
        stream = self.conn.get_next_available_stream_id()
        head = [(":method", method), (":path", path), (":scheme", "http"), (":authority", "gateway"),
                *(headers or [])]
        self.conn.send_headers(stream, head, end_stream=end and body is None)
        if body is not None:
            self.conn.send_data(stream, body, end_stream=end)
        self.answers[stream] = H2Answer()
        return stream

    def collect(self, streams: list[int], deadline: float) -> dict[int, H2Answer]:
        pending = set(streams)
        while pending and not self.closed and time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not data:
                self.closed = True
                break
            for event in self.conn.receive_data(data):
                answer = self.answers.get(getattr(event, "stream_id", 0))
                if isinstance(event, h2.events.ResponseReceived) and answer:
                    answer.headers = dict(event.headers)
                    answer.status = int(answer.headers.pop(":status"))
                elif isinstance(event, h2.events.DataReceived) and answer:
                    answer.body += event.data
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)) and answer:
                    answer.reset = isinstance(event, h2.events.StreamReset)
                    pending.discard(event.stream_id)
                elif isinstance(event, h2.events.ConnectionTerminated):
                    self.closed = True
            self.sock.sendall(self.conn.data_to_send())
        return {s: self.answers[s] for s in streams}

    def close(self) -> None:
        self.sock.close()


# -- 3: no 500 from load alone ------------------------------------------------------------------------------------


def test_a_burst_past_1024_requests_gets_no_500_and_every_refusal_has_retry_after(hostile: Stack) -> None:
    """2,000 health checks at once (20 HTTP/2 connections x 100 streams) and 50 chats during them."""
    hostile.configure(token_delay_ms=20)
    clients = [H2Client(hostile.gateway_port) for _ in range(20)]
    start = threading.Barrier(len(clients) + 50)
    health: list[H2Answer] = []
    chats: list[httpx.Response | Exception] = []

    def burst(client: H2Client) -> None:
        streams = [client.request("GET", "/v1/health") for _ in range(100)]
        frames = client.conn.data_to_send()  # encoded beforehand, so the 2,000 requests arrive together
        start.wait()
        client.sock.sendall(frames)
        health.extend(client.collect(streams, time.monotonic() + 30).values())

    def chat() -> None:
        start.wait()
        try:
            chats.append(httpx.post(f"{hostile.url}/v1/chat/completions", json=CHAT, timeout=30))
        except httpx.HTTPError as exc:
            chats.append(exc)

    threads = [threading.Thread(target=burst, args=(c,)) for c in clients] + [
        threading.Thread(target=chat) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for c in clients:
        c.close()
    assert len(health) == 2000 and len(chats) == 50
    statuses = sorted({a.status for a in health}) + sorted({getattr(r, "status_code", 0) for r in chats})
    assert 500 not in statuses, statuses
    for answer in health:
        assert answer.status == 200 or (answer.status == 503 and "retry-after" in answer.headers), answer
    served = 0
    for resp in chats:
        assert isinstance(resp, httpx.Response), resp
        if resp.status_code == 200:
            served += 1
            continue
        assert resp.status_code in (429, 503) and "retry-after" in resp.headers, (resp.status_code, resp.text)
        assert_openai_error(resp.status_code, dict(resp.headers), resp.content)
    assert served >= 6  # two at a time into Shimmy, four queued: the queue serves, the rest get 429


# -- 4: every legal framing --------------------------------------------------------------------------------------


def test_a_chunked_chat_body_is_accepted(hostile: Stack) -> None:
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    half = len(BODY) // 2
    chunks = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (half, BODY[:half], len(BODY) - half, BODY[half:])
    answer = raw_request(hostile, head + chunks)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert json.loads(http_body(answer))["object"] == "chat.completion"


def test_an_http2_chat_body_without_content_length_is_accepted_and_no_body_is_missing_body(hostile: Stack) -> None:
    client = H2Client(hostile.gateway_port)
    try:
        json_type = [("content-type", "application/json")]
        with_body = client.request("POST", "/v1/chat/completions", json_type, BODY)
        without = client.request("POST", "/v1/chat/completions", json_type)
        client.flush()
        answers = client.collect([with_body, without], time.monotonic() + 10)
    finally:
        client.close()
    assert answers[with_body].status == 200, answers[with_body]
    assert json.loads(answers[with_body].body)["object"] == "chat.completion"
    missing = answers[without]
    assert missing.status == 400 and assert_openai_error(400, missing.headers, missing.body)["code"] == "missing_body"


def test_an_http1_post_without_length_or_chunks_is_missing_body_and_never_reaches_shimmy(hostile: Stack) -> None:
    before = hostile.emulator_stats()
    answer = raw_request(hostile, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                                  b"\r\nConnection: close\r\n\r\n")
    status, body = json_error_status(answer)
    assert status == 400 and json.loads(body)["error"]["code"] == "missing_body"
    assert hostile.emulator_stats() == before


def test_a_chunked_body_over_the_limit_is_413(hostile: Stack) -> None:
    chunk = b"x" * 65536
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    with socket.create_connection(("127.0.0.1", hostile.gateway_port), timeout=5) as conn:
        conn.sendall(head)
        try:
            for _ in range(20):  # 1.25 MiB, past the 1 MiB limit
                conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:
            pass  # Envoy may answer and close before taking it all
        answer = conn.recv(65536)
    status, body = json_error_status(answer)
    assert status == 413 and b'"request_too_large"' in body


@pytest.mark.parametrize("request_line", [b"CONNECT 127.0.0.1:22 HTTP/1.1", b"CONNECT gateway:443 HTTP/1.1",
                                          b"FOO /v1/models HTTP/1.1", b"PROPFIND /v1/chat/completions HTTP/1.1"])
def test_connect_and_unknown_methods_are_an_immediate_405(hostile: Stack, request_line: bytes) -> None:
    started = time.monotonic()
    answer = raw_request(hostile, request_line + b"\r\nHost: 127.0.0.1:22\r\n\r\n")
    assert time.monotonic() - started < 2, "held instead of answered"
    status, body = json_error_status(answer)
    assert status == 405 and json.loads(body)["error"]["code"] == "method_not_allowed"


def test_an_http2_connect_is_an_immediate_405(hostile: Stack) -> None:
    client = H2Client(hostile.gateway_port)
    try:
        stream = client.conn.get_next_available_stream_id()
        client.conn.send_headers(stream, [(":method", "CONNECT"), (":authority", "127.0.0.1:22")])
        client.answers[stream] = H2Answer()
        client.flush()
        answer = client.collect([stream], time.monotonic() + 2)[stream]
    finally:
        client.close()
    assert answer.status == 405, answer
    assert assert_openai_error(405, answer.headers, answer.body)["code"] == "method_not_allowed"


@pytest.mark.parametrize("encoding", [b"gzip", b"chunked, chunked", b"identity", b"chunked\r\nTransfer-Encoding: x"])
def test_invalid_transfer_encoding_is_a_400_in_openai_shape(hostile: Stack, encoding: bytes) -> None:
    answer = raw_request(hostile, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                                  b"\r\nTransfer-Encoding: " + encoding + b"\r\n\r\n0\r\n\r\n")
    status, body = json_error_status(answer)
    assert status == 400 and json.loads(body)["error"]["type"] == "invalid_request_error"


# -- 5: Envoy's own edge limits ----------------------------------------------------------------------------------


def _served(conn: socket.socket) -> bool:
    """Whether a request on `conn` gets an answer (False: Envoy closed or reset the connection)."""
    try:
        conn.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        return conn.recv(65536).startswith(b"HTTP/1.1 ")
    except OSError:
        return False


def test_connections_past_the_cap_are_closed_and_the_gateway_recovers(hostile: Stack) -> None:
    deadline = time.monotonic() + 10  # earlier tests' connections are closed, and Envoy has counted them out
    while hostile.envoy_stats("http.gateway.downstream_cx_active").get("http.gateway.downstream_cx_active", 0):
        assert time.monotonic() < deadline, "connections from earlier tests still open"
        time.sleep(0.05)
    held: list[socket.socket] = []
    try:
        refused = None
        for _ in range(MAX_CONNECTIONS + 5):
            conn = socket.create_connection(("127.0.0.1", hostile.gateway_port), timeout=5)
            if not _served(conn):
                refused = conn
                break
            held.append(conn)
        assert refused is not None, "no connection was refused past the cap"
        refused.close()
        # The supervisor's readiness probe may hold a slot meanwhile.
        assert MAX_CONNECTIONS - 2 <= len(held) <= MAX_CONNECTIONS
    finally:
        for conn in held:
            conn.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.create_connection(("127.0.0.1", hostile.gateway_port), timeout=5) as conn:
            if _served(conn):
                return
        time.sleep(0.1)
    raise AssertionError("the gateway did not serve again after the connections closed")


def test_the_heap_monitor_reads_envoys_heap_and_stays_below_its_limit(hostile: Stack) -> None:
    """The fixed-heap monitor reads this Envoy build's heap (the next test sees it pass a 1 MiB limit), and normal use
    is far from the default limit."""
    gauges = hostile.envoy_stats("overload.envoy.")
    assert gauges["overload.envoy.resource_monitors.fixed_heap.failed_updates"] == 0, gauges
    assert gauges["overload.envoy.resource_monitors.fixed_heap.pressure"] < 50, gauges  # % of 512 MiB
    assert gauges["overload.envoy.overload_actions.stop_accepting_requests.active"] == 0, gauges


def test_past_the_heap_limit_every_api_gets_its_own_503_overloaded_with_retry_after() -> None:
    """ENVOY_MAX_HEAP_MB below Envoy's heap: the overload manager refuses requests, in each API's error shape."""
    stack = start_stack({"ENVOY_MAX_HEAP_MB": "1"}, wait=False)
    try:
        active = "overload.envoy.overload_actions.stop_accepting_requests.active"
        deadline = time.monotonic() + 10
        while stack.envoy_stats(active).get(active) != 1:
            assert time.monotonic() < deadline, stack.envoy_stats("overload.")
            time.sleep(0.1)
        chat = httpx.post(f"{stack.url}/v1/chat/completions", json=CHAT, timeout=10)
        assert chat.status_code == 503
        assert chat.headers["retry-after"] == "1"
        error = assert_openai_error(chat.status_code, dict(chat.headers), chat.content)
        assert (error["type"], error["code"]) == ("server_error", "overloaded")
        messages = httpx.post(
            f"{stack.url}/v1/messages",
            json={"model": "phi3-lora", "max_tokens": 3, "messages": [{"role": "user", "content": "x"}]},
            timeout=10,
        )
        assert messages.status_code == 503
        assert messages.headers["retry-after"] == "1"
        assert messages.json() == {
            "type": "error",
            "error": {"type": "overloaded_error", "message": "The gateway is short of memory; retry later"},
        }
        assert httpx.get(f"{stack.url}/v1/models", timeout=10).json()["error"]["code"] == "overloaded"
    finally:
        stop_stack(stack)


def test_a_client_sending_headers_too_slowly_is_cut_off(hostile: Stack) -> None:
    """One byte every 0.2 s keeps the connection busy (no idle timeout), but the headers never end."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", hostile.gateway_port), timeout=1) as conn:
        conn.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        closed = False
        while not closed and time.monotonic() - started < HEADERS_TIMEOUT_S + 5:
            try:
                conn.sendall(b"a")
                conn.settimeout(0.2)
                closed = conn.recv(65536) == b""
            except TimeoutError:
                continue
            except OSError:
                closed = True
    assert closed, "the connection was still open"
    assert time.monotonic() - started < HEADERS_TIMEOUT_S + 3


# -- HTTP/2 floods and rapid reset -------------------------------------------------------------------------------


def test_http2_rapid_reset_leaves_the_gateway_serving(hostile: Stack) -> None:
    client = H2Client(hostile.gateway_port)
    try:
        for _ in range(10):  # 10 rounds of 100 streams opened and cancelled at once
            for _ in range(100):
                try:
                    stream = client.request("POST", "/v1/chat/completions", [("content-type", "application/json")],
                                            BODY, end=False)
                    client.conn.reset_stream(stream)
                except h2.exceptions.ProtocolError:
                    break  # Envoy already sent GOAWAY
            try:
                client.flush()
            except OSError:
                break
    finally:
        client.close()
    assert httpx.get(f"{hostile.url}/health").status_code == 200
    assert httpx.post(f"{hostile.url}/v1/chat/completions", json=CHAT).status_code == 200


def test_http2_control_frame_flood_is_cut_and_the_gateway_keeps_serving(hostile: Stack) -> None:
    client = H2Client(hostile.gateway_port)
    try:
        for i in range(20_000):  # PINGs whose ACKs are never read: Envoy's outbound-frame limit closes us
            client.conn.ping(i.to_bytes(8, "big"))
            if i % 1000 == 999:
                try:
                    client.flush()
                except OSError:
                    break
    finally:
        client.close()
    assert httpx.get(f"{hostile.url}/health").status_code == 200


# -- smuggling, paths, JSON abuse --------------------------------------------------------------------------------


@pytest.mark.parametrize("smuggle", [
    b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /_emulator/stats HTTP/1.1\r\nHost: x\r\n\r\n",
    b"Content-Length: 0\r\nContent-Length: 44\r\n\r\nGET /api/models HTTP/1.1\r\nHost: x\r\n\r\n",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
    b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
])
def test_request_smuggling_never_reaches_shimmy(hostile: Stack, smuggle: bytes) -> None:
    before = hostile.emulator_stats()
    answer = raw_request(hostile, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                  b"Content-Type: application/json\r\n" + smuggle)
    assert answer.count(b"HTTP/1.1 ") <= 1, answer  # never a second, smuggled answer
    status, _ = json_error_status(answer)
    assert 400 <= status < 500
    assert hostile.emulator_stats() == before


@pytest.mark.parametrize("path", [
    "/api/generate", "/api/models", "/_emulator/stats", "/_emulator/config", "/v1/../api/generate",
    "/v1/chat/completions/../../_emulator/reset", "/%2e%2e/_emulator/stats", "/stats/prometheus", "/config_dump",
    "//_emulator/stats", "/v1/models/..%2f..%2fapi%2fgenerate", "/metrics/../_emulator/stats",
])
def test_no_path_reaches_shimmy_native_api_admin_or_the_emulator_controls(hostile: Stack, path: str) -> None:
    before = hostile.emulator_stats()
    for method in ("GET", "POST", "PUT"):
        answer = raw_request(hostile, f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                                      "Connection: close\r\n\r\n".encode())
        status, _ = json_error_status(answer)
        assert status in (400, 404, 405), (method, path, answer)
    assert hostile.emulator_stats() == before


@pytest.mark.parametrize("body", [
    b'{"model":"phi3-lora","messages":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"model":"phi3-lora","model":"x","messages":[{"role":"user","content":"x"}],"stop":' + b'"a",' * 10 + b"}",
    b'{"model":"phi3-lora","messages":[{"role":"user","content":"\\ud800"}]}',
    b'{"model":"phi3-lora","messages":[{"role":"user","content":"x"}],"max_tokens":1e400}',
    b'{"model":"phi3-lora","messages":[{"role":"user","content":"x"}],"stop":"' + b"s" * 50_000 + b'"}',
    b"\xef\xbb\xbf" + BODY,
])
def test_json_abuse_is_a_400_in_openai_shape(hostile: Stack, body: bytes) -> None:
    resp = httpx.post(f"{hostile.url}/v1/chat/completions", content=body,
                      headers={"content-type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert assert_openai_error(400, dict(resp.headers), resp.content)["type"] == "invalid_request_error"


# -- Issue 22, items 6 and 7: the edge with the shipped settings (the session's default stack) --------------------

SILENT = 1024  # MAX_CONNECTIONS' default
DEFAULT_HEADERS_TIMEOUT_S = 10  # REQUEST_HEADERS_TIMEOUT_S' default


def _fds_for(count: int) -> None:
    """Room for `count` more sockets in this process (the soft limit may be 1,024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < count + 256:
        wanted = count + 256 if hard == resource.RLIM_INFINITY else min(hard, count + 256)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        if wanted < count + 256:
            pytest.skip(f"RLIMIT_NOFILE's hard limit {hard} is too low for {count} sockets")


def test_silent_connections_cannot_hold_the_connection_cap(stack: Stack) -> None:
    """1,024 connections that send nothing fill MAX_CONNECTIONS; Envoy closes them after REQUEST_HEADERS_TIMEOUT_S
    (its idle timeout was the one-hour default: every new client was reset for an hour), and new clients are
    served again."""
    _fds_for(SILENT)
    silent: list[socket.socket] = []
    try:
        for _ in range(SILENT):
            silent.append(socket.create_connection(("127.0.0.1", stack.gateway_port), timeout=5))
        started = time.monotonic()
        while True:
            with socket.create_connection(("127.0.0.1", stack.gateway_port), timeout=5) as conn:
                if _served(conn):
                    break
            assert time.monotonic() - started < DEFAULT_HEADERS_TIMEOUT_S + 10, "new clients still refused"
            time.sleep(0.25)
        closed = 0
        for conn in silent:
            conn.settimeout(0.05)
            try:
                closed += conn.recv(1) == b""
            except TimeoutError:
                pass
            except OSError:
                closed += 1
        assert closed >= SILENT - 2, closed  # the supervisor's probe may have taken one slot
    finally:
        for conn in silent:
            conn.close()
    assert httpx.post(f"{stack.url}/v1/chat/completions", json=CHAT, timeout=10).status_code == 200


FORWARDING = {
    "X-Forwarded-For": "203.0.113.9", "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https",
    "X-Forwarded-Port": "443", "Forwarded": "for=203.0.113.9;proto=https", "X-Real-IP": "203.0.113.9",
}


def test_forwarding_headers_never_reach_shimmy_and_the_log_has_the_real_client(stack: Stack) -> None:
    """A client cannot speak for a proxy: its X-Forwarded-*, Forwarded and X-Real-IP are dropped, Envoy adds none
    of its own for Shimmy, and the access log names the connection's peer."""
    marker = f"fwd-{time.monotonic_ns()}"
    resp = httpx.post(f"{stack.url}/v1/chat/completions", json=CHAT, timeout=10,
                      headers={**FORWARDING, "x-request-id": marker})
    assert resp.status_code == 200, resp.text
    seen = {k.lower() for k in stack.emulator_stats()["last_generate_headers"]}
    assert not seen & {"x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-forwarded-port",
                       "forwarded", "x-real-ip"}, seen
    deadline = time.monotonic() + 5
    while not (lines := [ln for ln in stack.output().splitlines() if marker in ln and '"source":"envoy"' in ln]):
        assert time.monotonic() < deadline, "no access log line"
        time.sleep(0.1)
    entry = json.loads(lines[-1].partition("] ")[2])
    assert entry["client"] == "127.0.0.1", entry


def test_behind_a_trusted_proxy_the_log_names_the_client_it_forwarded() -> None:
    """XFF_TRUSTED_HOPS=1 (one proxy in front, e.g. an ingress): the access log's client is the address that proxy
    appended to X-Forwarded-For, not an earlier entry a client wrote; Shimmy still sees no forwarding header."""
    stack = start_stack({"XFF_TRUSTED_HOPS": "1"})
    try:
        marker = f"hop-{time.monotonic_ns()}"
        resp = httpx.post(f"{stack.url}/v1/chat/completions", json=CHAT, timeout=10, headers={
            "X-Forwarded-For": "203.0.113.9, 198.51.100.7", "x-request-id": marker})
        assert resp.status_code == 200, resp.text
        assert not {k.lower() for k in stack.emulator_stats()["last_generate_headers"]} & {"x-forwarded-for"}
        deadline = time.monotonic() + 5
        while not (lines := [ln for ln in stack.output().splitlines() if marker in ln and '"source":"envoy"' in ln]):
            assert time.monotonic() < deadline, "no access log line"
            time.sleep(0.1)
        assert json.loads(lines[-1].partition("] ")[2])["client"] == "198.51.100.7"
    finally:
        stop_stack(stack)


UPGRADE = b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n" \
          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"


# GET /v1/responses is WebSocket mode (tests/integration/test_responses_ws.py); a POST upgrade there is not.
@pytest.mark.parametrize("path", [b"/v1/chat/completions", b"/v1/models", b"/nowhere"])
def test_a_websocket_upgrade_is_refused_in_openai_shape(stack: Stack, path: bytes) -> None:
    answer = raw_request(stack, UPGRADE % path)
    status, body = json_error_status(answer)
    error = assert_openai_error(status, _headers(answer), body)
    assert (status, error["code"]) == (400, "websocket_not_supported"), answer


def test_a_post_upgrade_on_responses_is_refused(stack: Stack) -> None:
    answer = raw_request(stack, UPGRADE.replace(b"GET", b"POST") % b"/v1/responses")
    status, body = json_error_status(answer)
    assert (status, assert_openai_error(status, _headers(answer), body)["code"]) == (400, "websocket_not_supported")


def test_a_websocket_upgrade_on_messages_is_refused_in_anthropic_shape(stack: Stack) -> None:
    answer = raw_request(stack, UPGRADE % b"/v1/messages")
    assert answer.startswith(b"HTTP/1.1 400 ") and _headers(answer)["content-type"] == "application/json", answer
    body = json.loads(http_body(answer))
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
    assert "WebSocket" in body["error"]["message"]


def test_oversized_headers_are_the_gateways_431_and_large_ones_are_served(stack: Stack) -> None:
    """Past Envoy's 32 KiB of headers: 431 headers_too_large in OpenAI's shape (a 59 KB header used to pass Envoy
    and come back as "Shimmy rejected the request"); below it, the request is served."""
    resp = httpx.get(f"{stack.url}/v1/models", headers={"x-big": "a" * 59_000}, timeout=10)
    assert resp.status_code == 431, resp.text
    error = assert_openai_error(resp.status_code, dict(resp.headers), resp.content)
    assert error["code"] == "headers_too_large" and "32 KiB" in error["message"], error
    resp = httpx.get(f"{stack.url}/v1/models", headers={"x-big": "a" * 20_000}, timeout=10)
    assert resp.status_code == 200, resp.text
    many = {f"x-h{i}": "1" for i in range(80)}
    resp = httpx.get(f"{stack.url}/v1/models", headers=many, timeout=10)
    assert resp.status_code == 431 and resp.json()["error"]["code"] == "headers_too_large", resp.text


def _headers(answer: bytes) -> dict[str, str]:
    head = answer.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head)}


# -- issue 22: what a client's own values make the processor do (schemas, stop sequences, tool-call detection) ------


class _Witness:
    """A loopback HTTP server that a client's `$ref` points at: the gateway must never ask it for anything."""

    def __init__(self) -> None:
        import http.server

        self.requests: list[str] = []
        witness = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                witness.requests.append(self.path)
                body = b'{"type": "string"}'
                self.send_response(200)
                self.send_header("Content-Type", "application/schema+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/x.json"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def witness() -> Iterator[_Witness]:
    server = _Witness()
    yield server
    server.close()


def _schema_requests(ref: str) -> list[tuple[str, dict, str, str]]:
    """(path, body, the param the 400 must name, the model reply that would be validated) for each place a client's
    schema goes: chat's response_format and tool parameters, Messages' input_schema, Responses' text.format."""
    schema = {"type": "object", "properties": {"a": {"$ref": ref}}, "required": ["a"]}
    call = '{"name": "f", "arguments": {"a": 1}}'
    ask = [{"role": "user", "content": "x"}]
    return [
        ("/v1/chat/completions",
         {"model": "phi3-lora", "messages": ask,
          "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}},
         "response_format.json_schema.schema", '{"a": 1}'),
        ("/v1/chat/completions",
         {"model": "phi3-lora", "messages": ask,
          "tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}]},
         "tools[0].function.parameters", call),
        ("/v1/messages",
         {"model": "phi3-lora", "max_tokens": 16, "messages": ask,
          "tools": [{"name": "f", "input_schema": schema}]},
         "tools[0].input_schema", call),
        ("/v1/responses",
         {"model": "phi3-lora", "input": "x",
          "text": {"format": {"type": "json_schema", "name": "s", "schema": schema}}},
         "text.format.schema", '{"a": 1}'),
    ]


def _error_text(resp: httpx.Response) -> str:
    error = resp.json()["error"]
    return f"{error.get('param') or ''} {error['message']}"


def test_a_schema_ref_to_a_url_is_a_400_and_never_fetched(hostile: Stack, witness: _Witness) -> None:
    for path, body, param, reply in _schema_requests(witness.url):
        hostile.configure(reply=reply)
        resp = httpx.post(f"{hostile.url}{path}", json=body, timeout=30)
        assert resp.status_code == 400, (path, resp.status_code, resp.text)
        assert param in _error_text(resp), (path, resp.text)
    assert witness.requests == []


def test_a_schema_ref_to_a_file_is_a_400_and_its_content_never_comes_back(hostile: Stack, tmp_path) -> None:
    secret = tmp_path / "secret.json"
    secret.write_text('{"type": "string", "description": "TOP-SECRET-7f3a"}')
    for path, body, param, reply in _schema_requests(secret.as_uri()):
        hostile.configure(reply=reply)
        resp = httpx.post(f"{hostile.url}{path}", json=body, timeout=30)
        assert resp.status_code == 400, (path, resp.status_code, resp.text)
        assert "TOP-SECRET" not in resp.text and param in _error_text(resp), (path, resp.text)


def test_an_unresolvable_local_ref_is_a_400_not_a_500(hostile: Stack) -> None:
    for path, body, param, reply in _schema_requests("#/$defs/missing"):
        hostile.configure(reply=reply)
        resp = httpx.post(f"{hostile.url}{path}", json=body, timeout=30)
        assert resp.status_code == 400, (path, resp.status_code, resp.text)
        assert param in _error_text(resp), (path, resp.text)
    assert "Traceback" not in hostile.output()


def test_a_one_mib_stop_sequence_is_a_400_naming_it(hostile: Stack) -> None:
    body = {"model": "phi3-lora", "max_tokens": 3, "messages": [{"role": "user", "content": "x"}],
            "stop_sequences": ["s" * 1_000_000]}
    resp = httpx.post(f"{hostile.url}/v1/messages", json=body, timeout=30)
    assert resp.status_code == 400, resp.text[:500]
    assert "stop_sequences" in resp.json()["error"]["message"]


def test_a_hundred_maximal_stop_sets_leave_the_processor_memory_flat(hostile: Stack) -> None:
    import random
    import string

    from bench.soak import extproc_pid, rss_bytes
    from extproc.stops import MAX_STOP_CHARACTERS, MAX_STOP_LENGTH, MAX_STOP_SEQUENCES

    pid = extproc_pid(hostile.proc.pid)
    assert pid is not None
    count = min(MAX_STOP_SEQUENCES, MAX_STOP_CHARACTERS // MAX_STOP_LENGTH)
    rng = random.Random(22)
    body = {"model": "phi3-lora", "max_tokens": 3, "messages": [{"role": "user", "content": "x"}]}

    def maximal() -> list[str]:
        return ["".join(rng.choices(string.ascii_letters, k=MAX_STOP_LENGTH)) for _ in range(count)]

    with httpx.Client(timeout=30) as http:
        for _ in range(5):  # the processor's own warm-up (imports, first allocations) is not what is measured
            resp = http.post(f"{hostile.url}/v1/messages", json={**body, "stop_sequences": maximal()})
            assert resp.status_code == 200, resp.text
        before = rss_bytes(pid)
        for api, key in [("/v1/messages", "stop_sequences"), ("/v1/chat/completions", "stop")] * 50:
            resp = http.post(f"{hostile.url}{api}", json={**body, key: maximal()})
            assert resp.status_code == 200, resp.text
        after = rss_bytes(pid)
    assert before is not None and after is not None
    assert after - before < 20 * 2**20, f"processor RSS grew by {(after - before) / 2**20:.1f} MiB"


@pytest.mark.parametrize("prose", ["[1] The answer is 42.", "[citation needed] maybe", "{braces} are prose too"])
def test_prose_that_begins_with_a_bracket_is_text_with_tools_offered(hostile: Stack, prose: str) -> None:
    hostile.configure(reply=prose)
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    ask = [{"role": "user", "content": "x"}]
    chat = {"model": "phi3-lora", "messages": ask, "max_tokens": 32,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}]}
    with httpx.Client(base_url=hostile.url, timeout=30) as http:
        resp = http.post("/v1/chat/completions", json=chat)
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"] == prose
        with http.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as streamed:
            events = [json.loads(line[6:]) for line in streamed.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        assert all("error" not in event for event in events), events
        assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices")) == prose
        resp = http.post("/v1/messages", json={"model": "phi3-lora", "max_tokens": 32, "messages": ask,
                                               "tools": [{"name": "f", "input_schema": schema}]})
        assert resp.status_code == 200, resp.text
        assert resp.json()["content"] == [{"type": "text", "text": prose}]
        resp = http.post("/v1/responses", json={"model": "phi3-lora", "input": "x",
                                                "tools": [{"type": "function", "name": "f", "parameters": schema}]})
        assert resp.status_code == 200, resp.text
        [message] = [item for item in resp.json()["output"] if item["type"] == "message"]
        assert message["content"][0]["text"] == prose


# -- issue 22 items 3 and 5: a failed generation's slot; a Shimmy gone silent -----------------------------------


def _slots(stack: Stack) -> tuple[float, float]:
    """(slots busy, abandoned generations counted as client_gone so far) from the processor's metrics."""
    text = httpx.get(f"{stack.url}/metrics").text
    return metric(text, "shimmy_slots_busy"), metric(text, "shimmy_abandoned_generations_total", reason="client_gone")


def test_a_failed_one_piece_generation_gives_its_slot_back_at_once(hostile: Stack) -> None:
    """1.x answers a non-stream generation in one piece, and a failure as an empty 502: Shimmy is done by then, so
    the slot is free within a second, not counted as abandoned for the default pace's ~85 s."""
    assert _slots(hostile)[0] == 0
    _, abandoned = _slots(hostile)
    hostile.configure(error_after=2, token_delay_ms=20)
    answer = httpx.post(f"{hostile.url}/v1/chat/completions", json={**CHAT, "max_tokens": 256}, timeout=30)
    assert answer.status_code == 502 and answer.json()["error"]["code"] == "generation_failed", answer.text
    failed = time.monotonic()
    while _slots(hostile)[0] != 0:
        assert time.monotonic() - failed < 1, "the failed generation still holds its slot"
        time.sleep(0.05)
    assert _slots(hostile)[1] == abandoned  # not counted as a generation Shimmy goes on with for nobody


SILENT_TIMEOUT_S = 8  # the processor's deadline is 2 s earlier (6 s), Envoy's route timeout 1 s earlier (7 s)


@pytest.fixture(scope="module")
def silent() -> Iterator[Stack]:
    """A stack whose generations end soon and whose streams get a keep-alive every second of silence (a third of
    STREAM_IDLE_TIMEOUT_S)."""
    stack = start_stack({"GENERATION_TIMEOUT_S": str(SILENT_TIMEOUT_S), "STREAM_IDLE_TIMEOUT_S": "3",
                         "MAX_ACTIVE_REQUESTS": "4"})
    try:
        yield stack
    finally:
        stop_stack(stack)


def _stream(
    stack: Stack, path: str, body: dict, headers: dict[str, str] | None = None
) -> tuple[list[tuple[float, str]], float]:
    """A stream's lines with their arrival (seconds from the request), read to the end; and the whole duration."""
    lines: list[tuple[float, str]] = []
    started = time.monotonic()
    with httpx.stream("POST", f"{stack.url}{path}", json={**body, "stream": True}, headers=headers,
                      timeout=SILENT_TIMEOUT_S + 5) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            lines.append((time.monotonic() - started, line))
    return lines, time.monotonic() - started


def test_a_shimmy_silent_mid_stream_gets_the_client_an_in_band_timeout_at_the_deadline(silent: Stack) -> None:
    silent.configure(stall_after=2, repeat=True)
    request_id = f"silent-{time.monotonic_ns()}"
    lines, took = _stream(silent, "/v1/chat/completions", {**CHAT, "max_tokens": 50}, {"x-request-id": request_id})
    data = [line for _, line in lines if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]", lines  # the stream ends cleanly, not with a reset
    error = json.loads(data[-2].removeprefix("data: "))["error"]
    assert error["code"] == "timeout" and error["type"] == "server_error", error
    assert SILENT_TIMEOUT_S - 2 - 0.5 < took < SILENT_TIMEOUT_S - 1, took  # the processor's, before Envoy's cut
    entry = access_log(silent, request_id)
    assert entry["model"] == "phi3-lora" and entry["outcome"] == "error", entry


def test_a_messages_stream_gone_silent_gets_pings_then_its_error_event(silent: Stack) -> None:
    """Anthropic's `ping` every second of Shimmy's silence (a third of STREAM_IDLE_TIMEOUT_S, so Envoy's idle timer
    never cuts it), then its `error` event at the deadline."""
    silent.configure(stall_after=2, repeat=True)
    body = {"model": "phi3-lora", "max_tokens": 20, "messages": [{"role": "user", "content": "x"}]}
    lines, _ = _stream(silent, "/v1/messages", body, {"anthropic-version": "2023-06-01"})
    events = [line.removeprefix("event: ") for _, line in lines if line.startswith("event: ")]
    assert events[0] == "message_start" and events[-1] == "error", events
    assert events.count("content_block_delta") == 2, events
    silence = events[events.index("content_block_delta") + 2 : -1]
    assert len(silence) >= 4 and set(silence) == {"ping"}, events  # 6 s deadline, 2 tokens, a ping a second
    error = json.loads(lines[[line for _, line in lines].index("event: error") + 1][1].removeprefix("data: "))
    assert error["type"] == "error" and error["error"]["type"] == "timeout_error", error


@pytest.fixture(scope="module")
def prefill() -> Iterator[Stack]:
    """Generations of at most 4 s (the processor's deadline at 2 s, Envoy's route timeout at 3 s), idle timeout
    longer: the processor's deadline is the first to come. A 2.x Shimmy, which the gateway asks to stream even a
    non-stream answer (1.x answers one in one piece: there Envoy's route timeout answers, a second later)."""
    stack = start_stack({"GENERATION_TIMEOUT_S": "4", "STREAM_IDLE_TIMEOUT_S": "10", "MAX_ACTIVE_REQUESTS": "4",
                         "EMULATOR_VERSION": "2.5.0"})
    try:
        yield stack
    finally:
        stop_stack(stack)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_a_shimmy_silent_before_its_first_token_is_a_json_504_at_the_deadline(prefill: Stack, stream: bool) -> None:
    """Envoy takes no body from the processor before Shimmy's first byte, so a stream's headers wait for it: a
    prefill that never ends is a 504 JSON error at the processor's deadline, never a 200 that ends in a reset."""
    prefill.configure(stall_after=0)
    request_id = f"prefill-{time.monotonic_ns()}"
    started = time.monotonic()
    answer = httpx.post(f"{prefill.url}/v1/chat/completions", json={**CHAT, "max_tokens": 20, "stream": stream},
                        headers={"x-request-id": request_id}, timeout=10)
    took = time.monotonic() - started
    assert answer.status_code == 504, answer.text
    error = assert_openai_error(answer.status_code, dict(answer.headers), answer.content)
    assert error["code"] == "timeout" and error["type"] == "server_error", error
    assert 1.5 < took < 3, took  # the processor's deadline (2 s), before Envoy's route timeout (3 s)
    entry = access_log(prefill, request_id)
    assert entry["model"] == "phi3-lora" and entry["outcome"] == "error", entry
