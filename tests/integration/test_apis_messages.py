"""Issue 16: the Anthropic Messages API through the running stack, with Anthropic's own SDK and raw HTTP."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import anthropic
import httpx
import pytest

from tests.integration.conftest import Stack, free_port, start_stack, stop_stack

REPLY = "The quick brown fox jumps"  # the emulator's tokens: "The", " quick", " brown", " fox", " jumps"
ASK = [{"role": "user", "content": "Tell me"}]
MESSAGE = {"model": "phi3-lora", "max_tokens": 64, "messages": ASK}


def client(stack: Stack, key: str = "unused") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.url, api_key=key, max_retries=0)


def events(text: str) -> list[tuple[str, dict]]:
    """(event name, data) of each SSE event, checking that the two name the same type."""
    out = []
    for block in filter(None, text.split("\n\n")):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        data = json.loads(lines["data"])
        assert data["type"] == lines["event"]
        out.append((lines["event"], data))
    return out


def assert_anthropic_error(resp: httpx.Response, status: int, type_: str) -> str:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == type_, body
    return body["error"]["message"]


def test_sdk_create_answers_a_message_with_usage_and_end_turn(streamed: Stack) -> None:
    stack = streamed
    stack.configure(reply=REPLY)
    message = client(stack).messages.create(
        model="phi3-lora", max_tokens=64, system="Be brief", messages=ASK, metadata={"user_id": "u1"},
        extra_body={"temperature": 0.5, "top_k": 3}, extra_headers={"anthropic-version": "2023-06-01"},
    )
    assert message.type == "message" and message.role == "assistant" and message.model == "phi3-lora"
    assert [(b.type, b.text) for b in message.content] == [("text", REPLY)]
    assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)
    assert message.usage.output_tokens == 5 and message.usage.input_tokens > 0
    sent = stack.emulator_stats()["last_generate_body"]
    assert sent["prompt"] == "<|system|>\nBe brief<|end|>\n<|user|>\nTell me<|end|>\n<|assistant|>\n"
    assert (sent["max_tokens"], sent["temperature"], sent["top_k"]) == (64, 0.5, 3)


def test_sdk_create_stops_at_max_tokens_and_stop_sequences(streamed: Stack) -> None:
    stack = streamed
    stack.configure(reply=REPLY)
    cut = client(stack).messages.create(model="phi3-lora", max_tokens=2, messages=ASK)
    assert (cut.content[0].text, cut.stop_reason, cut.usage.output_tokens) == ("The quick", "max_tokens", 2)
    stopped = client(stack).messages.create(model="phi3-lora", max_tokens=64, messages=ASK, stop_sequences=["fox"])
    assert stopped.content[0].text == "The quick brown "
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", "fox")
    assert stopped.usage.output_tokens == 4  # the token that completed the stop sequence was generated


def test_sdk_stream_accumulates_the_same_message(stack: Stack) -> None:
    stack.configure(reply=REPLY)
    with client(stack).messages.stream(model="phi3-lora", max_tokens=64, messages=ASK,
                                       stop_sequences=["jumps"]) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(texts) == "The quick brown fox " and final.content[0].text == "The quick brown fox "
    assert (final.stop_reason, final.stop_sequence, final.usage.output_tokens) == ("stop_sequence", "jumps", 5)


def test_raw_stream_sends_anthropics_exact_event_sequence(stack: Stack) -> None:
    stack.configure(reply=REPLY)
    with httpx.stream("POST", f"{stack.url}/v1/messages", json={**MESSAGE, "max_tokens": 3, "stream": True},
                      headers={"anthropic-version": "2023-06-01"}) as resp:
        body = resp.read().decode()
    assert resp.status_code == 200 and resp.headers["content-type"] == "text/event-stream"
    sent = events(body)
    assert [name for name, _ in sent] == [
        "message_start", "content_block_start", "ping",
        "content_block_delta", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop",
    ]
    start = sent[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["input_tokens"] > 0
    assert sent[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert [d["delta"]["text"] for _, d in sent[3:6]] == ["The", " quick", " brown"]
    assert {d["delta"]["type"] for _, d in sent[3:6]} == {"text_delta"}
    assert sent[7][1] == {"type": "message_delta", "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                          "usage": {"output_tokens": 3}}


def test_a_failure_mid_stream_is_an_error_event(streamed: Stack) -> None:
    stack = streamed
    stack.configure(reply=REPLY, error_after=2)
    with httpx.stream("POST", f"{stack.url}/v1/messages", json={**MESSAGE, "stream": True}) as resp:
        sent = events(resp.read().decode())
    assert resp.status_code == 200
    assert [name for name, _ in sent][-3:] == ["content_block_delta", "content_block_delta", "error"]
    assert sent[-1][1]["error"]["type"] == "api_error"
    with client(stack) as claude, pytest.raises(anthropic.APIStatusError), claude.messages.stream(**MESSAGE) as stream:
        list(stream.text_stream)


def test_sdk_count_tokens_counts_the_rendered_prompt_without_generating(stack: Stack) -> None:
    counted = client(stack).messages.count_tokens(model="phi3-lora", system="Be brief", messages=ASK)
    message = client(stack).messages.create(model="phi3-lora", max_tokens=1, system="Be brief", messages=ASK)
    assert counted.input_tokens == message.usage.input_tokens > 0
    before = stack.emulator_stats()["generate_requests"]
    client(stack).messages.count_tokens(model="phi3-lora", messages=ASK)
    assert stack.emulator_stats()["generate_requests"] == before
    with client(stack) as claude, pytest.raises(anthropic.NotFoundError):
        claude.messages.count_tokens(model="no-such-model", messages=ASK)


def test_sdk_error_classes(stack: Stack) -> None:
    with client(stack) as claude:  # closed here: an exception's traceback would keep its connection alive
        with pytest.raises(anthropic.NotFoundError) as missing:
            claude.messages.create(model="no-such-model", max_tokens=8, messages=ASK)
        assert missing.value.body["error"]["type"] == "not_found_error"
        with pytest.raises(anthropic.BadRequestError) as bad:
            claude.messages.create(model="phi3-lora", max_tokens=8, messages=ASK, extra_body={"temperature": 1.5})
        assert "temperature" in bad.value.message
        with pytest.raises(anthropic.BadRequestError) as tools:  # a server tool: Shimmy cannot search the web
            claude.messages.create(model="phi3-lora", max_tokens=8, messages=ASK,
                                   tools=[{"type": "web_search_20250305", "name": "web_search"}])
        assert "tools[0]" in tools.value.message


@pytest.mark.parametrize(
    ("payload", "named"),
    [
        ({"model": "phi3-lora", "messages": ASK}, "max_tokens"),
        ({**MESSAGE, "max_tokens": 0}, "max_tokens"),
        ({**MESSAGE, "messages": []}, "messages"),
        ({**MESSAGE, "messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
        ({**MESSAGE, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
         "messages[0].content[0].type"),
        ({**MESSAGE, "stop_sequences": [""]}, "stop_sequences[0]"),
        ({**MESSAGE, "thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
    ],
)
def test_refused_requests_name_the_param_and_never_reach_shimmy(stack: Stack, payload: dict, named: str) -> None:
    resp = httpx.post(f"{stack.url}/v1/messages", json=payload)
    assert assert_anthropic_error(resp, 400, "invalid_request_error").startswith(f"{named}:")
    assert stack.emulator_stats()["generate_requests"] == 0


def test_text_blocks_and_accepted_parameters(stack: Stack) -> None:
    stack.configure(reply=REPLY)
    resp = httpx.post(f"{stack.url}/v1/messages", json={
        **MESSAGE, "system": [{"type": "text", "text": "Be ", "cache_control": {"type": "ephemeral"}},
                              {"type": "text", "text": "brief"}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Tell "}, {"type": "text", "text": "me"}]}],
        "top_p": 0.9, "service_tier": "auto", "tool_choice": {"type": "auto"},
    })
    assert resp.status_code == 200, resp.text
    prompt = stack.emulator_stats()["last_generate_body"]["prompt"]
    assert prompt.startswith("<|system|>\nBe brief<|end|>\n<|user|>\nTell me")


@pytest.mark.parametrize(
    ("method", "path", "content_type", "body", "status", "type_"),
    [
        ("GET", "/v1/messages", None, None, 405, "invalid_request_error"),
        ("POST", "/v1/messages/batches", "application/json", b"{}", 404, "not_found_error"),
        ("POST", "/v1/messages", "text/plain", b"{}", 415, "invalid_request_error"),
        ("POST", "/v1/messages", "application/json", b"", 400, "invalid_request_error"),
        ("POST", "/v1/messages/count_tokens", "application/json", None, 400, "invalid_request_error"),
    ],
)
def test_envoy_answers_on_messages_paths_in_anthropics_shape(
    stack: Stack, method: str, path: str, content_type: str | None, body: bytes | None, status: int, type_: str
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    resp = httpx.request(method, f"{stack.url}{path}", headers=headers, content=body)
    assert_anthropic_error(resp, status, type_)


@pytest.fixture(scope="module")
def edge() -> Iterator[Stack]:
    """Keys, a tight queue, a short deadline and a small body limit: Envoy's own refusals."""
    started = start_stack({"GATEWAY_API_KEYS": "k-one", "GENERATION_TIMEOUT_S": "4", "MAX_ACTIVE_REQUESTS": "1",
                           "MAX_QUEUED_REQUESTS": "1", "MAX_REQUEST_BYTES": "4096"})
    yield started
    stop_stack(started)
    started.log.unlink(missing_ok=True)


def test_x_api_key_is_checked_like_the_bearer_key(edge: Stack) -> None:
    with client(edge, "wrong") as claude, pytest.raises(anthropic.AuthenticationError) as refused:
        claude.messages.create(**MESSAGE)
    assert refused.value.body["error"]["type"] == "authentication_error"
    assert client(edge, "k-one").messages.create(**{**MESSAGE, "max_tokens": 2}).usage.output_tokens == 2
    assert_anthropic_error(httpx.post(f"{edge.url}/v1/messages", json=MESSAGE), 401, "authentication_error")
    # The OpenAI side keeps its own shape, and reads the same keys from either header.
    assert httpx.post(f"{edge.url}/v1/chat/completions", json={**MESSAGE, "max_tokens": 2},
                      headers={"x-api-key": "k-one"}).status_code == 200
    assert httpx.post(f"{edge.url}/v1/chat/completions", json=MESSAGE).json()["error"]["code"] == "invalid_api_key"


def test_oversized_body_is_request_too_large(edge: Stack) -> None:
    big = {**MESSAGE, "messages": [{"role": "user", "content": "x" * 8000}]}
    resp = httpx.post(f"{edge.url}/v1/messages", json=big, headers={"x-api-key": "k-one"})
    assert_anthropic_error(resp, 413, "request_too_large")


def test_deadline_is_timeout_error_and_full_queue_is_rate_limit_error(edge: Stack) -> None:
    edge.configure(token_delay_ms=500, repeat=True)  # 64 tokens take far longer than the deadline
    results: list[httpx.Response] = []

    def call() -> None:
        results.append(httpx.post(f"{edge.url}/v1/messages", json=MESSAGE, headers={"x-api-key": "k-one"}, timeout=20))

    held = [threading.Thread(target=call) for _ in range(2)]  # one in Shimmy, one queued for its slot
    try:
        for t in held:
            t.start()
        deadline = time.monotonic() + 10
        while "shimmy_admission_queued 1.0" not in (text := httpx.get(f"{edge.url}/metrics",
                                                                         headers={"x-api-key": "k-one"}).text):
            assert time.monotonic() < deadline, text[-2000:]
            time.sleep(0.05)
        refused = httpx.post(f"{edge.url}/v1/messages", json=MESSAGE, headers={"x-api-key": "k-one"})
        for t in held:
            t.join()
    finally:
        httpx.post(f"{edge.emulator}/reset").raise_for_status()
    assert_anthropic_error(refused, 429, "rate_limit_error")
    assert int(refused.headers["retry-after"]) > 0
    assert_anthropic_error(results[0], 504, "timeout_error")


def test_backend_down_is_overloaded_error() -> None:
    down = start_stack({"SHIMMY_BACKEND": "external", "SHIMMY_PORT": str(free_port())}, wait=False)
    try:
        resp = httpx.post(f"{down.url}/v1/messages", json=MESSAGE)
        assert_anthropic_error(resp, 503, "overloaded_error")
        assert httpx.post(f"{down.url}/v1/chat/completions", json=MESSAGE).json()["error"]["code"] == \
            "backend_unavailable"
    finally:
        stop_stack(down)
        down.log.unlink(missing_ok=True)
