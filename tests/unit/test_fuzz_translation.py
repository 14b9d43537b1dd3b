"""Fuzzing the pure translation (issue 4, item 6): whatever a client or Shimmy sends, the outcome is defined.

- `start_chat` returns Shimmy's `/api/generate` body (valid JSON, `"stream": true`, a string `prompt`, an int
  `max_tokens`, every number within Shimmy's serde types) and a `Exchange`, or raises `GatewayError` 400/404
  with an OpenAI error body. Nothing else, whatever the bytes.
- `Exchange.relay` never raises; it emits only whole `data: ...\\n\\n` events and, once the end is fed, exactly one
  `data: [DONE]`, last. `Exchange.complete` returns one `chat.completion` or raises a 502 `GatewayError`.

The strategies are shared with tests/integration/test_fuzz_live.py, which sends the same bodies through Envoy.

Two findings of this fuzzer, fixed since, keep a regression test each at the end of the file: JSON nested ~1000
deep escaped `start_chat` as RecursionError (a 500 through Envoy), and a `top_k` beyond Shimmy's i32 reached Shimmy
(which answered 422).
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.errors import GatewayError
from extproc.generation import Exchange
from extproc.openai_schema import MAX_TOKENS_LIMIT, ChatRequest
from extproc.sse import MAX_PENDING_BYTES
from extproc.stops import MAX_STOP_SEQUENCES
from extproc.templates import neutralize
from tests.unit.translate import start_chat

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

MODEL = "phi3-lora"
KNOWN_MODELS = (MODEL, "llama3-8b-instruct")
I32_MAX = 2**31 - 1  # Shimmy's GenerateRequest.top_k is an i32 (serde rejects wider values with a 422)
USIZE_MAX = 2**64 - 1
ERROR_KEYS = {"message", "type", "param", "code"}
SHIMMY_KEYS = {"model", "prompt", "max_tokens", "stream", "temperature", "top_p", "top_k"}
REQUEST_FIELDS = frozenset(f.encode_name for f in msgspec.structs.fields(ChatRequest))

# -- strategies: JSON values and bodies ----------------------------------------------------------------------------

# Strings; the junk ones now and then hold lone surrogates: JSON can escape them ("\ud800"), and without
# ensure_ascii they become invalid UTF-8 bytes (surrogatepass), which must fail as invalid_encoding, not crash.
texts = st.one_of(
    st.text(max_size=24),
    st.text(max_size=24),
    st.sampled_from(["", " ", "<|end|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "\n\n", "\x00", "\u2028"]),
)
junk_texts = texts | st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2)
finite = st.floats(allow_nan=False, allow_infinity=False)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), finite, junk_texts)
NEST_DEPTH = 12  # json_values nest at most this deep (max_leaves); deep_bodies go far deeper
json_values = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(texts, kids, max_size=4),
    max_leaves=NEST_DEPTH,
)
# Python's json writes these as NaN / Infinity, which is not JSON.
any_json = st.recursive(
    scalars | st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(texts, kids, max_size=4),
    max_leaves=NEST_DEPTH,
)



def _field(good: st.SearchStrategy[Any], junk: st.SearchStrategy[Any] = json_values) -> st.SearchStrategy[Any]:
    """Mostly plausible values for a field, sometimes (about one in seven) any JSON value at all.

    Not `one_of(good, ..., junk)`: hypothesis flattens nested `one_of`s into one list of branches, so the weights
    would follow how many branches each side happens to have."""
    return st.integers(0, 5).flatmap(lambda i: junk if i == 5 else good)


_int_free_junk = st.one_of(st.none(), st.booleans(), st.floats(), texts, st.lists(scalars, max_size=3))
MODELS = [*KNOWN_MODELS, "gemma-2b", "qwen2.5-7b", "hermes", "no-such-model", "", " ", "phi3-lora "]
ROLES = ["system", "developer", "user", "assistant", "tool"]
BAD_ROLES = ["function", "model", "ipython", "", "USER"]
PART_TYPES = ["image_url", "input_audio", "file", "refusal", "", "TEXT"]
BIG_INTS = [2**31, 2**53 + 1, 2**63, 2**64, 10**30]
TOP_K = st.sampled_from([-1, 0, 1, I32_MAX, I32_MAX + 1, *BIG_INTS]) | st.integers(-2, 100) | st.integers()

parts = st.fixed_dictionaries(
    {"type": _field(st.just("text"), junk=st.sampled_from(PART_TYPES) | json_values)},
    optional={"text": _field(texts), "image_url": json_values},
)
contents = _field(texts | st.lists(_field(parts), max_size=3))
messages = _field(
    st.fixed_dictionaries(
        {"role": _field(st.sampled_from(ROLES), junk=st.sampled_from(BAD_ROLES) | json_values), "content": contents},
        optional={"name": texts, "tool_call_id": texts, "tool_calls": json_values},
    ),
    junk=st.fixed_dictionaries({}, optional={"role": st.sampled_from(ROLES), "content": contents}) | json_values,
)
# Boundaries first: hypothesis finds an off-by-one at a limit far sooner when the limit is a listed value.
token_counts = st.one_of(
    st.sampled_from([-1, 0, 1, 256, MAX_TOKENS_LIMIT, MAX_TOKENS_LIMIT + 1, *BIG_INTS]),
    st.integers(-2, 300),
    st.integers(),
)


def _around(low: float, high: float) -> st.SearchStrategy[float | int]:
    """Numbers at and just past both ends of [low, high], tiny and huge ones, and anything near the range."""
    edges = [low, high, low - 1e-9, high + 1e-9, -0.0, 5e-324, 1e-40, 3.5e38, 1e308, int(low) - 1, int(high) + 1]
    return st.sampled_from(edges) | st.floats(low - 0.5, high + 0.5) | st.integers(int(low) - 1, int(high) + 1)


OPTIONAL_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "stream": _field(st.booleans() | st.none()),
    "stream_options": _field(st.none() | st.fixed_dictionaries({}, optional={"include_usage": _field(st.booleans())})),
    "max_tokens": _field(token_counts),
    "max_completion_tokens": _field(token_counts),
    "temperature": _field(_around(0, 2)),
    "top_p": _field(_around(0, 1)),
    "top_k": _field(TOP_K, junk=_int_free_junk),
    "stop": _field(st.none() | texts | st.lists(texts, max_size=MAX_STOP_SEQUENCES + 2)),
    "n": _field(st.sampled_from([-1, 0, 1, 2, *BIG_INTS]) | st.integers(-1, 3)),
    "seed": _field(st.sampled_from([-(2**63) - 1, -(2**63), *BIG_INTS]) | st.integers()),
    "user": _field(texts),
    "presence_penalty": _field(_around(-2, 2)),
    "frequency_penalty": _field(_around(-2, 2)),
    "metadata": _field(st.dictionaries(texts, texts, max_size=3)),
    "store": _field(st.booleans()),
    "tools": _field(st.lists(json_values, max_size=2)),
    "tool_choice": _field(st.sampled_from(["none", "auto", "required"])),
    "functions": _field(st.lists(json_values, max_size=2)),
    "function_call": _field(st.sampled_from(["none", "auto"])),
    "logprobs": _field(st.booleans()),
    "top_logprobs": _field(st.sampled_from([-1, 0, 1, 20, 21, *BIG_INTS]) | st.integers(0, 5)),
    "logit_bias": _field(st.dictionaries(texts, st.floats(-100, 100), max_size=2)),
    "response_format": _field(
        st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema", ""])})
    ),
    "modalities": _field(st.lists(st.sampled_from(["text", "audio"]), max_size=2)),
    "audio": _field(st.none() | json_values),
}
_unknown_fields = _field(
    st.just({}), junk=st.dictionaries(junk_texts.filter(lambda k: k not in REQUEST_FIELDS), json_values, max_size=2)
)
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "model": _field(st.sampled_from(MODELS), junk=texts | json_values),
    "messages": _field(st.lists(messages, min_size=1, max_size=4), junk=st.just([]) | json_values),
    **OPTIONAL_FIELDS,
}


valid_texts = st.text(max_size=24)
valid_messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]),
            "content": valid_texts | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": valid_texts})),
        }
    ),
    min_size=1,
    max_size=4,
)
stop_texts = st.text(min_size=1, max_size=6)


@st.composite
def valid_requests(draw: st.DrawFn) -> dict[str, Any]:
    """Requests the gateway must accept: every field within the documented contract."""
    request = draw(
        st.fixed_dictionaries(
            {"model": st.sampled_from(KNOWN_MODELS), "messages": valid_messages},
            optional={
                "stream": st.booleans() | st.none(),
                "max_tokens": st.integers(1, MAX_TOKENS_LIMIT),
                "max_completion_tokens": st.integers(1, MAX_TOKENS_LIMIT),
                "temperature": st.floats(0, 2),
                "top_p": st.floats(0, 1),
                "top_k": st.integers(1, I32_MAX),
                "stop": st.none() | stop_texts | st.lists(stop_texts, max_size=MAX_STOP_SEQUENCES),
                "n": st.sampled_from([None, 1]),
                "seed": st.integers(-(2**63), USIZE_MAX),
                "user": valid_texts,
                "presence_penalty": st.floats(-2, 2),
                "frequency_penalty": st.floats(-2, 2),
                "metadata": st.dictionaries(valid_texts, valid_texts, max_size=2),
                "store": st.booleans(),
                "tools": st.sampled_from([[], [{"type": "function", "function": {"name": "f"}}]]),
                "tool_choice": st.sampled_from([None, "none", "auto"]),
                "parallel_tool_calls": st.booleans(),
                "logprobs": st.sampled_from([None, False]),
                "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}]),
                "modalities": st.just(["text"]),
            },
        )
    )
    if request.get("stream") is True and draw(st.booleans()):
        request["stream_options"] = {"include_usage": draw(st.booleans())}
    for message in request["messages"]:
        if message["role"] == "tool":
            message["tool_call_id"] = "call_1"
    return request


@st.composite
def near_valid_requests(draw: st.DrawFn) -> dict[str, Any]:
    """A valid request with one to three fields replaced (mostly by plausible values, some out of range or of the
    wrong type) or removed, and sometimes unknown fields added."""
    request = draw(valid_requests())
    for name in draw(st.sets(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=3)):
        if draw(st.integers(0, 4)):
            request[name] = draw(FIELDS[name])
        else:
            request.pop(name, None)
    return {**draw(_unknown_fields), **request}


@st.composite
def encoded(draw: st.DrawFn, values: st.SearchStrategy[Any]) -> bytes:
    """JSON text of a value, ASCII-escaped or raw UTF-8 (lone surrogates then become invalid UTF-8)."""
    text = json.dumps(draw(values), ensure_ascii=draw(st.booleans()))  # NaN and Infinity too: invalid JSON
    return text.encode("utf-8", "surrogatepass")


@st.composite
def deep_bodies(draw: st.DrawFn) -> bytes:
    """A valid request plus one field (known or not) nested from a few to tens of thousands deep, written as text:
    msgspec decodes recursively, and Python's json could not even encode such a value."""
    request = draw(valid_requests())
    name = draw(st.sampled_from([*sorted(FIELDS), "an_unknown_field"]))
    request.pop(name, None)
    depth = draw(st.sampled_from([2, 64, 500, 900, 990, 1000, 1100, 5000, 50_000]))
    opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"k":', b"}")]))
    value = opener * depth + b"1" + closer * depth
    return json.dumps(request).encode()[:-1] + b', "%s": %s}' % (name.encode(), value)


def _mangle(body: bytes, cut: int, junk: bytes) -> bytes:
    cut %= len(body) + 1
    return body[:cut] + junk + body[cut:]


request_bodies = st.one_of(
    st.binary(max_size=256),
    encoded(any_json),
    encoded(near_valid_requests()),
    encoded(near_valid_requests()),
    encoded(near_valid_requests()),
    encoded(valid_requests()),
    deep_bodies(),
    st.builds(_mangle, encoded(valid_requests()), st.integers(0, 10_000), st.binary(min_size=1, max_size=4)),
)
"""Every kind of chat body the fuzzers send: bytes, JSON values, near-valid, valid, deeply nested and mangled
requests."""

template_overrides = st.sampled_from([{}, {MODEL: "chatml"}, {MODEL: "llama3"}, {MODEL: "gemma"}, {MODEL: "phi3"}])
known_models = st.sampled_from([None, KNOWN_MODELS])

# -- strategies: what Shimmy might send ----------------------------------------------------------------------------

SSE_PIECES = [
    b"data: ", b"data:", b"data", b"\n", b"\r", b"\r\n", b"\n\n", b"\r\n\r\n", b"\r\r", b"[DONE]", b"data: [DONE]\n\n",
    b"data: [ERROR] boom\n\n", b"[ERROR]", b": comment\n", b"event: x\n", b"id: 1\n", b"retry: 5\n", b"\xff\xfe",
    b"\xe2\x82", b"\xac", b"\xf0\x9f", b"\x98\x80", b"<|end|>", b"<|im_end|>", b"Hello", b" world", b"\x00", b"data:\t",
]


def _event(token: str) -> bytes:
    """Shimmy's framing of one token (axum: one `data:` line per line of the text)."""
    return ("".join(f"data: {line}\n" for line in token.split("\n")) + "\n").encode()


shimmy_chunks = st.lists(
    st.one_of(st.binary(max_size=48), st.sampled_from(SSE_PIECES), st.text(max_size=8).map(_event)), max_size=40
)


@st.composite
def huge_lines(draw: st.DrawFn) -> list[bytes]:
    """One long `data:` line around the decoder's cap, in a few pieces, ended by a blank line or not."""
    size = draw(st.sampled_from([MAX_PENDING_BYTES // 2, MAX_PENDING_BYTES - 16, MAX_PENDING_BYTES + 16]))
    line = b"data: " + b"x" * size + draw(st.sampled_from([b"", b"\n", b"\n\n", b"\r\n\r\n"]))
    cuts = sorted(draw(st.lists(st.integers(0, len(line)), max_size=3)))
    bounds = [0, *cuts, len(line)]
    return [line[a:b] for a, b in itertools.pairwise(bounds)]


@st.composite
def shimmy_streams(draw: st.DrawFn) -> list[bytes]:
    """Body chunks as Envoy might hand them over: noise, tokens, sentinels, maybe one huge line somewhere."""
    chunks = draw(shimmy_chunks)
    if draw(st.integers(0, 3)) == 0:
        at = draw(st.integers(0, len(chunks)))
        chunks[at:at] = draw(huge_lines())
    if draw(st.booleans()):
        chunks.append(draw(st.sampled_from([b"data: [DONE]\n\n", b"data: [DONE]\r\n\r\n", b"data: [DONE]"])))
    return chunks


stream_requests = valid_requests().map(lambda r: {**r, "stream": True})
nonstream_requests = valid_requests().map(lambda r: {k: v for k, v in r.items() if k != "stream_options"})

# -- checks --------------------------------------------------------------------------------------------------------


def check_error_body(body: bytes, status: int) -> dict[str, Any]:
    """An OpenAI error object: `{"error": {message, type, param, code}}`; returns the inner object."""
    document = json.loads(body)
    assert isinstance(document, dict) and set(document) == {"error"}, document
    error = document["error"]
    assert isinstance(error, dict) and set(error) == ERROR_KEYS, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["param"] is None or isinstance(error["param"], str)
    assert error["code"] is None or isinstance(error["code"], str)
    expected_type = {401: "authentication_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )
    assert error["type"] == expected_type, (status, error)
    return error


def check_refusal(exc: GatewayError) -> None:
    assert exc.status in (400, 404), (exc.status, exc.message)
    error = check_error_body(exc.body(), exc.status)
    if exc.status == 404:
        assert error["code"] == "model_not_found" and error["param"] == "model"


def check_shimmy_body(body: bytes) -> dict[str, Any]:
    """What Shimmy receives: explicit stream, a prompt, an int max_tokens, each number within Shimmy's types."""
    sent = json.loads(body)
    assert isinstance(sent, dict) and set(sent) <= SHIMMY_KEYS, sent
    assert sent["stream"] is True
    assert isinstance(sent["model"], str) and sent["model"]
    assert isinstance(sent["prompt"], str)
    assert type(sent["max_tokens"]) is int and 1 <= sent["max_tokens"] <= MAX_TOKENS_LIMIT
    for name, low, high in (("temperature", 0, 2), ("top_p", 0, 1)):
        if name in sent:
            assert type(sent[name]) in (int, float) and low <= sent[name] <= high, sent
    if "top_k" in sent:
        assert type(sent["top_k"]) is int and 1 <= sent["top_k"] <= I32_MAX, sent
    return sent


def split_events(out: bytes) -> list[bytes]:
    """The events of a relay output, which must be whole `data: ...\\n\\n` events and nothing else."""
    if not out:
        return []
    assert out.endswith(b"\n\n"), out[-80:]
    events = out[:-2].split(b"\n\n")
    for event in events:
        assert event.startswith(b"data: "), event[:80]
        assert b"\n" not in event and b"\r" not in event
        payload = event.removeprefix(b"data: ")
        if payload == b"[DONE]":
            continue
        document = json.loads(payload)
        if "error" in document:
            check_error_body(payload, 502)
        else:
            assert document["object"] == "chat.completion.chunk" and isinstance(document["choices"], list)
    return events


# -- start_chat ----------------------------------------------------------------------------------------------------


def outcome(body: bytes, overrides: dict[str, str], models: tuple[str, ...] | None) -> tuple[bytes, Exchange] | None:
    """start_chat's result, or None after checking its refusal; any other exception fails the test."""
    try:
        shimmy, state = start_chat(body, overrides, models)
    except GatewayError as exc:
        check_refusal(exc)
        return None
    sent = check_shimmy_body(shimmy)
    assert isinstance(state, Exchange) and state.gen.max_tokens == sent["max_tokens"]
    if models is not None:
        assert sent["model"] in models
    return shimmy, state


@FUZZ
@given(body=st.binary(max_size=512), overrides=template_overrides, models=known_models)
def test_arbitrary_bytes(body: bytes, overrides: dict[str, str], models: tuple[str, ...] | None) -> None:
    outcome(body, overrides, models)


@FUZZ
@given(body=encoded(any_json), overrides=template_overrides, models=known_models)
def test_arbitrary_json_values(body: bytes, overrides: dict[str, str], models: tuple[str, ...] | None) -> None:
    outcome(body, overrides, models)


@FUZZ
@given(request=near_valid_requests(), ascii_=st.booleans(), overrides=template_overrides, models=known_models)
def test_near_valid_requests(
    request: dict[str, Any], ascii_: bool, overrides: dict[str, str], models: tuple[str, ...] | None
) -> None:
    body = json.dumps(request, ensure_ascii=ascii_).encode("utf-8", "surrogatepass")
    result = outcome(body, overrides, models)
    if result is not None:
        _, state = result
        assert state.gen.stream is (request.get("stream") is True)
        assert state.gen.model == request["model"]


@FUZZ
@given(body=request_bodies, overrides=template_overrides, models=known_models)
def test_mixed_bodies(body: bytes, overrides: dict[str, str], models: tuple[str, ...] | None) -> None:
    outcome(body, overrides, models)


@FUZZ
@given(request=valid_requests(), overrides=template_overrides)
def test_valid_requests_are_accepted_and_carried_over(request: dict[str, Any], overrides: dict[str, str]) -> None:
    """No false refusals: every request within the contract becomes the matching Shimmy body."""
    shimmy, state = start_chat(json.dumps(request).encode(), overrides, KNOWN_MODELS)
    sent = check_shimmy_body(shimmy)
    limit = request.get("max_completion_tokens", request.get("max_tokens"))
    assert sent["max_tokens"] == (256 if limit is None else limit)
    for name in ("temperature", "top_p", "top_k"):
        assert sent.get(name) == request.get(name)
    assert sent["model"] == state.gen.model == request["model"]
    assert state.gen.stream is bool(request.get("stream"))
    assert state.api.include_usage is bool(request.get("stream_options", {}).get("include_usage"))
    for message in request["messages"]:
        content = message["content"]
        text = content if isinstance(content, str) else "".join(p["text"] for p in content)
        assert neutralize(text.strip()) in sent["prompt"]  # control strings broken (prompt safety), nothing else


# -- relay and complete --------------------------------------------------------------------------------------------


@FUZZ
@given(request=stream_requests, chunks=shimmy_streams(), timeout=st.sampled_from([600.0, -1.0]))
def test_relay_emits_whole_events_and_one_done(request: dict[str, Any], chunks: list[bytes], timeout: float) -> None:
    _, state = start_chat(json.dumps(request).encode(), {}, None, timeout)
    outputs = [state.relay(chunk, end=False) for chunk in chunks]
    outputs.append(state.relay(b"", end=True))
    events = [event for out in outputs for event in split_events(out)]
    assert events[0].startswith(b'data: {"id":') and b'"role":"assistant"' in events[0]
    assert events.count(b"data: [DONE]") == 1 and events[-1] == b"data: [DONE]"
    last = json.loads(events[-2].removeprefix(b"data: "))
    if "error" not in last:  # a normal end: a finish_reason chunk, then the usage chunk when asked for
        choices = [json.loads(e.removeprefix(b"data: "))["choices"] for e in events[:-1]]
        reasons = [c[0]["finish_reason"] for c in choices if c and c[0]["finish_reason"]]
        assert reasons in (["stop"], ["length"])
        assert ("usage" in last) is state.api.include_usage
    assert state.finished
    assert state.relay(b"data: late\n\ndata: [DONE]\n\n", end=True) == b""  # nothing after [DONE]


@FUZZ
@given(request=stream_requests, chunks=shimmy_streams())
def test_relay_without_end_never_repeats_done(request: dict[str, Any], chunks: list[bytes]) -> None:
    _, state = start_chat(json.dumps(request).encode(), {}, None)
    events = [event for chunk in chunks for event in split_events(state.relay(chunk, end=False))]
    assert events.count(b"data: [DONE]") <= 1
    if b"data: [DONE]" in events:
        assert events[-1] == b"data: [DONE]" and state.finished


@FUZZ
@given(request=nonstream_requests, chunks=shimmy_streams())
def test_complete_is_a_completion_or_a_502(request: dict[str, Any], chunks: list[bytes]) -> None:
    _, state = start_chat(json.dumps({**request, "stream": False}).encode(), {}, None)
    try:
        body = state.complete(b"".join(chunks))
    except GatewayError as exc:
        assert exc.status == 502
        check_error_body(exc.body(), 502)
        return
    document = json.loads(body)
    assert document["object"] == "chat.completion"
    (choice,) = document["choices"]
    assert isinstance(choice["message"]["content"], str) and choice["finish_reason"] in ("stop", "length")
    usage = document["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


# -- regressions: the fuzzer's findings ------------------------------------------------------------------------


@FUZZ
@given(body=deep_bodies(), overrides=template_overrides)
def test_deeply_nested_bodies(body: bytes, overrides: dict[str, str]) -> None:
    outcome(body, overrides, KNOWN_MODELS)


@pytest.mark.parametrize("name", ["tools", "tool_choice", "an_unknown_field"])
def test_deeply_nested_value_is_a_400(name: str) -> None:
    """Found by this fuzzer: ~1000 levels of `[` in any field of no fixed type escaped as RecursionError."""
    depth = 1000
    body = b'{"model":"phi3-lora","messages":[{"role":"user","content":"Hi"}],"%s":%s}' % (
        name.encode(),
        b"[" * depth + b"]" * depth,
    )
    with pytest.raises(GatewayError) as caught:
        start_chat(body, {})
    assert caught.value.status == 400
    check_error_body(caught.value.body(), 400)


def test_top_k_beyond_i32_is_refused_before_shimmy() -> None:
    """Found by this fuzzer: Shimmy reads top_k as i32 and answered 422 to a wider one the gateway let through."""
    body = b'{"model":"phi3-lora","messages":[{"role":"user","content":"Hi"}],"top_k":%d}' % (I32_MAX + 1)
    with pytest.raises(GatewayError) as caught:
        start_chat(body, {})
    assert caught.value.status == 400 and caught.value.param == "top_k"
    shimmy, _ = start_chat(body.replace(b"%d" % (I32_MAX + 1), b"%d" % I32_MAX), {})
    assert json.loads(shimmy)["top_k"] == I32_MAX


def test_strategies_reach_both_outcomes() -> None:
    """The near-valid strategy is not all refusals: a guard against a strategy that stopped exploring."""
    accepted = refused = 0

    @settings(max_examples=200, deadline=None, database=None)
    @given(request=near_valid_requests())
    def probe(request: dict[str, Any]) -> None:
        nonlocal accepted, refused
        try:
            start_chat(json.dumps(request).encode(), {}, None)
            accepted += 1
        except GatewayError:
            refused += 1

    probe()
    assert accepted > 0 and refused > 0
