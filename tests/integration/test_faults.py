"""Issue 4: faults the gateway survives, each with a defined client-visible outcome, then serves again.

These tests run Shimmy (the emulator) outside the supervisor (`SHIMMY_BACKEND=external`), so they can start it
late, kill it mid-request and bring it back, as a crashed or restarted sidecar would.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import Stack, die_with_parent, free_port, start_stack, stop_stack

CHAT = {"model": "phi3-lora", "messages": [{"role": "user", "content": "x"}]}
GENERATION_TIMEOUT_S = 4  # the outer limit: the processor's deadline is 2 s, Envoy's backstop 3 s


class Emulator:
    """A Shimmy emulator process the test owns."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shimmy", "--shimmy-port", str(self.port), "--emulator-engine", "fixed"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent,
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
def _reset(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "faulty" not in request.fixturenames:
        return
    stack, emulator = request.getfixturevalue("faulty")
    if emulator.proc is not None and emulator.proc.poll() is None:
        httpx.post(f"http://127.0.0.1:{emulator.port}/_emulator/reset").raise_for_status()
    # A generation a test left behind keeps Shimmy's only slot until Shimmy is through with it (docs/admission.md).
    with contextlib.suppress(httpx.TransportError):
        wait_for(lambda: slots_free(stack), timeout=60)


def slots_free(stack: Stack) -> bool:
    """Every generation slot is back: Shimmy is through with what earlier requests left it (docs/admission.md)."""
    return "shimmy_slots_busy 0.0" in httpx.get(f"{stack.url}/metrics").text


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
    # The pinned 1.x is asked for a non-stream answer in one piece: Shimmy dies before its headers, so Envoy
    # answers (response flag UC). A streaming upstream (2.x) would have begun: the processor's 502 upstream_error.
    assert_openai_error(resp, 503, "backend_unavailable")
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
        wait_for(lambda: slots_free(stack), timeout=30)  # the hung generation before keeps the only slot a while
        started = time.monotonic()
        resp = httpx.post(f"{stack.url}/v1/chat/completions", json=payload, timeout=20)
        assert_openai_error(resp, 504, "timeout")
        # Envoy's backstop answers before the outer proxy (KServe, at GENERATION_TIMEOUT_S) would cut.
        assert GENERATION_TIMEOUT_S - 1 <= time.monotonic() - started < GENERATION_TIMEOUT_S
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


def test_deadlines_nest_inside_the_outer_limit(faulty: tuple[Stack, Emulator]) -> None:
    """Issue 13.4: a generation that outlives the deadline gets an OpenAI error before GENERATION_TIMEOUT_S, the
    outer proxy's limit (KServe `timeout`), both streamed (in-band) and not (Envoy's backstop or the processor)."""
    stack, emulator = faulty
    if emulator.proc is None or emulator.proc.poll() is not None:
        emulator.start()
    wait_for(lambda: chat_ok(stack))
    emulator.configure(token_delay_ms=250, repeat=True)  # 16 tokens take 4 s: past the deadline, then done
    started = time.monotonic()
    with httpx.stream("POST", f"{stack.url}/v1/chat/completions",
                      json={**CHAT, "stream": True, "max_tokens": 16}, timeout=20) as resp:
        lines = [line for line in resp.iter_lines() if line]
    took = time.monotonic() - started
    assert resp.status_code == 200 and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "timeout"
    assert GENERATION_TIMEOUT_S - 2 <= took < GENERATION_TIMEOUT_S, f"in-band error after {took:.1f} s"
    wait_for(lambda: slots_free(stack), timeout=30)  # Shimmy goes on with the abandoned stream for a while
    started = time.monotonic()
    resp = httpx.post(f"{stack.url}/v1/chat/completions", json={**CHAT, "max_tokens": 16}, timeout=20)
    took = time.monotonic() - started
    assert_openai_error(resp, 504, "timeout")
    assert took < GENERATION_TIMEOUT_S, f"504 after {took:.1f} s"
    emulator.configure(token_delay_ms=0, repeat=False)


def test_deadline_counts_from_the_requests_arrival(faulty: tuple[Stack, Emulator]) -> None:
    """A body that takes 2.5 s to arrive leaves 1.5 s of the outer limit: the stream must end with the timeout
    before it (a 504 JSON error when the deadline passes before Shimmy's first byte, else in-band)."""
    stack, emulator = faulty
    if emulator.proc is None or emulator.proc.poll() is not None:
        emulator.start()
    wait_for(lambda: chat_ok(stack))
    emulator.configure(token_delay_ms=250, repeat=True)
    body = json.dumps({**CHAT, "stream": True, "max_tokens": 100}).encode()
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", stack.gateway_port)) as client:
        head = "POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n"
        client.sendall(f"{head}content-length: {len(body)}\r\n\r\n".encode() + body[:-1])
        time.sleep(2.5)  # the client's slow upload, not synchronisation: Envoy waits for the last byte
        client.sendall(body[-1:])
        client.settimeout(10)
        received = b""
        while b'"code":"timeout"' not in received and (chunk := client.recv(1 << 16)):
            received += chunk
    took = time.monotonic() - started
    emulator.configure(token_delay_ms=0, repeat=False)
    assert b'"code":"timeout"' in received
    assert took < GENERATION_TIMEOUT_S, f"timeout error {took:.1f} s after the request arrived"


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


def child_pid(stack: Stack, marker: bytes) -> int:
    """The pid of the supervisor's child whose command line holds `marker`."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
            if int(fields[1]) == stack.proc.pid and marker in cmdline:
                return int(stat.parent.name)
    raise AssertionError(f"no child with {marker!r}")


def _extproc_pid(stack: Stack) -> int:
    return child_pid(stack, b"extproc.cli")


EMULATOR = b"-m\x00shimmy\x00"  # the supervisor's Shimmy child: `python -m shimmy`


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


# ---- Issue 13: a hung or dead Shimmy under the supervisor, liveness apart from readiness ------------------------

HEALTH_INTERVAL_S = 0.5  # Envoy's active check: every 0.5 s, 1 s timeout, unhealthy after 2 failures
CLIENT_STALL_TIMEOUT_S = 3


@pytest.fixture(scope="module")
def supervised() -> Iterator[Stack]:
    """A stack whose emulator is the supervisor's child, as in the image: the tests stop and kill that process."""
    stack = start_stack({
        "HEALTH_INTERVAL_S": str(HEALTH_INTERVAL_S),
        "MAX_ACTIVE_REQUESTS": "2",
        "CLIENT_STALL_TIMEOUT_S": str(CLIENT_STALL_TIMEOUT_S),
    })
    try:
        yield stack
    finally:
        stop_stack(stack)


def answer(stack: Stack, timeout: float) -> tuple[httpx.Response, float]:
    """A short chat request and how long its answer took."""
    started = time.monotonic()
    resp = httpx.post(f"{stack.url}/v1/chat/completions", json={**CHAT, "max_tokens": 2}, timeout=timeout)
    return resp, time.monotonic() - started


def test_hung_shimmy_gets_quick_503_then_recovers(supervised: Stack) -> None:
    """A stopped process stands for a hung Shimmy, or a 1.x Shimmy whose workers are all busy (/health stalls too):
    new requests get a quick 503, the generation already running is not cut, and liveness holds."""
    stack = supervised
    wait_for(lambda: chat_ok(stack))
    stack.configure(token_delay_ms=100, repeat=True)
    lines: list[str] = []
    with httpx.stream("POST", f"{stack.url}/v1/chat/completions",
                      json={**CHAT, "stream": True, "max_tokens": 10}, timeout=30) as running:
        reader = threading.Thread(target=lambda: lines.extend(running.iter_lines()))
        reader.start()
        wait_for(lambda: len([line for line in lines if line]) >= 2)
        pid = child_pid(stack, EMULATOR)
        os.kill(pid, signal.SIGSTOP)  # hung: the port still accepts connections, nothing answers
        try:
            _while_hung(stack)
        finally:
            os.kill(pid, signal.SIGCONT)
        recovered = time.monotonic()
        reader.join()
    stack.configure(token_delay_ms=0, repeat=False)
    assert [line for line in lines if line][-1] == "data: [DONE]", "the running generation was not cut"
    assert '"finish_reason":"length"' in "".join(lines)
    wait_for(lambda: chat_ok(stack))
    assert time.monotonic() - recovered < 2 * (HEALTH_INTERVAL_S + 1.0) + 3
    assert healthy(stack)


def _while_hung(stack: Stack) -> None:
    stopped = time.monotonic()
    # Two failed checks (each up to interval + 1 s timeout) take the host out; allow a little more.
    wait_for(lambda: answer(stack, timeout=1.0)[0].status_code == 503, timeout=8)
    assert time.monotonic() - stopped < 2 * (HEALTH_INTERVAL_S + 1.0) + 3
    resp, took = answer(stack, timeout=5.0)
    assert_openai_error(resp, 503, "backend_unavailable")
    assert int(resp.headers["retry-after"]) > 0
    assert took < 1.0, "answered at once, not after waiting on the hung process"
    stream = httpx.post(f"{stack.url}/v1/chat/completions", json={**CHAT, "stream": True}, timeout=5)
    assert_openai_error(stream, 503, "backend_unavailable")
    # The processor's own monitor agrees: readiness says Shimmy cannot serve.
    wait_for(lambda: httpx.get(f"{stack.url}/v1/health", timeout=5).status_code == 503)
    ready = httpx.get(f"{stack.url}/v1/health/ready", timeout=5)
    assert ready.status_code == 503 and ready.json()["shimmy_status"] == "unhealthy"
    # Liveness: the process exists and its port accepts connections, so the pod is not restarted for it.
    live = httpx.get(f"{stack.url}/v1/health/live", timeout=5)
    assert live.status_code == 200, live.text
    assert live.json()["shimmy_process"] == "up"


def test_dead_shimmy_is_restarted_and_clients_get_503_meanwhile(supervised: Stack) -> None:
    stack = supervised
    wait_for(lambda: chat_ok(stack))
    pid = child_pid(stack, EMULATOR)
    os.kill(pid, signal.SIGKILL)
    statuses: list[int] = []
    while True:  # every answer is quick: a 503 while Shimmy is down, 200 once it is back
        resp, took = answer(stack, timeout=5.0)
        assert took < 2.0, f"waited {took:.1f} s for {resp.status_code}"
        statuses.append(resp.status_code)
        if resp.status_code == 200:
            break
        assert_openai_error(resp, 503, "backend_unavailable")
        assert int(resp.headers["retry-after"]) > 0
        live = httpx.get(f"{stack.url}/v1/health/live", timeout=5)
        if live.status_code == 503:  # the port was seen closed: the process is gone, for now
            assert live.json()["shimmy_process"] == "down"
    assert 503 in statuses
    assert "[supervisor] restarting shimmy" in stack.output()
    assert child_pid(stack, EMULATOR) != pid
    wait_for(lambda: healthy(stack))


def test_liveness_and_readiness_paths(supervised: Stack) -> None:
    stack = supervised
    wait_for(lambda: healthy(stack))
    for path in ("/v1/health", "/health", "/v1/health/ready"):
        resp = httpx.get(stack.url + path)
        assert resp.status_code == 200 and resp.json()["status"] == "healthy", (path, resp.text)
    live = httpx.get(f"{stack.url}/v1/health/live")
    assert live.status_code == 200
    assert live.json() == {"status": "alive", "shimmy_process": "up", "extproc_status": "healthy"}
    assert httpx.post(f"{stack.url}/v1/health/live").status_code == 405


def stalled_client(stack: Stack) -> socket.socket:
    """A stream of a long, fast answer whose client never reads: a small receive buffer, soon a zero TCP window."""
    body = json.dumps({**CHAT, "stream": True, "max_tokens": 131072}).encode()
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", stack.gateway_port))
    head = "POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n"
    client.sendall(f"{head}content-length: {len(body)}\r\n\r\n".encode() + body)
    return client


def test_stalled_clients_leave_other_users_served(supervised: Stack) -> None:
    """Issue 13.5: two clients that read nothing hold both of Shimmy's slots (flow control pauses Shimmy's
    connections behind them) until CLIENT_STALL_TIMEOUT_S cuts them; then the next user is served."""
    stack = supervised
    wait_for(lambda: chat_ok(stack))
    # 8 KiB tokens: the context caps max_tokens near 4,000 (1.x), still 32 MB, more than every buffer between Shimmy
    # and a client that reads nothing can hold. (1 KiB was not: on a busy machine, loopback's send buffer, which
    # grows to 4 MB, and Envoy's took all 4 MB of an answer, and both streams ended before the test looked.)
    stack.configure(repeat=True, token_delay_ms=0, reply="x" * 8192)
    stalled = [stalled_client(stack) for _ in range(2)]
    stalled_at = time.monotonic()
    try:
        active = "cluster.shimmy.upstream_rq_active"  # both streams hold a slot, none is queued
        wait_for(lambda: stack.envoy_stats(active)[active] == 2)
        resp, took = answer(stack, timeout=CLIENT_STALL_TIMEOUT_S + 15)
        assert resp.status_code == 200, resp.text
        assert took < CLIENT_STALL_TIMEOUT_S + 8, f"served after {took:.1f} s"
        # The clients read nothing for longer than CLIENT_STALL_TIMEOUT_S (the behaviour under test, not a wait for
        # the gateway): only then do they read, and find their connections cut.
        time.sleep(max(0.0, CLIENT_STALL_TIMEOUT_S + 2 - (time.monotonic() - stalled_at)))
        for client in stalled:  # cut, not finished: reading what was buffered ends in a reset (or an early EOF)
            client.settimeout(CLIENT_STALL_TIMEOUT_S + 5)
            received = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := client.recv(1 << 16):
                    received += chunk
            assert b"data: [DONE]" not in received
    finally:
        for client in stalled:
            client.close()
        stack.configure(repeat=False)
    wait_for(lambda: ext_proc_streams_settled(stack))
    cx = "cluster.shimmy.upstream_rq_active"
    wait_for(lambda: stack.envoy_stats(cx)[cx] == 0)


def ext_proc_streams_settled(stack: Stack) -> bool:
    """Every ext_proc stream Envoy started has ended, normally or with an error: none leaked."""
    prefix = "http.gateway.ext_proc.shimmy."
    stats = stack.envoy_stats(prefix)
    return stats[prefix + "streams_started"] == stats[prefix + "streams_closed"] + stats[prefix + "streams_failed"]


def _worker_pids(stack: Stack) -> dict[int, int]:
    """{EXTPROC_PORT of the worker: pid} of the supervisor's processor children."""
    pids = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != stack.proc.pid:
                continue
            if b"extproc.cli" not in (stat.parent / "cmdline").read_bytes():
                continue
            env = dict(v.split(b"=", 1) for v in (stat.parent / "environ").read_bytes().split(b"\0") if b"=" in v)
            pids[int(env[b"EXTPROC_PORT"])] = int(stat.parent.name)
    return pids


def test_a_killed_processor_worker_gets_no_new_streams() -> None:
    """EXTPROC_WORKERS=2 and one worker killed: until the supervisor has it back, every new request is served by the
    other (Envoy retries a stream whose connection is refused on another host, its gRPC health check and outlier
    detection take the dead one out), where Envoy's round robin used to send every other request to the dead port:
    500 gateway_error."""
    stack = start_stack({"EXTPROC_WORKERS": "2"})
    try:
        wait_for(lambda: chat_ok(stack))
        pids = _worker_pids(stack)
        assert sorted(pids) == [stack.extproc_port, stack.extproc_port + 1], pids
        os.kill(pids[stack.extproc_port + 1], signal.SIGKILL)
        started = time.monotonic()
        statuses = []
        while time.monotonic() - started < 1.5:  # the restart waits 0.5 s, then a processor takes ~1 s to start
            resp = httpx.post(f"{stack.url}/v1/chat/completions", json=CHAT, timeout=10)
            statuses.append(resp.status_code)
        assert len(statuses) >= 10 and set(statuses) == {200}, statuses
        prefix = "cluster.extproc."
        stats = stack.envoy_stats(prefix)
        assert stats[prefix + "upstream_cx_connect_fail"] >= 1, stats  # it was tried, and the stream went elsewhere
        wait_for(lambda: _worker_pids(stack).get(stack.extproc_port + 1, 0) not in (0, pids[stack.extproc_port + 1]))
        wait_for(lambda: chat_ok(stack))
    finally:
        stop_stack(stack)
