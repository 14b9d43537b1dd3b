"""Issue 4: faults the gateway survives, each with a defined client-visible outcome, then serves again.

These tests run Shimmy (the emulator) outside the supervisor (`SHIMMY_BACKEND=external`), so they can start it
late, kill it mid-request and bring it back, as a crashed or restarted sidecar would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import Stack, free_port, start_stack, stop_stack

CHAT = {"model": "phi3-lora", "messages": [{"role": "user", "content": "x"}]}
GENERATION_TIMEOUT_S = 3


class Emulator:
    """A Shimmy emulator process the test owns."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shimmy", "--shimmy-port", str(self.port), "--emulator-engine", "fixed"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{self.port}/health").status_code == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError("emulator did not start")

    def configure(self, **changes: object) -> None:
        httpx.put(f"http://127.0.0.1:{self.port}/_emulator/config", json=changes).raise_for_status()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def faulty() -> Iterator[tuple[Stack, Emulator]]:
    shimmy_port = free_port()
    emulator = Emulator(shimmy_port)
    stack = start_stack(
        {
            "SHIMMY_BACKEND": "external",
            "SHIMMY_PORT": str(shimmy_port),
            "GENERATION_TIMEOUT_S": str(GENERATION_TIMEOUT_S),
            "MAX_ACTIVE_REQUESTS": "1",
            "MAX_QUEUED_REQUESTS": "1",
        },
        wait=False,
    )
    try:
        yield stack, emulator
    finally:
        emulator.kill()
        stop_stack(stack)


@pytest.fixture(autouse=True)
def _reset(faulty: tuple[Stack, Emulator]) -> Iterator[None]:
    yield
    stack, emulator = faulty
    if emulator.proc is not None and emulator.proc.poll() is None:
        httpx.post(f"http://127.0.0.1:{emulator.port}/_emulator/reset").raise_for_status()
    # A generation a test left behind keeps Shimmy's only slot until Shimmy is through with it (docs/admission.md).
    with contextlib.suppress(httpx.TransportError):
        wait_for(lambda: "shimmy_slots_busy 0.0" in httpx.get(f"{stack.url}/metrics").text, timeout=60)


def wait_for(check, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if check():
                return
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def healthy(stack: Stack) -> bool:
    return httpx.get(f"{stack.url}/v1/health").status_code == 200


def chat_ok(stack: Stack) -> bool:
    return httpx.post(f"{stack.url}/v1/chat/completions", json={**CHAT, "max_tokens": 2}, timeout=10).status_code == 200


def assert_openai_error(resp: httpx.Response, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    assert resp.json()["error"]["code"] == code, resp.text


def test_shimmy_down_at_start_then_up(faulty: tuple[Stack, Emulator]) -> None:
    stack, emulator = faulty
    health = httpx.get(f"{stack.url}/v1/health")
    assert health.status_code == 503
    assert health.json()["status"] == "unhealthy" and health.json()["shimmy_status"] == "unhealthy"
    assert_openai_error(httpx.post(f"{stack.url}/v1/chat/completions", json=CHAT), 503, "backend_unavailable")
    emulator.start()
    wait_for(lambda: healthy(stack))
    wait_for(lambda: chat_ok(stack))


def test_shimmy_killed_mid_request(faulty: tuple[Stack, Emulator]) -> None:
    stack, emulator = faulty
    wait_for(lambda: chat_ok(stack))
    emulator.configure(token_delay_ms=100, repeat=True)
    threading.Timer(0.5, emulator.kill).start()
    resp = httpx.post(f"{stack.url}/v1/chat/completions", json={**CHAT, "max_tokens": 50}, timeout=10)
    assert_openai_error(resp, 502, "upstream_error")
    emulator.start()
    wait_for(lambda: chat_ok(stack))


def test_shimmy_killed_mid_stream(faulty: tuple[Stack, Emulator]) -> None:
    stack, emulator = faulty
    wait_for(lambda: chat_ok(stack))
    emulator.configure(token_delay_ms=100, repeat=True)
    started, lines = time.monotonic(), []
    with pytest.raises(httpx.RemoteProtocolError):  # raised while reading: Envoy resets the client's stream
        with httpx.stream("POST", f"{stack.url}/v1/chat/completions",
                          json={**CHAT, "stream": True, "max_tokens": 50}, timeout=10) as resp:
            for line in resp.iter_lines():
                lines.append(line)
                if len(lines) == 6:
                    emulator.kill()
    assert time.monotonic() - started < 5  # ended promptly, no hang
    assert all(line == "" or line.startswith("data: {") for line in lines)  # only whole events
    emulator.start()
    wait_for(lambda: chat_ok(stack))


def test_shimmy_that_never_answers_gets_504(faulty: tuple[Stack, Emulator]) -> None:
    stack, emulator = faulty
    if emulator.proc is None or emulator.proc.poll() is not None:
        emulator.start()
    wait_for(lambda: chat_ok(stack))
    emulator.configure(hang=True)
    # 8 tokens: the generation Envoy gave up on keeps the only slot for as long as Shimmy could go on with it
    # (docs/admission.md), which must end before the next request's queue wait does.
    for payload in ({**CHAT, "max_tokens": 8}, {**CHAT, "stream": True, "max_tokens": 8}):
        started = time.monotonic()
        resp = httpx.post(f"{stack.url}/v1/chat/completions", json=payload, timeout=20)
        assert_openai_error(resp, 504, "timeout")
        assert GENERATION_TIMEOUT_S <= time.monotonic() - started < GENERATION_TIMEOUT_S + 5
    emulator.configure(hang=False)
    wait_for(lambda: chat_ok(stack))


def test_stream_past_the_generation_deadline_ends_in_band(faulty: tuple[Stack, Emulator]) -> None:
    stack, emulator = faulty
    emulator.configure(hang=False, token_delay_ms=250, repeat=True)  # 20 tokens take 5 s, the deadline is 3 s
    with httpx.stream("POST", f"{stack.url}/v1/chat/completions",
                      json={**CHAT, "stream": True, "max_tokens": 20}, timeout=20) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert resp.status_code == 200
    assert lines[-1] == "data: [DONE]"
    assert '"code":"timeout"' in lines[-2]
    emulator.configure(token_delay_ms=0, repeat=False)


def test_full_queue_answers_429_with_retry_after(faulty: tuple[Stack, Emulator]) -> None:
    stack, emulator = faulty
    wait_for(lambda: chat_ok(stack))
    emulator.configure(token_delay_ms=100)
    results: list[httpx.Response] = []

    def call() -> None:
        results.append(httpx.post(f"{stack.url}/v1/chat/completions", json={**CHAT, "max_tokens": 8}, timeout=20))

    threads = [threading.Thread(target=call) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    emulator.configure(token_delay_ms=0)
    statuses = sorted(r.status_code for r in results)
    assert statuses.count(200) >= 2 and 429 in statuses, statuses  # 1 active + 1 queued get through
    for r in results:
        if r.status_code == 429:
            assert_openai_error(r, 429, "queue_full")
            assert r.json()["error"]["type"] == "rate_limit_error"
            assert int(r.headers["retry-after"]) > 0


def test_slow_client_gets_every_token(faulty: tuple[Stack, Emulator]) -> None:
    stack, emulator = faulty
    emulator.configure(reply=" ".join(["word"] * 60))
    received = 0
    with httpx.stream("POST", f"{stack.url}/v1/chat/completions", json={**CHAT, "stream": True}, timeout=30) as resp:
        for line in resp.iter_lines():
            time.sleep(0.01)  # a reader slower than the generation
            received += '"content":"' in line and '"content":""' not in line
    assert received == 60
    assert chat_ok(stack)


def test_client_that_gives_up_on_a_non_stream_request(faulty: tuple[Stack, Emulator]) -> None:
    stack, emulator = faulty
    emulator.configure(token_delay_ms=100, repeat=True)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{stack.url}/v1/chat/completions", json={**CHAT, "max_tokens": 30}, timeout=0.5)
    emulator.configure(token_delay_ms=0, repeat=False)
    prefix = "http.gateway.ext_proc.shimmy."
    wait_for(lambda: (s := stack.envoy_stats(prefix))[prefix + "streams_started"] == s[prefix + "streams_closed"])
    wait_for(lambda: chat_ok(stack))


def _extproc_pid(stack: Stack) -> int:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
            if int(fields[1]) == stack.proc.pid and b"extproc.cli" in cmdline:
                return int(stat.parent.name)
    raise AssertionError("no extproc child")


def test_processor_killed_mid_request_is_restarted(faulty: tuple[Stack, Emulator]) -> None:
    stack, emulator = faulty
    wait_for(lambda: chat_ok(stack))
    emulator.configure(token_delay_ms=100, repeat=True)
    pid = _extproc_pid(stack)
    threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
    resp = httpx.post(f"{stack.url}/v1/chat/completions", json={**CHAT, "max_tokens": 30}, timeout=10)
    assert_openai_error(resp, 500, "gateway_error")
    # While it is down (the restart waits 0.5 s first), /health says which part failed.
    down = httpx.get(f"{stack.url}/v1/health")
    assert down.status_code == 503
    assert down.json()["extproc_status"] == "unhealthy"
    emulator.configure(token_delay_ms=0, repeat=False)
    wait_for(lambda: healthy(stack))
    wait_for(lambda: chat_ok(stack))
    assert _extproc_pid(stack) != pid
    assert "[supervisor] restarting extproc" in stack.output()


def test_warmup_keeps_health_at_503_until_the_model_answered() -> None:
    shimmy_port = free_port()
    emulator = Emulator(shimmy_port)
    emulator.start()
    emulator.configure(load_delay_ms=2500)  # the first generation pays the model load
    stack = start_stack({"SHIMMY_BACKEND": "external", "SHIMMY_PORT": str(shimmy_port), "WARMUP": "true"}, wait=False)
    try:
        wait_for(lambda: "warming up" in httpx.get(f"{stack.url}/v1/health").json().get("reason", ""))
        assert httpx.get(f"{stack.url}/v1/health").status_code == 503
        wait_for(lambda: healthy(stack), timeout=20)
        stats = httpx.get(f"http://127.0.0.1:{shimmy_port}/_emulator/stats").json()
        assert stats["generate_requests"] >= 1 and stats["last_generate_body"]["max_tokens"] == 1
    finally:
        stop_stack(stack)
        emulator.kill()


def test_sigterm_lets_in_flight_requests_finish() -> None:
    stack = start_stack({"EMULATOR_TOKEN_DELAY_MS": "100"})
    try:
        results: list[httpx.Response] = []
        call = threading.Thread(target=lambda: results.append(
            httpx.post(f"{stack.url}/v1/chat/completions", json={**CHAT, "max_tokens": 15}, timeout=20)))
        call.start()
        time.sleep(0.5)
        stack.proc.send_signal(signal.SIGTERM)
        call.join()
        assert results[0].status_code == 200
        assert results[0].json()["usage"]["completion_tokens"] == 15  # all of it: the request was not cut
        assert stack.proc.wait(15) == 143
        assert "[supervisor] draining envoy" in stack.output()
    finally:
        stop_stack(stack)
