"""The legacy completions adapter on the generation core: the raw prompt, text_completion objects and chunks."""

from __future__ import annotations

import json

import pytest

from extproc.apis.completions import Completions
from extproc.errors import InvalidRequest
from tests.unit.test_chat import events
from tests.unit.translate import shimmy_stream, start_api


def body(**fields: object) -> bytes:
    return json.dumps({"model": "phi3-lora", "prompt": "Once upon", **fields}).encode()


def test_the_prompt_goes_untemplated_with_16_tokens_by_default() -> None:
    shimmy, exchange = start_api(Completions, body())
    sent = json.loads(shimmy)
    assert (sent["prompt"], sent["max_tokens"]) == ("Once upon", 16)
    assert exchange.gen.stops.feed("<|end|>") == "<|end|>"  # no template, so no end-of-turn marker to stop at


def test_a_list_of_one_prompt_and_stop() -> None:
    shimmy, exchange = start_api(Completions, body(prompt=["a time"], stop="\n", max_tokens=3, temperature=0.1))
    assert json.loads(shimmy)["prompt"] == "a time"
    completion = json.loads(exchange.complete(shimmy_stream(" there", "\n", "was")))
    assert completion["choices"] == [{"text": " there", "index": 0, "logprobs": None, "finish_reason": "stop"}]
    assert completion["object"] == "text_completion" and completion["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(
    ("raw", "param", "code"),
    [
        (body(echo=True), "echo", "unsupported_parameter"),
        (body(suffix="end"), "suffix", "unsupported_parameter"),
        (body(logprobs=0), "logprobs", "unsupported_parameter"),
        (body(best_of=2), "best_of", "unsupported_parameter"),
        (body(n=2), "n", "unsupported_parameter"),
        (body(prompt=["a", "b"]), "prompt", "invalid_value"),
        (body(prompt=[1, 2]), "prompt[0]", "invalid_value"),  # token arrays: text prompts only
        (body(max_tokens=0), "max_tokens", "invalid_value"),
        (body(stream_options={"include_usage": True}), "stream_options", "invalid_value"),
    ],
)
def test_refusals_name_the_param(raw: bytes, param: str, code: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        Completions.parse(raw)
    error = json.loads(refused.value.body())["error"]
    assert (error["param"], error["code"]) == (param, code)


def test_stream_chunks_finish_usage_done() -> None:
    _, exchange = start_api(Completions, body(stream=True, max_tokens=2, stream_options={"include_usage": True}))
    chunks = events(exchange.relay(shimmy_stream("The", " quick"), True))
    assert [(c["choices"][0]["text"], c["choices"][0]["finish_reason"]) for c in chunks[:-1]] == [
        ("The", None), (" quick", None), ("", "length"),
    ]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2
    assert {c["object"] for c in chunks} == {"text_completion"} and len({c["id"] for c in chunks}) == 1


def test_stream_failure_is_an_in_band_error_then_done() -> None:
    _, exchange = start_api(Completions, body(stream=True))
    out = exchange.relay(b"data: The\n\ndata: [ERROR] boom\n\n", True)
    assert out.endswith(b"data: [DONE]\n\n") and b'"code":"generation_failed"' in out
