"""Context limits in the generation core: a prompt over the model's limit is refused before Shimmy sees it, with
OpenAI's error, and `max_tokens` is clamped to what the context leaves (so `finish_reason: "length"` is true)."""

from __future__ import annotations

import json

import pytest

from extproc.apis.chat import ChatCompletions
from extproc.cli import backend
from extproc.errors import InvalidRequest
from extproc.generation import Exchange, GenerationRequest, Message, start
from extproc.limits import ESTIMATE_MARGIN, ContextLimits, parse_context_tokens
from extproc.tokens import EXACT
from settings import load
from shimmy_spec.versions import profile_for


class Fixed:
    """A counter that says every prompt has `n` tokens, exactly (a stand-in for the GGUF vocabulary)."""

    kind = EXACT

    def __init__(self, n: int) -> None:
        self.n = n

    def count(self, model: str, prompt: str) -> int | None:
        return self.n

    def count_text(self, model: str, text: str) -> int | None:
        return len(text.split())


def chat(limits: ContextLimits | None, counter: Fixed, max_tokens: int = 256, model: str = "phi3-lora") -> Exchange:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": max_tokens}
    request, api = ChatCompletions.parse(json.dumps(body).encode())
    return start(request, api, {}, counter=counter, limits=limits)[1]


V1 = ContextLimits(4096, 2048)  # 1.7.x: the prompt is decoded in one batch of 2048


def test_prompt_over_the_batch_limit_is_openai_context_length_exceeded() -> None:
    with pytest.raises(InvalidRequest) as err:
        chat(V1, Fixed(2049))
    exc = err.value
    assert (exc.status, exc.type, exc.code, exc.param) == (
        400,
        "invalid_request_error",
        "context_length_exceeded",
        "messages",
    )
    assert exc.message == (
        "This model's maximum context length is 2048 tokens. However, your messages resulted in 2049 tokens. "
        "Please reduce the length of the messages."
    )
    body = json.loads(ChatCompletions.error_body(exc))["error"]
    assert body["code"] == "context_length_exceeded" and body["param"] == "messages"


def test_prompt_at_the_limit_passes_and_max_tokens_is_clamped_to_the_context() -> None:
    exchange = chat(V1, Fixed(2048), max_tokens=4000)
    assert exchange.gen.max_tokens == 4096 - 2048


def test_max_tokens_that_fits_is_left_alone() -> None:
    assert chat(V1, Fixed(100), max_tokens=50).gen.max_tokens == 50


def test_clamped_limit_reached_is_finish_reason_length() -> None:
    limits = ContextLimits(64)
    _, exchange = start(
        *ChatCompletions.parse(
            json.dumps({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1000}).encode()
        ),
        {},
        counter=Fixed(60),
        limits=limits,
    )
    assert exchange.gen.max_tokens == 4
    answer = json.loads(exchange.complete(b"data: a\n\ndata: b\n\ndata: c\n\ndata: d\n\ndata: [DONE]\n\n"))
    assert answer["choices"][0]["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 4


def test_no_room_for_one_token_is_refused() -> None:
    with pytest.raises(InvalidRequest) as err:
        chat(ContextLimits(64), Fixed(64))
    assert "maximum context length is 64 tokens. However, your messages resulted in 64 tokens" in err.value.message


def test_per_model_context_overrides_the_release() -> None:
    limits = ContextLimits(2048, None, {"big": 8192})
    assert chat(limits, Fixed(5000), max_tokens=10_000, model="big").gen.max_tokens == 8192 - 5000
    with pytest.raises(InvalidRequest):
        chat(limits, Fixed(5000), model="small")


def test_an_estimate_gets_the_safety_margin() -> None:
    text = "x" * 4000  # estimated at 1000 tokens, checked as 1500
    request = GenerationRequest(model="m", messages=[Message("user", text)], max_tokens=10)
    with pytest.raises(InvalidRequest) as err:
        start(request, ChatCompletions("m"), {"m": "chatml"}, limits=ContextLimits(2048, 1400))
    counted = int(err.value.message.split("resulted in ")[1].split()[0])
    assert counted > 1400 and counted == pytest.approx(1000 * ESTIMATE_MARGIN, rel=0.05)
    exact = Fixed(1000)  # the same prompt counted exactly fits
    assert start(request, ChatCompletions("m"), {"m": "chatml"}, counter=exact, limits=ContextLimits(2048, 1400))


def test_a_raw_prompt_names_param_prompt() -> None:
    request = GenerationRequest(model="m", prompt="p", max_tokens=10)
    with pytest.raises(InvalidRequest) as err:
        start(request, ChatCompletions("m"), {}, counter=Fixed(5000), limits=ContextLimits(4096))
    assert err.value.param == "prompt" and "your prompt resulted in 5000 tokens" in err.value.message


def test_no_limits_no_check() -> None:
    assert chat(None, Fixed(10**6)).gen.max_tokens == 256


@pytest.mark.parametrize(
    ("version", "context", "batch"),
    [("1.7.4", 4096, 2048), ("1.8.1", 4096, 4096), ("2.5.0", 2048, None)],
)
def test_the_processor_takes_its_limits_from_the_shimmy_version(version: str, context: int, batch: int | None) -> None:
    profile, limits = backend(
        load(["SHIMMY_VERSION", "SHIMMY_MAX_CTX", "MODEL_CONTEXT_TOKENS"], [], {"SHIMMY_VERSION": version})
    )
    assert profile == profile_for(version)
    assert (limits.context("any"), limits.prompt_batch_tokens) == (context, batch)


def test_shimmy_max_ctx_and_per_model_settings() -> None:
    env = {"SHIMMY_VERSION": "2.5.0", "SHIMMY_MAX_CTX": "8192", "MODEL_CONTEXT_TOKENS": "a=1024, b=32768"}
    _, limits = backend(load(["SHIMMY_VERSION", "SHIMMY_MAX_CTX", "MODEL_CONTEXT_TOKENS"], [], env))
    assert (limits.context("x"), limits.context("a"), limits.context("b")) == (8192, 1024, 32768)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SHIMMY_VERSION": "latest"}, "SHIMMY_VERSION='latest': expected"),
        ({"SHIMMY_MAX_CTX": "100"}, "SHIMMY_MAX_CTX='100': expected"),
    ],
)
def test_bad_settings_are_refused_when_loaded(
    env: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        load(["SHIMMY_VERSION", "SHIMMY_MAX_CTX", "MODEL_CONTEXT_TOKENS"], [], env)
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_a_context_that_is_no_number_names_its_model() -> None:
    with pytest.raises(ValueError, match="MODEL_CONTEXT_TOKENS: a='x'"):
        backend(load(["SHIMMY_VERSION", "SHIMMY_MAX_CTX", "MODEL_CONTEXT_TOKENS"], [], {"MODEL_CONTEXT_TOKENS": "a=x"}))


def test_parse_context_tokens() -> None:
    assert parse_context_tokens({"m": "8192"}) == {"m": 8192}
    with pytest.raises(ValueError):
        parse_context_tokens({"m": "1"})
