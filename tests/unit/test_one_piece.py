"""1.x non-stream: the client's request goes to Shimmy as `"stream": false`, whose 502 tells a failure (a 1.x stream
swallows it); the one-piece answer gets the client's stop sequences and a tokenizer's completion count."""

from __future__ import annotations

import json

import pytest

from extproc.apis.chat import ChatCompletions
from extproc.errors import UpstreamError
from extproc.generation import Exchange, start
from extproc.tokens import ESTIMATED, EXACT
from shimmy.versions import profile_for

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
