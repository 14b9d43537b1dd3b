"""Issue 4: security basics and Envoy's own replies, each an OpenAI error object."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import Stack, free_port, start_stack, stop_stack

CHAT = {"model": "phi3-lora", "messages": [{"role": "user", "content": "x"}]}


def raw_request(stack: Stack, data: bytes) -> bytes:
    """Send raw bytes to the gateway; return everything it answers before closing (or 3 s)."""
    with socket.create_connection(("127.0.0.1", stack.gateway_port), timeout=3) as conn:
        conn.sendall(data)
        chunks = []
        try:
            while chunk := conn.recv(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and b"connection: close" not in b"".join(chunks).lower():
                    break
        except TimeoutError:
            pass
    return b"".join(chunks)


def http_body(answer: bytes) -> bytes:
    """An HTTP/1.1 answer's body, de-chunked: the generation routes' answers are streamed (full duplex)."""
    head, _, body = answer.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" not in head.lower():
        return body
    out = b""
    while True:
        size, _, body = body.partition(b"\r\n")
        if not size or int(size, 16) == 0:
            return out
        out, body = out + body[: int(size, 16)], body[int(size, 16) + 2 :]


def json_error_status(answer: bytes) -> tuple[int, bytes]:
    head, _, _ = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    body = http_body(answer)
    assert b"content-type: application/json" in head.lower(), answer
    assert body.startswith(b'{"error":'), answer
    return status, body


@pytest.mark.parametrize("path", ["/stats", "/ready", "/config_dump", "/clusters", "/server_info", "/quitquitquit",
                                  "/v1/../stats", "/health/../stats", "/v1/models/../../config_dump"])
def test_no_admin_path_is_reachable_through_the_gateway(stack: Stack, path: str) -> None:
    for method in ("GET", "POST"):
        resp = httpx.request(method, f"{stack.url}{path}")
        assert resp.status_code in (404, 405), resp.text
        assert resp.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"http://127.0.0.1:{stack.admin_port}/ready").text.strip() == "LIVE"  # admin still alive


def _listen_addresses(port: int) -> set[str]:
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.rpartition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                found.add(address)
    return found


def test_admin_listens_on_loopback_only_and_the_gateway_on_every_interface(stack: Stack) -> None:
    assert _listen_addresses(stack.admin_port) == {"0100007F"}  # 127.0.0.1
    assert _listen_addresses(stack.gateway_port) == {"00000000"}  # 0.0.0.0


def test_no_x_envoy_header_reaches_shimmy_or_the_client(stack: Stack) -> None:
    stack.configure(token_delay_ms=50)
    resp = httpx.post(f"{stack.url}/v1/chat/completions", json={**CHAT, "max_tokens": 3}, headers={
        "x-envoy-upstream-rq-timeout-ms": "1",  # would cut the request at 1 ms if honoured
        "x-envoy-retry-on": "5xx",
        "x-envoy-max-retries": "9",
        "X-Envoy-Force-Trace": "1",
    })
    assert resp.status_code == 200
    sent = {name.lower() for name in stack.emulator_stats()["last_generate_headers"]}
    # Neither the client's nor Envoy's own (expected-rq-timeout-ms, original-path) reach Shimmy.
    assert not {name for name in sent if name.startswith("x-envoy-")}, sent
    for answer in (resp, httpx.get(f"{stack.url}/v1/models"), httpx.get(f"{stack.url}/v1/health")):
        assert not [name for name in answer.headers if name.lower().startswith("x-envoy-")], answer.headers


def test_bare_cr_in_a_header_never_reaches_shimmy(stack: Stack) -> None:
    body = b'{"model":"phi3-lora","messages":[{"role":"user","content":"x"}]}'
    answer = raw_request(stack, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Inject: a\rSet-Cookie: b\r\n"
                                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    status = int(answer.split(b" ", 2)[1])
    if status == 200:  # Envoy's parser may drop the CR; then Shimmy must not see it, nor a split header
        sent = stack.emulator_stats()["last_generate_headers"]
        assert all("\r" not in v and "\n" not in v for v in sent.values()), sent
        assert "Set-Cookie" not in sent
    else:
        assert json_error_status(answer)[0] == 400


def test_malformed_http_is_a_json_400(stack: Stack) -> None:
    status, body = json_error_status(raw_request(stack, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n"))
    assert status == 400 and b'"bad_request"' in body


@pytest.mark.parametrize("path", ["/v1%2Fmodels", "/v1/chat%2Fcompletions", "/v1%5Cmodels", "/v1/models%2f"])
def test_encoded_slashes_are_rejected(stack: Stack, path: str) -> None:
    status, body = json_error_status(raw_request(stack, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()))
    assert status == 400 and b'"bad_request"' in body
    assert b"path_normalization_failed" not in body  # Envoy's detail string belongs in the access log only


def test_body_over_the_limit_is_413_without_sending_it_all(stack: Stack) -> None:
    declared = 10 * 1024 * 1024  # 10 MiB declared, the limit is 1 MiB; we send only 2 MiB of it
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % declared)
    with socket.create_connection(("127.0.0.1", stack.gateway_port), timeout=5) as conn:
        conn.sendall(head)
        try:
            conn.sendall(b"x" * (2 * 1024 * 1024))
        except OSError:
            pass  # Envoy may close before taking it all
        answer = conn.recv(65536)
    status, body = json_error_status(answer)
    assert status == 413 and b'"request_too_large"' in body


METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def keyed() -> Iterator[Stack]:
    stack = start_stack({"GATEWAY_API_KEYS": "k-one, k-two", "METRICS_PORT": str(METRICS_PORT)})
    try:
        yield stack
    finally:
        stop_stack(stack)


@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Basic azE6azI=", "k-one", "bearer k-one", "Bearer  k-one",
                                  "Bearer", "Token k-one"])
def test_api_keys_refuse_requests_without_a_valid_key(keyed: Stack, auth: str | None) -> None:
    headers = {"authorization": auth} if auth else {}
    for method, path, payload in (("POST", "/v1/chat/completions", CHAT), ("GET", "/v1/models", None)):
        resp = httpx.request(method, f"{keyed.url}{path}", json=payload, headers=headers)
        assert resp.status_code == 401
        assert resp.headers["content-type"] == "application/json"
        assert resp.headers["www-authenticate"] == "Bearer"
        assert resp.json()["error"] == {"message": resp.json()["error"]["message"], "type": "authentication_error",
                                        "param": None, "code": "invalid_api_key"}


def test_api_keys_admit_a_valid_key_and_keep_health_open(keyed: Stack) -> None:
    ok = httpx.post(f"{keyed.url}/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer k-two"})
    assert ok.status_code == 200
    assert "authorization" not in {k.lower() for k in keyed.emulator_stats()["last_generate_headers"]}
    assert httpx.get(f"{keyed.url}/v1/health").status_code == 200  # probes carry no key


def test_gateway_keeps_serving_after_abuse(stack: Stack) -> None:
    started = time.monotonic()
    assert httpx.post(f"{stack.url}/v1/chat/completions", json=CHAT).status_code == 200
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("path", ["/metrics", "/v1/metrics"])
def test_metrics_need_the_key_and_envoys_401_passes_through_untouched(keyed: Stack, path: str) -> None:
    refused = httpx.get(f"{keyed.url}{path}")
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert refused.json()["error"]["code"] == "invalid_api_key"  # whole, valid JSON: nothing appended
    assert "gen_ai" not in refused.text
    served = httpx.get(f"{keyed.url}{path}", headers={"authorization": "Bearer k-one"})
    assert served.status_code == 200 and "shimmy_live_streams" in served.text


def test_the_loopback_metrics_port_serves_scrapers_without_a_key_and_nothing_else(keyed: Stack) -> None:
    assert _listen_addresses(METRICS_PORT) == {"0100007F"}  # 127.0.0.1 only
    local = f"http://127.0.0.1:{METRICS_PORT}"
    resp = httpx.get(f"{local}/metrics")
    assert resp.status_code == 200 and "shimmy_live_streams" in resp.text and "envoy_cluster_" in resp.text
    for path in ("/v1/models", "/v1/health", "/stats", "/config_dump"):
        assert httpx.get(f"{local}{path}").status_code == 404, path
    assert httpx.post(f"{local}/v1/chat/completions", json=CHAT).status_code == 404


def test_error_bodies_carry_no_envoy_internals(stack: Stack) -> None:
    answers = [raw_request(stack, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n"),
               raw_request(stack, b"GET /v1%2Fmodels HTTP/1.1\r\nHost: x\r\n\r\n"),
               raw_request(stack, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n")]
    for answer in answers:
        _, body = json_error_status(answer)
        message = json.loads(body)["error"]["message"]
        assert not re.search(r"\w[._]\w", message), message  # no http1.codec_error, path_normalization_failed
