"""1.x non-stream: the client's request goes to Shimmy as `"stream": false`, whose 502 tells a failure (a 1.x stream
swallows it); the one-piece answer gets the client's stop sequences and a tokenizer's completion count."""

from __future__ import annotations

import json

import pytest

import shimmy.engine
from extproc.apis.chat import ChatCompletions
from extproc.errors import UpstreamError
from extproc.generation import Exchange, start
from extproc.tokens import ESTIMATED, EXACT, FIXED, counter
from shimmy.runtime import prompt_count
from shimmy_spec.versions import profile_for

V1, V2 = profile_for("1.8.1"), profile_for("2.5.0")


class Words:
    """An exact counter for model "phi3-lora" only: one token per word."""

    kind = EXACT

    def count(self, model: str, prompt: str) -> int | None:
        return len(prompt.split()) if model == "phi3-lora" else None

    def count_text(self, model: str, text: str) -> int | None:
        return len(text.split()) if model == "phi3-lora" else None


def chat(profile: object, model: str = "phi3-lora", **fields: object) -> tuple[dict, Exchange]:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], **fields}
    request, api = ChatCompletions.parse(json.dumps(body).encode())
    shimmy, exchange = start(request, api, {}, counter=Words(), profile=profile)  # type: ignore[arg-type]
    return json.loads(shimmy), exchange


@pytest.mark.parametrize(
    ("profile", "stream", "upstream"),
    [(V1, False, False), (V1, True, True), (V2, False, True), (V2, True, True), (None, False, True)],
)
def test_only_a_1x_non_stream_client_is_asked_for_in_one_piece(profile: object, stream: bool, upstream: bool) -> None:
    sent, exchange = chat(profile, stream=stream)
    assert sent["stream"] is upstream and exchange.gen.upstream_stream is upstream


def answer(exchange: Exchange, text: str) -> dict:
    return json.loads(exchange.complete(json.dumps({"response": text}).encode()))


def test_one_piece_answer_is_cut_at_the_template_end_and_counted() -> None:
    _, exchange = chat(V1, max_tokens=50)
    out = answer(exchange, "Hello there friend<|end|>\n<|user|>\nmore")
    choice = out["choices"][0]
    assert choice["message"]["content"] == "Hello there friend" and choice["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] == 3 and exchange.gen.completion_tokens_kind == EXACT


def test_client_stop_sequence_is_applied_afterwards() -> None:
    _, exchange = chat(V1, stop=["there"], max_tokens=50)
    out = answer(exchange, "Hello there friend")
    assert out["choices"][0]["message"]["content"] == "Hello " and out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] == 2  # "Hello there": up to the end of the stop sequence


def test_length_only_when_the_count_reaches_max_tokens() -> None:
    _, exchange = chat(V1, max_tokens=3)
    out = answer(exchange, "one two three")
    assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 3
    _, exchange = chat(V1, max_tokens=4)
    assert answer(exchange, "one two three")["choices"][0]["finish_reason"] == "stop"


def test_without_a_tokenizer_the_count_is_estimated_and_says_so() -> None:
    _, exchange = chat(V1, model="other", max_tokens=100)
    assert exchange.gen.completion_tokens_kind == ESTIMATED
    out = answer(exchange, "x" * 40)
    assert out["usage"]["completion_tokens"] == 10 and exchange.gen.completion_tokens_kind == ESTIMATED


def test_an_unreadable_one_piece_answer_is_an_upstream_error() -> None:
    _, exchange = chat(V1)
    with pytest.raises(UpstreamError):
        exchange.complete(b"data: Hello\n\ndata: [DONE]\n\n")


def test_an_estimated_count_errs_towards_length() -> None:
    """No vocabulary for the model: an answer whose estimate (with the prompt check's margin of 1.5) reaches
    `max_tokens` may have been cut, so it is reported cut at `max_tokens`, never as ended (issue 23)."""
    _, exchange = chat(V1, model="other", max_tokens=3)
    out = answer(exchange, "Hello! I")  # 8 bytes: estimate 2, times 1.5 reaches 3
    assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 3
    assert exchange.gen.completion_tokens_kind == ESTIMATED
    _, exchange = chat(V1, model="other", max_tokens=4)
    out = answer(exchange, "Hello! I")  # 3 < 4: far enough from the limit to have ended
    assert out["choices"][0]["finish_reason"] == "stop" and out["usage"]["completion_tokens"] == 2
    _, exchange = chat(V1, model="other", max_tokens=3, stop=["!"])
    out = answer(exchange, "Hello! I")  # a stop sequence ended it, whatever the count
    assert out["choices"][0]["finish_reason"] == "stop" and out["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(
    "reply",
    ["Hello! I am the Shimmy emulator. How can I help you today?", "a_b  c\n\n\tx 12ab émigré 🦙!?", ""],
)
def test_the_fixed_engine_and_the_gateway_count_alike(reply: str) -> None:
    """TOKENIZER_GGUF=fixed (the supervisor's choice when the fixed engine serves) counts a one-piece answer with
    the engine's own rule: the count is the number of tokens the engine generated, and the prompt's is the
    emulator's own (BOS included)."""
    engine_tokens = shimmy.engine.tokenize(reply)
    assert "".join(token.text for token in engine_tokens) == reply
    fixed = counter(FIXED, models={"phi3-lora"})
    assert fixed.kind == EXACT
    assert fixed.count_text("phi3-lora", reply) == len(engine_tokens)
    assert fixed.count("phi3-lora", reply) == prompt_count(reply)
    assert fixed.count_text("other", reply) is None  # another model's vocabulary is unknown: estimated
    request, api = ChatCompletions.parse(json.dumps({"model": "phi3-lora", "messages": [{"role": "user",
                                                     "content": "Hi"}], "max_tokens": 3}).encode())
    _, exchange = start(request, api, {}, counter=fixed, profile=V1)
    out = answer(exchange, "".join(token.text for token in engine_tokens[:3]))
    assert out["usage"]["completion_tokens"] == min(3, len(engine_tokens))
    assert exchange.gen.completion_tokens_kind == EXACT
