"""Issue 3: token-by-token SSE through Envoy and the processor, nothing buffered."""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import httpx
import openai
import pytest

from tests.integration.conftest import Stack, sse_events, start_stack, stop_stack

REPLY = "The quick brown fox jumps"  # the emulator's tokens: "The", " quick", " brown", " fox", " jumps"
TOKENS = ["The", " quick", " brown", " fox", " jumps"]
CHAT = {"model": "phi3-lora", "messages": [{"role": "user", "content": "Tell me"}], "stream": True}


def stream_lines(stack: Stack, payload: dict) -> tuple[httpx.Response, list[str]]:
    with httpx.stream("POST", f"{stack.url}/v1/chat/completions", json=payload, timeout=30) as resp:
        return resp, list(resp.iter_lines())


def test_openai_sdk_streams_role_content_finish_and_usage(stack: Stack) -> None:
    stack.configure(reply=REPLY)
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    chunks = list(client.chat.completions.create(
        model="phi3-lora", messages=[{"role": "user", "content": "Tell me"}], stream=True,
        stream_options={"include_usage": True},
    ))
    client.close()
    assert chunks[0].choices[0].delta.role == "assistant"
    contents = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert contents == TOKENS  # one delta per Shimmy token
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(TOKENS)
    assert len({(c.id, c.created, c.model) for c in chunks}) == 1


async def test_async_openai_sdk_streams_and_reports_length(stack: Stack) -> None:
    stack.configure(reply=REPLY)
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    stream = await client.chat.completions.create(
        model="phi3-lora", messages=[{"role": "user", "content": "Tell me"}], stream=True, max_tokens=3
    )
    text, finish = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    await client.close()
    assert text == "The quick brown"
    assert finish == "length"


def test_raw_sse_framing_and_headers(stack: Stack) -> None:
    stack.configure(reply="line one\nline two")
    resp, lines = stream_lines(stack, CHAT)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "text/event-stream"
    assert resp.headers["cache-control"] == "no-cache"
    assert resp.headers["x-accel-buffering"] == "no"
    assert "content-length" not in resp.headers
    # Every event is one `data:` line followed by a blank line; the stream ends with [DONE].
    assert all(line.startswith("data: ") for line in lines[::2])
    assert all(line == "" for line in lines[1::2])
    events = sse_events(lines)
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
    assert text == "line one\nline two"  # multi-line tokens survive Shimmy's framing and ours


def test_tokens_arrive_as_they_are_generated(stack: Stack) -> None:
    stack.configure(reply=REPLY, token_delay_ms=200)
    arrivals: list[float] = []
    with httpx.stream("POST", f"{stack.url}/v1/chat/completions", json=CHAT, timeout=30) as resp:
        for line in resp.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                arrivals.append(time.monotonic())
    assert len(arrivals) == len(TOKENS)
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    # Paced 200 ms apart upstream: a buffering proxy would deliver them in one burst (gaps ~0).
    assert min(gaps) > 0.1, gaps
    assert arrivals[-1] - arrivals[0] > 0.6


def test_stop_sequence_ends_the_stream_early(stack: Stack) -> None:
    stack.configure(reply=REPLY)
    events = sse_events(stream_lines(stack, {**CHAT, "stop": ["own f"]})[1])
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
    assert text == "The quick br"
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_a_stop_sequence_ends_the_http_response_while_shimmy_still_generates(stack: Stack) -> None:
    stack.configure(reply=REPLY, repeat=True, token_delay_ms=200)  # 60 tokens would take 12 s
    started = time.monotonic()
    _, lines = stream_lines(stack, {**CHAT, "stop": [" brown"], "max_tokens": 60})
    assert time.monotonic() - started < 3
    assert sse_events(lines)[-1] == "[DONE]"
    assert stack.emulator_stats()["active_generations"] == 1  # Shimmy is still at it, unheard


def test_upstream_error_event_becomes_in_band_error_then_done(versioned_stack: Stack) -> None:
    stack = versioned_stack
    if stack.shimmy_version().startswith("1."):
        pytest.skip("1.x sends no error event: test_shimmy_1x_swallows_errors_so_the_stream_just_ends")
    stack.configure(reply=REPLY, error_after=2)
    resp, lines = stream_lines(stack, CHAT)
    assert resp.status_code == 200
    events = sse_events(lines)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["type"] == "server_error"
    assert events[-2]["error"]["code"] == "generation_failed"
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if isinstance(e, dict) and
                   e.get("choices"))
    assert text == "The quick"
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(model="phi3-lora", messages=CHAT["messages"], stream=True))
    client.close()


def test_shimmy_1x_swallows_errors_so_the_stream_just_ends(versioned_stack: Stack) -> None:
    """What the gateway cannot fix: a 1.x stream failure looks like a normal end (docs/shimmy-versions.md)."""
    stack = versioned_stack
    if not stack.shimmy_version().startswith("1."):
        pytest.skip("2.x reports the failure: test_upstream_error_event_becomes_in_band_error_then_done")
    stack.configure(reply=REPLY, error_after=2)
    events = sse_events(stream_lines(stack, CHAT)[1])
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert not any("error" in e for e in events if isinstance(e, dict))


def test_error_before_the_first_byte_keeps_its_status(stack: Stack) -> None:
    stack.configure(fail_load=True)
    resp, lines = stream_lines(stack, CHAT)
    assert resp.status_code == 502
    assert resp.headers["content-type"] == "application/json"
    assert '"upstream_error"' in "".join(lines)


def test_drop_before_the_first_token_reaches_the_client_is_still_a_json_error(stack: Stack) -> None:
    """Shimmy's connection closes before its response starts: the streaming client gets a JSON error, not a 200.

    Not `drop_after=1`, which failed 2 runs in 15: once Shimmy's 200 and first token are on the wire, whether Envoy
    has let the client's headers out when the reset arrives is a race between the processor's answer to the
    response headers and the reset, so the client sees either a 502 or a 200 cut short. Neither is a success;
    test_dropped_upstream_connection_ends_the_response_without_a_hang covers the second."""
    stack.configure(reply=REPLY, drop_after=0)
    resp, lines = stream_lines(stack, CHAT)
    assert resp.status_code == 503
    assert resp.headers["content-type"] == "application/json"
    assert json.loads("".join(lines))["error"]["code"] == "backend_unavailable"  # Envoy's flag UC: no response


def _ext_proc_open_streams(stack: Stack) -> int:
    stats = stack.envoy_stats("http.gateway.ext_proc.shimmy.streams_")
    prefix = "http.gateway.ext_proc.shimmy."
    return stats.get(prefix + "streams_started", 0) - stats.get(prefix + "streams_closed", 0)


def test_client_disconnect_mid_stream_leaves_nothing_behind(stack: Stack) -> None:
    stack.configure(reply=REPLY, repeat=True, token_delay_ms=50)
    log_before = stack.output().count("[extproc]")
    assert _ext_proc_open_streams(stack) == 0
    with httpx.stream("POST", f"{stack.url}/v1/chat/completions", json={**CHAT, "max_tokens": 200}) as resp:
        lines = resp.iter_lines()
        seen = [next(lines) for _ in range(6)]
        assert any('"content":"' in line for line in seen)
        assert _ext_proc_open_streams(stack) == 1
    deadline = time.monotonic() + 5
    while _ext_proc_open_streams(stack) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _ext_proc_open_streams(stack) == 0
    assert stack.output().count("[extproc]") - log_before <= 1  # no error storm
    resp = httpx.post(f"{stack.url}/v1/chat/completions", json={**CHAT, "stream": False, "max_tokens": 2})
    assert resp.status_code == 200


def test_dropped_upstream_connection_ends_the_response_without_a_hang(stack: Stack) -> None:
    """Envoy cannot append bytes after the upstream resets mid-response: it resets the client's stream too.
    The client sees a prompt transport error (never a hang, never a half-written event), and the next
    request is served."""
    stack.configure(reply=REPLY, drop_after=3, token_delay_ms=100)  # paced, so the client has the first bytes
    started = time.monotonic()
    received: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError):  # raised while reading the body
        with httpx.stream("POST", f"{stack.url}/v1/chat/completions", json=CHAT, timeout=10) as resp:
            for line in resp.iter_lines():
                received.append(line)
    assert time.monotonic() - started < 5
    assert all(line == "" or line.startswith("data: {") for line in received)
    # Tokens sent well before the drop arrived (the very last one may race the reset inside Envoy).
    assert any('"content":" quick"' in line for line in received)
    stack.configure(drop_after=None)
    assert httpx.post(f"{stack.url}/v1/chat/completions",
                      json={**CHAT, "stream": False}).status_code == 200


@pytest.mark.slow
def test_a_45_second_stream_survives_every_timeout() -> None:
    """Tight timeouts on purpose: each token resets the idle timers, and message_timeout times one message."""
    stack = start_stack({
        "STREAM_IDLE_TIMEOUT_S": "5",
        "EXTPROC_MESSAGE_TIMEOUT_MS": "2000",
        "GENERATION_TIMEOUT_S": "70",
        "EMULATOR_TOKEN_DELAY_MS": "1000",
        "EMULATOR_REPLY": " ".join(["tick"] * 46),
    })
    try:
        async def consume() -> tuple[int, str | None, float]:
            client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=90)
            count, finish, started = 0, None, time.monotonic()
            async for chunk in await client.chat.completions.create(
                model="phi3-lora", messages=[{"role": "user", "content": "x"}], stream=True, max_tokens=100
            ):
                if chunk.choices and chunk.choices[0].delta.content:
                    count += 1
                finish = (chunk.choices[0].finish_reason if chunk.choices else None) or finish
            await client.close()
            return count, finish, time.monotonic() - started

        count, finish, seconds = asyncio.run(consume())
        assert count == 46 and finish == "stop"
        assert seconds >= 45
    finally:
        stop_stack(stack)
