"""Admission through the running stack: the cap counts Shimmy's real work, not HTTP exchanges (issue 13, items 1, 6).

The emulator paces its tokens (`token_delay_ms`) and, with `repeat`, generates exactly `max_tokens`, like a model
that never meets its end of turn; `/_emulator/stats` says how many generations run inside it. A sampler thread reads
that gauge throughout each test, so "never more than the cap" is checked at every moment, not only at the end.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from settings import ENVOY_MARGIN_S, PROCESSOR_MARGIN_S
from tests.integration.conftest import Stack, sse_events, start_stack, stop_stack

TOKEN_DELAY_S = 0.2
CAP = 2
DEADLINE_S = 5  # GENERATION_TIMEOUT_S: the processor's deadline is PROCESSOR_MARGIN_S earlier, Envoy's 1 s earlier
PROFILES = [os.environ.get("ADMISSION_EMULATOR_VERSION", "")] if os.environ.get("ADMISSION_EMULATOR_VERSION") else [
    "1.7.2",
    "2.5.0",
]


@pytest.fixture(scope="module", params=PROFILES)
def busy_stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """A stack with room for two generations, a 1 s queue wait (message_timeout 2 s), paced tokens and a deadline
    (the processor's 3 s) shorter than a 30-token generation (6 s)."""
    stack = start_stack(
        {
            "MAX_ACTIVE_REQUESTS": str(CAP),
            "GENERATION_TIMEOUT_S": str(DEADLINE_S),
            "EXTPROC_MESSAGE_TIMEOUT_MS": "2000",
            "QUEUE_TIMEOUT_S": "1",
            "EMULATOR_TOKEN_DELAY_MS": str(TOKEN_DELAY_S * 1000),
            "EMULATOR_VERSION": request.param,
        }
    )
    stack.version = request.param  # type: ignore[attr-defined]
    yield stack
    stop_stack(stack)
    stack.log.unlink(missing_ok=True)


@pytest.fixture(autouse=True)
def _fresh(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test on `busy_stack` starts with an idle Shimmy, every slot back, and a repeating reply (so a
    generation runs to `max_tokens`)."""
    if "busy_stack" not in request.fixturenames:
        yield
        return
    busy_stack: Stack = request.getfixturevalue("busy_stack")
    _wait_idle(busy_stack)
    deadline = time.monotonic() + 30
    while "shimmy_slots_busy 0.0" not in (text := httpx.get(f"{busy_stack.url}/metrics").text):
        if "shimmy_slots_busy" not in text:  # a processor without admission (the code before it) has none
            break
        assert time.monotonic() < deadline, "a slot never came back"
        time.sleep(0.1)
    busy_stack.configure(repeat=True)
    yield
    httpx.post(f"{busy_stack.emulator}/reset").raise_for_status()


class Sampler:
    """Reads the emulator's active_generations every 20 ms in a thread; `peak` is the most seen."""

    def __init__(self, stack: Stack) -> None:
        self.stack, self.peak, self._stop = stack, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client() as client:
            while not self._stop.is_set():
                self.peak = max(self.peak, _inside(client.get(f"{self.stack.emulator}/stats").json()))
                self._stop.wait(0.02)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _inside(stats: dict) -> int:
    """Generations inside Shimmy: running, and (2.x) waiting for its one model; the peak of the running ones."""
    return max(stats["active_generations"] + stats.get("queued_generations", 0), stats.get("peak_generations", 0))


def _wait_idle(stack: Stack, timeout: float = 60.0) -> float:
    """Wait until Shimmy runs no generation; the seconds it took."""
    started = time.monotonic()
    stats = stack.emulator_stats()
    while stats["active_generations"] + stats.get("queued_generations", 0):
        assert time.monotonic() - started < timeout, "Shimmy never went idle"
        time.sleep(0.05)
        stats = stack.emulator_stats()
    return time.monotonic() - started


def _chat(stream: bool, max_tokens: int, **extra: object) -> dict:
    return {
        "model": "phi3-lora",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": max_tokens,
        "stream": stream,
        **extra,
    }


def _hang_up_after(stack: Stack, seconds: float, statuses: list[int]) -> None:
    """A streaming client that reads for `seconds` from sending its request, then closes its connection; its status
    (0: none came, as for a request that waits behind another inside a 2.x Shimmy)."""
    body = json.dumps(_chat(True, 30)).encode()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    data = b""
    with socket.create_connection(("127.0.0.1", stack.gateway_port)) as conn:
        conn.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0:
            conn.settimeout(left)
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            data += chunk
    statuses.append(int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0)


def _counter(stack: Stack, name: str) -> float:
    text = httpx.get(f"{stack.url}/metrics").text
    return next((float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")), 0.0)


def test_clients_that_hang_up_leave_no_more_generations_than_the_cap(busy_stack: Stack) -> None:
    statuses: list[int] = []
    gone = 'shimmy_abandoned_generations_total{reason="client_gone"}'
    gone_before = _counter(busy_stack, gone)
    with Sampler(busy_stack) as sampler:
        clients = [threading.Thread(target=_hang_up_after, args=(busy_stack, 2.0, statuses)) for _ in range(6)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        # All six have gone; Shimmy still has the two it admitted (30 tokens at 0.2 s = 6 s each; 2.x runs one
        # while the other waits); the four queued got 429 when their 1 s wait ran out.
        assert statuses.count(429) == 4 and set(statuses) <= {0, 200, 429}, statuses
        refused = httpx.post(f"{busy_stack.url}/v1/chat/completions", json=_chat(False, 2), timeout=30)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["type"] == "rate_limit_error"
        retry_after = int(refused.headers["retry-after"])
        assert retry_after >= 1
        assert busy_stack.emulator_stats()["active_generations"] > 0  # refused while Shimmy works, not after

        metrics = httpx.get(f"{busy_stack.url}/metrics").text
        assert _counter(busy_stack, gone) - gone_before == 2
        assert "shimmy_slots_busy 2.0" in metrics
        assert "shimmy_abandoned_generations_running 2.0" in metrics
        backlog = _metric(metrics, "shimmy_backlog_seconds")
        assert 0 < backlog < 60

        # Once Shimmy is through, the slots come back (within the estimate's margin) and requests succeed.
        _wait_idle(busy_stack)
        deadline = time.monotonic() + 15
        while True:
            ok = httpx.post(f"{busy_stack.url}/v1/chat/completions", json=_chat(False, 2), timeout=30)
            if ok.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(float(ok.headers.get("retry-after", "1")))
        assert ok.status_code == 200, ok.text
        assert ok.json()["choices"][0]["message"]["content"]
    assert sampler.peak <= CAP
    metrics = httpx.get(f"{busy_stack.url}/metrics").text
    assert "gen_ai_server_time_per_output_token_seconds_count" in metrics
    assert 0.15 < _metric(metrics, "gen_ai_server_time_per_output_token_seconds_sum") / max(
        _metric(metrics, "gen_ai_server_time_per_output_token_seconds_count"), 1
    ) < 0.5


def _metric(text: str, name: str) -> float:
    """The value of the first sample of `name` (summed over labels for histograms' _sum/_count)."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found, f"{name} not in /metrics"
    return total


def test_a_stop_sequence_ends_a_stream_but_not_its_slot(busy_stack: Stack) -> None:
    """The gateway ends the answer at the stop sequence; Shimmy goes on, so its slot stays taken until it is done."""
    busy_stack.configure(reply="one two three four five six seven eight", repeat=True)
    stopped = 'shimmy_abandoned_generations_total{reason="stop_sequence"}'
    stopped_before = _counter(busy_stack, stopped)
    started = time.monotonic()
    with httpx.stream(
        "POST", f"{busy_stack.url}/v1/chat/completions", json=_chat(True, 30, stop=[" three"]), timeout=30
    ) as r:
        events = sse_events(list(r.iter_lines()))
    answered = time.monotonic() - started
    assert events[-2]["choices"][0]["finish_reason"] == "stop"  # type: ignore[index]
    assert answered < 10 * TOKEN_DELAY_S  # three tokens, not Shimmy's thirty
    assert busy_stack.emulator_stats()["active_generations"] == 1
    assert _counter(busy_stack, stopped) - stopped_before == 1
    assert "shimmy_slots_busy 1.0" in httpx.get(f"{busy_stack.url}/metrics").text
    _wait_idle(busy_stack)
    deadline = time.monotonic() + 10
    while "shimmy_slots_busy 0.0" not in httpx.get(f"{busy_stack.url}/metrics").text:
        assert time.monotonic() < deadline, "the slot never came back"
        time.sleep(0.1)
    held = time.monotonic() - started
    assert 30 * TOKEN_DELAY_S <= held  # held for as long as Shimmy generated


def _post(stack: Stack, body: dict) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    r = httpx.post(f"{stack.url}/v1/chat/completions", json=body, timeout=30)
    return r, time.monotonic() - started


def test_a_stop_sequence_ends_a_non_stream_answer_without_shimmys_rest(busy_stack: Stack) -> None:
    if busy_stack.version.startswith("1."):  # type: ignore[attr-defined]
        pytest.skip("1.x answers a non-stream request in one piece (so its failures show): nothing to end early")
    busy_stack.configure(reply="one two three four five six seven eight", repeat=True)
    r, took = _post(busy_stack, _chat(False, 30, stop=[" three"]))
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == ("one two", "stop")
    assert took < 10 * TOKEN_DELAY_S  # three tokens' time, not the thirty Shimmy goes on with
    assert busy_stack.emulator_stats()["active_generations"] == 1  # Shimmy still generating: the slot stays
    assert "shimmy_slots_busy 1.0" in httpx.get(f"{busy_stack.url}/metrics").text


def test_the_deadline_ends_a_non_stream_answer_with_the_processors_504(busy_stack: Stack) -> None:
    late = 'shimmy_abandoned_generations_total{reason="deadline"}'
    late_before = _counter(busy_stack, late)
    r, took = _post(busy_stack, _chat(False, 30))
    assert r.status_code == 504, r.text
    # 1.x answers a non-stream request in one piece: no token reaches the processor, Envoy's backstop answers.
    one_piece = busy_stack.version.startswith("1.")  # type: ignore[attr-defined]
    assert r.json()["error"] == {
        "message": f"The {'request' if one_piece else 'generation'} took longer than the gateway allows",
        "type": "server_error",
        "param": None,
        "code": "timeout",
    }
    margin = ENVOY_MARGIN_S if one_piece else PROCESSOR_MARGIN_S
    assert DEADLINE_S - margin <= took < 30 * TOKEN_DELAY_S
    assert _counter(busy_stack, late) - late_before == 1


def test_a_non_stream_answer_failing_midway_is_a_502_json(busy_stack: Stack) -> None:
    """Its headers wait for the whole answer, so a failure after some tokens still sets the status."""
    if busy_stack.version.startswith("1."):  # type: ignore[attr-defined]
        pytest.skip("1.x swallows a stream's failure (its [DONE] looks like success): see truth12's non-stream path")
    busy_stack.configure(error_after=4)
    r, took = _post(busy_stack, _chat(False, 30))
    assert r.status_code == 502, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"]["code"] == "generation_failed"
    assert took >= 4 * TOKEN_DELAY_S  # it failed after tokens had come, i.e. while the headers were held


def test_the_warmup_generation_takes_a_slot() -> None:
    """WARMUP's generation is Shimmy's work too: with one slot, a chat request meanwhile is refused at once (no slot
    is free, and Shimmy is not ready: 503, not a queue), and Shimmy never runs a second generation."""
    stack = start_stack(
        {
            "MAX_ACTIVE_REQUESTS": "1",
            "EXTPROC_MESSAGE_TIMEOUT_MS": "2000",
            "WARMUP": "true",
            "EMULATOR_TOKEN_DELAY_MS": "6000",  # the warm-up's one token takes 6 s
        },
        wait=False,
    )
    try:
        deadline = time.monotonic() + 20
        while "warming up" not in httpx.get(f"{stack.url}/health").text:
            assert time.monotonic() < deadline, stack.output()
            time.sleep(0.05)
        with Sampler(stack) as sampler:
            r, took = _post(stack, _chat(False, 1))
        assert r.status_code == 503, r.text
        assert json.loads(r.text)["error"]["code"] == "backend_unavailable"
        assert int(r.headers["retry-after"]) > 0 and took < 2
        assert sampler.peak <= 1
    finally:
        stop_stack(stack)
        stack.log.unlink(missing_ok=True)


def test_processor_workers_share_one_cap() -> None:
    """EXTPROC_WORKERS=2: Envoy spreads requests over both workers, and still only one generation gets in."""
    stack = start_stack(
        {
            "EXTPROC_WORKERS": "2",
            "MAX_ACTIVE_REQUESTS": "1",
            "EXTPROC_MESSAGE_TIMEOUT_MS": "2000",
            "QUEUE_TIMEOUT_S": "1",
            "EMULATOR_TOKEN_DELAY_MS": str(TOKEN_DELAY_S * 1000),
        }
    )
    try:
        stack.configure(repeat=True)
        results: list[int] = []

        def call() -> None:
            results.append(_post(stack, _chat(False, 10))[0].status_code)  # 2 s, longer than the 1 s queue wait

        with Sampler(stack) as sampler:
            calls = [threading.Thread(target=call) for _ in range(4)]
            for c in calls:
                c.start()
            for c in calls:
                c.join()
        assert sorted(results) == [200, 429, 429, 429]
        assert sampler.peak <= 1
    finally:
        stop_stack(stack)
        stack.log.unlink(missing_ok=True)


def test_a_queue_wait_longer_than_envoys_message_timeout_is_served() -> None:
    """The queue is not bound by Envoy's limit on one processor answer (EXTPROC_MESSAGE_TIMEOUT_MS, 1 s here): a
    request that waits ~2 s for the one slot asks Envoy for longer first (`override_message_timeout`, up to
    `max_message_timeout`) and is answered 200, within QUEUE_TIMEOUT_S (4 s), and so is a third behind it."""
    stack = start_stack(
        {
            "MAX_ACTIVE_REQUESTS": "1",
            "MAX_QUEUED_REQUESTS": "2",
            "EXTPROC_MESSAGE_TIMEOUT_MS": "1000",
            "QUEUE_TIMEOUT_S": "4",
            "EMULATOR_TOKEN_DELAY_MS": str(TOKEN_DELAY_S * 1000),
        }
    )
    try:
        stack.configure(repeat=True)
        results: dict[str, tuple[int, float, str]] = {}

        def call(name: str, tokens: int) -> None:
            r, took = _post(stack, _chat(False, tokens))
            results[name] = (r.status_code, took, r.text)

        first = threading.Thread(target=call, args=("first", 10))  # 2 s in the slot
        first.start()
        deadline = time.monotonic() + 10
        while stack.emulator_stats()["active_generations"] == 0:
            assert time.monotonic() < deadline, "the first generation never started"
            time.sleep(0.02)
        second = threading.Thread(target=call, args=("second", 1))  # waits ~2 s: twice the message timeout
        second.start()
        time.sleep(0.2)
        third = threading.Thread(target=call, args=("third", 1))  # behind both: ~2.2 s more, within 4 s, served
        third.start()
        for thread in (first, second, third):
            thread.join()
        assert results["first"][0] == 200, results["first"]
        status, took, text = results["second"]
        assert status == 200 and took > 1.5, (status, took, text)
        assert results["third"][0] == 200, results["third"]
    finally:
        stop_stack(stack)
        stack.log.unlink(missing_ok=True)
