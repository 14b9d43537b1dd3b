"""Issue 4, item 6: the fuzzed chat bodies of tests/unit/test_fuzz_translation.py, and raw HTTP garbage on a socket,
through the live gateway (Envoy, the processor and the emulator).

- A chat body is answered 200, 400 or 404, never 5xx and never late; every non-2xx answer is an OpenAI error object
  with `content-type: application/json`; and Shimmy (the emulator's `generate_requests`) sees exactly the requests
  that were answered 200: nothing the gateway refused reaches it.
- Raw bytes on a socket get an HTTP reply or a closed connection within a deadline; every error reply is an OpenAI
  error object; and the gateway still serves a valid request afterwards.

The fuzzers' findings, fixed since, keep a regression test each at the end of this file.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.integration.conftest import Stack
from tests.unit.test_fuzz_translation import KNOWN_MODELS, check_error_body, request_bodies, split_events

LIVE = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
REQUEST_TIMEOUT = httpx.Timeout(20.0)  # the emulator answers in milliseconds: reaching this is a hang
SOCKET_DEADLINE_S = 10.0
CHAT = {"model": KNOWN_MODELS[0], "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def serve_models(stack: Stack, models: tuple[str, ...]) -> None:
    """Let the emulator serve these models, and wait until the processor's probe has seen the list."""
    stack.configure(models=list(models))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        probe = {**CHAT, "model": models[-1]}
        if httpx.post(f"{stack.url}/v1/chat/completions", json=probe, timeout=REQUEST_TIMEOUT).status_code == 200:
            return
        time.sleep(0.2)
    raise AssertionError(f"the processor never learned of {models}")


def generate_requests(stack: Stack) -> int:
    return stack.emulator_stats()["generate_requests"]


# What a generation may fail after Shimmy ran: the emulator's text is no tool call or JSON the request demanded.
OUTPUT_ERRORS = {"missing_tool_call", "invalid_tool_call", "invalid_json_output"}


def output_failed(resp: httpx.Response) -> bool:
    return resp.status_code == 502 and resp.json()["error"]["code"] in OUTPUT_ERRORS


def check_chat_answer(resp: httpx.Response) -> None:
    """A 200 is a whole completion or a whole stream; anything else is a 400/404 OpenAI error in JSON, or the 502
    that says the model's output failed what the request demanded (tools, a JSON schema)."""
    assert resp.status_code in (200, 400, 404) or output_failed(resp), (resp.status_code, resp.text[:500])
    content_type = resp.headers.get("content-type")
    if resp.status_code != 200:
        assert content_type == "application/json", (resp.status_code, content_type, resp.text[:200])
        error = check_error_body(resp.content, resp.status_code)
        if resp.status_code == 404:
            assert error["code"] == "model_not_found"
        return
    if content_type == "text/event-stream":
        events = split_events(resp.content)
        assert events.count(b"data: [DONE]") == 1 and events[-1] == b"data: [DONE]"
        errors = [e for e in events if e.startswith(b'data: {"error"')]
        assert not errors or json.loads(errors[0][6:])["error"]["code"] in OUTPUT_ERRORS, events[-2:]
    else:
        assert content_type == "application/json", content_type
        document = resp.json()
        assert document["object"] == "chat.completion"
        assert document["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")


@pytest.fixture
def both_models(stack: Stack) -> Stack:
    """The stack serving every model the fuzzers name (once per test; the autouse reset undoes it)."""
    serve_models(stack, KNOWN_MODELS)
    return stack


@LIVE
@given(body=request_bodies)
def test_fuzzed_chat_bodies(both_models: Stack, body: bytes) -> None:
    stack = both_models
    before = generate_requests(stack)
    resp = httpx.post(
        f"{stack.url}/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=REQUEST_TIMEOUT,
    )
    reached = generate_requests(stack) - before
    event(f"status {resp.status_code}")
    check_chat_answer(resp)
    generated = resp.status_code == 200 or output_failed(resp)
    assert reached == (1 if generated else 0), (resp.status_code, reached, body[:300])


# -- raw HTTP on a socket ------------------------------------------------------------------------------------------

METHODS = ["GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH"]
ODD_METHODS = ["TRACE", "CONNECT", "QUERY", "PRI", "get", "FOO", "M-SEARCH", ""]
PATHS = [
    "/", "/v1/chat/completions", "/v1/models", "/health", "/v1/health", "/v2/models", "/admin", "/stats",
    "/clusters", "/server_info", "/api/generate", "/api/models", "/_emulator/stats", "/v1/models?x=1&y",
]
ODD_PATHS = [
    "/v1/../admin", "/v1/%2e%2e/stats", "/v1%2fchat%2fcompletions", "/v1/chat%2Fcompletions", "//v1//models",
    "/v1/models/", "/v1/models#f", "*", "http://127.0.0.1/v1/models", "/%00", "/\u00ff", "health", "?", "",
    "/./v1/./health", "/V1/MODELS", "/v1/models;x",
]
ODD_VERSIONS = ["http/1.1", "HTTP/1.1 x", "HTTP/2", "HTTP/1.0", "HTTP/0.9", "HTTP/1.12", ""]
HEADER_NAMES = [
    "content-type", "accept", "authorization", "x-envoy-original-path", "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-internal", "x-forwarded-for", "x-request-id", "te", "connection", "upgrade", "cookie",
    "x-gateway-route", "x-gateway-prompt-tokens", "accept-encoding",
]
ODD_HEADER_NAMES = [":path", "", "bad header", "x\ty", "host", "x-\u00ff"]
HEADER_VALUES = [
    "", "127.0.0.1", "application/json", "text/plain", "Bearer x", "/admin", "1", "trailers", "close", "gzip",
    "keep-alive", "chat", "a" * 4000,
]
ODD_HEADER_VALUES = ["upgrade", "websocket", "h2c", "a\r\nx-injected: 1", "\tspaced", "\u00ff", "\x7f", "a\x00b"]
_token = st.text(st.characters(codec="ascii", categories=["L", "N"], include_characters="-_.~!#$%&'*+^`|"), max_size=12)
_printable = st.text(st.characters(codec="ascii", min_codepoint=0x20, max_codepoint=0x7E), max_size=40)


def _mostly(ordinary: st.SearchStrategy[Any], odd: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Ordinary parts about three times in four, so that requests get past the codec often enough to reach routes,
    the processor and Shimmy; odd ones the rest of the time."""
    return st.integers(0, 3).flatmap(lambda i: odd if i == 3 else ordinary)


@st.composite
def raw_requests(draw: st.DrawFn) -> tuple[str, bytes]:
    """(method, bytes) of one request: a request line and headers drawn from ordinary and odd parts, ended by a
    blank line, with a body only when a correct Content-Length announces it (so a complete request never waits
    for bytes that will not come)."""
    method = draw(_mostly(st.sampled_from(METHODS), st.sampled_from(ODD_METHODS) | _token))
    path = draw(_mostly(st.sampled_from(PATHS), st.sampled_from(ODD_PATHS) | _printable.map(lambda p: "/" + p)))
    version = draw(_mostly(st.just("HTTP/1.1"), st.sampled_from(ODD_VERSIONS)))
    eol = draw(_mostly(st.just("\r\n"), st.just("\n")))
    headers = [("host", draw(st.sampled_from(["127.0.0.1", "localhost:8000", "x"])))] if draw(st.integers(0, 5)) else []
    for _ in range(draw(st.integers(0, 4))):
        name = draw(_mostly(st.sampled_from(HEADER_NAMES), st.sampled_from(ODD_HEADER_NAMES) | _token))
        value = draw(_mostly(st.sampled_from(HEADER_VALUES), st.sampled_from(ODD_HEADER_VALUES) | _printable))
        headers.append((name, value))
    body = draw(_mostly(st.sampled_from([b"", b"{}", json.dumps(CHAT).encode()]), st.binary(max_size=64)))
    if body:
        headers.append(("content-length", str(len(body))))
    head = f"{method} {path} {version}".rstrip() + eol + "".join(f"{k}: {v}{eol}" for k, v in headers) + eol
    return method, head.encode("utf-8", "surrogateescape") + body


class Reader:
    """Reads one HTTP/1 reply off a socket, within one deadline for the whole reply."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf = sock, b""
        self.deadline = time.monotonic() + SOCKET_DEADLINE_S

    def more(self) -> bool:
        """Read what arrives next into `buf`; False once the gateway has closed the connection."""
        remaining = self.deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536)
        except TimeoutError:
            got = self.buf[:300]
            raise AssertionError(f"hang: no complete reply within {SOCKET_DEADLINE_S} s, got {got!r}") from None
        except ConnectionResetError:
            chunk = b""
        self.buf += chunk
        return bool(chunk)

    def head(self) -> tuple[int, dict[str, str]] | None:
        while b"\r\n\r\n" not in self.buf:
            if not self.more():
                assert not self.buf, f"connection closed mid-reply: {self.buf[:300]!r}"
                return None
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        version, status = status_line.split(" ")[:2]
        assert version == "HTTP/1.1", status_line
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(status), headers

    def body(self, size: int | None) -> bytes:
        """`size` bytes, or (None) everything up to the end of the connection."""
        while (size is None or len(self.buf) < size) and self.more():
            pass
        assert size is None or len(self.buf) >= size, f"connection closed mid-body: {self.buf[:300]!r}"
        return self.buf[:size]

    def chunked(self) -> bytes:
        out = b""
        while True:
            while b"\r\n" not in self.buf:
                assert self.more(), "connection closed mid-body"
            size_line, _, self.buf = self.buf.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            out += self.body(size + 2)[:size]
            self.buf = self.buf[size + 2 :]
            if size == 0:
                return out


def read_reply(sock: socket.socket, method: str) -> tuple[int, dict[str, str], bytes] | None:
    """The first final reply on the socket, or None when the gateway closed the connection without one."""
    reader = Reader(sock)
    while True:
        head = reader.head()
        if head is None:
            return None
        code, headers = head
        if code >= 200:
            break  # else 100 Continue: the final reply follows
    if method == "HEAD" or code in (204, 304):
        return code, headers, b""
    if "content-length" in headers:
        return code, headers, reader.body(int(headers["content-length"]))
    if headers.get("transfer-encoding") == "chunked":
        return code, headers, reader.chunked()
    return code, headers, reader.body(None)


def send_raw(stack: Stack, method: str, raw: bytes) -> tuple[int, dict[str, str], bytes] | None:
    with socket.create_connection(("127.0.0.1", stack.gateway_port), timeout=SOCKET_DEADLINE_S) as sock:
        try:
            sock.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            return None  # the gateway closed on us before we finished: a closed connection is an answer
        return read_reply(sock, method)


def check_raw_reply(reply: tuple[int, dict[str, str], bytes] | None, method: str) -> None:
    if reply is None:
        event("closed without a reply")
        return
    code, headers, body = reply
    event(f"status {code}")
    assert code < 500 or code == 501, (code, body[:300])  # 501: a Transfer-Encoding Envoy does not implement
    if code < 400:
        assert headers.get("content-type") in ("application/json", "text/event-stream"), (code, headers)
        return
    assert headers.get("content-type") == "application/json", (code, headers, body[:300])
    if method != "HEAD":
        check_error_body(body, code)


@LIVE
@given(request=raw_requests())
def test_raw_http_garbage(stack: Stack, request: tuple[str, bytes]) -> None:
    method, raw = request
    before = generate_requests(stack)
    reply = send_raw(stack, method, raw)
    check_raw_reply(reply, method)
    if reply is None or reply[0] != 200:
        assert generate_requests(stack) == before, raw[:300]


def test_gateway_serves_after_the_garbage(stack: Stack) -> None:
    """Runs after the fuzzers in file order; the stack is shared, so this is what they left behind."""
    for _ in range(3):
        send_raw(stack, "GET", b"\xff\xfe GARBAGE \x00\r\n\r\n")
    resp = httpx.post(f"{stack.url}/v1/chat/completions", json=CHAT, timeout=REQUEST_TIMEOUT)
    assert resp.status_code == 200 and resp.json()["object"] == "chat.completion"
    assert httpx.get(f"{stack.url}/health", timeout=REQUEST_TIMEOUT).status_code == 200


# -- regressions: the fuzzers' findings ----------------------------------------------------------------------------


def _deep(name: str, depth: int = 2000) -> bytes:
    return b'{"model":"phi3-lora","messages":[{"role":"user","content":"Hi"}],"%s":%s}' % (
        name.encode(),
        b"[" * depth + b"]" * depth,
    )


def test_deeply_nested_body_is_a_400_not_a_500(stack: Stack) -> None:
    """Found: msgspec's RecursionError escaped the processor, and Envoy answered 500 gateway_error."""
    resp = httpx.post(
        f"{stack.url}/v1/chat/completions",
        content=_deep("tools"),
        headers={"content-type": "application/json"},
        timeout=REQUEST_TIMEOUT,
    )
    assert resp.status_code == 400, (resp.status_code, resp.text[:300])


def test_top_k_beyond_i32_never_reaches_shimmy(stack: Stack) -> None:
    """Found: the gateway let it through, and Shimmy (an i32 top_k) answered 422."""
    before = generate_requests(stack)
    resp = httpx.post(f"{stack.url}/v1/chat/completions", json={**CHAT, "top_k": 2**31}, timeout=REQUEST_TIMEOUT)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "top_k", resp.text
    assert generate_requests(stack) == before


ENVOY_REPLY_CASES: dict[str, tuple[str, bytes]] = {
    "http/1.0": ("GET", b"GET /health HTTP/1.0\r\n\r\n"),
    "invalid authority": ("GET", b"GET /health HTTP/1.1\r\nHost: a b\r\n\r\n"),
    "obs-fold header": ("GET", b"GET /health HTTP/1.1\r\nHost: x\r\n folded: y\r\n\r\n"),
    "transfer-encoding gzip": ("GET", b"GET /health HTTP/1.1\r\nHost: x\r\ntransfer-encoding: gzip\r\n\r\n"),
    "headers too large": ("GET", b"GET /health HTTP/1.1\r\nHost: x\r\nx: " + b"a" * 70000 + b"\r\n\r\n"),
    "websocket upgrade": (
        "GET",
        b"GET /health HTTP/1.1\r\nHost: x\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
    ),
    "options *": ("OPTIONS", b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n"),
    "query without content-type": ("QUERY", b"QUERY /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"),
}


@pytest.mark.parametrize("case", sorted(ENVOY_REPLY_CASES))
def test_envoy_reply_is_an_openai_error(stack: Stack, case: str) -> None:
    """Found: these of Envoy's own replies were plain text ("Upgrade Required", "Bad Request", ...) or empty."""
    method, raw = ENVOY_REPLY_CASES[case]
    reply = send_raw(stack, method, raw)
    assert reply is not None
    code, headers, body = reply
    assert code >= 400
    assert headers.get("content-type") == "application/json", (code, headers, body)
    check_error_body(body, code)

