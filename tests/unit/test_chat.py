"""The OpenAI <-> Shimmy translation, as pure functions: no server, no Envoy."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.errors import GatewayError, InvalidRequest, ModelNotFound, UpstreamError
from extproc.generation import Exchange
from extproc.stops import StopMatcher
from tests.unit.translate import start_chat


def body(**fields: object) -> bytes:
    base: dict[str, object] = {"model": "phi3-lora", "messages": [{"role": "user", "content": "Hi"}]}
    base.update(fields)
    return json.dumps(base).encode()


def shimmy_stream(*tokens: str, done: bool = True) -> bytes:
    """Shimmy's wire bytes for these tokens (axum framing: one `data:` line per line of the token)."""
    out = "".join("".join(f"data: {line}\n" for line in t.split("\n")) + "\n" for t in tokens)
    return (out + ("data: [DONE]\n\n" if done else "")).encode()


def events(sse: bytes) -> list[dict]:
    lines = [ln for ln in sse.decode().split("\n\n") if ln]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]


# -- request -------------------------------------------------------------------------------------


def test_request_becomes_explicit_stream_generate_with_rendered_prompt() -> None:
    shimmy, state = start_chat(
        body(messages=[{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"}],
             max_tokens=7, temperature=0.2, top_p=0.5, top_k=3, seed=1, user="u"),
        {},
    )
    sent = json.loads(shimmy)
    assert sent == {
        "model": "phi3-lora",
        "prompt": "<|system|>\nBe brief<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n",
        "max_tokens": 7,
        "stream": True,
        "temperature": 0.2,
        "top_p": 0.5,
        "top_k": 3,
    }
    assert state.gen.max_tokens == 7 and not state.gen.stream


def test_defaults_are_explicit_and_content_parts_are_joined() -> None:
    shimmy, _ = start_chat(
        body(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]),
        {"phi3-lora": "chatml"},
    )
    sent = json.loads(shimmy)
    assert sent["max_tokens"] == 256 and sent["stream"] is True
    assert sent["prompt"] == "<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n"
    assert "temperature" not in sent  # unset sampling fields keep Shimmy's defaults


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    _, state = start_chat(body(max_tokens=50, max_completion_tokens=5), {})
    assert state.gen.max_tokens == 5


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}


@pytest.mark.parametrize(
    ("raw", "param", "code"),
    [
        pytest.param(b'{"model":', None, "invalid_json", id="malformed-json"),
        pytest.param(b'{"model":"m","messages":[{"role":"user","content":"\xff"}]}', None, "invalid_encoding",
                     id="invalid-utf8"),
        pytest.param(b"[]", None, "invalid_value", id="not-an-object"),
        pytest.param(body(messages=[]), "messages", "invalid_value", id="empty-messages"),
        pytest.param(b'{"model":"phi3-lora"}', "messages", "invalid_value", id="missing-messages"),
        pytest.param(body(messages=[{"role": "robot", "content": "x"}]), "messages[0].role", "invalid_value",
                     id="unknown-role"),
        pytest.param(body(messages=[{"role": "user"}]), "messages[0].content", "invalid_value", id="missing-content"),
        pytest.param(body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
                     "messages[0].content[0].type", "invalid_value", id="image-part"),
        pytest.param(body(max_tokens=-1), "max_tokens", "invalid_value", id="negative-max-tokens"),
        pytest.param(body(max_tokens=1.5), "max_tokens", "invalid_value", id="fractional-max-tokens"),
        pytest.param(body(max_tokens="9"), "max_tokens", "invalid_value", id="string-max-tokens"),
        pytest.param(body(temperature=2.5), "temperature", "invalid_value", id="temperature-range"),
        pytest.param(body(top_p=1.5), "top_p", "invalid_value", id="top-p-range"),
        pytest.param(body(stop=["a"] * 17), "stop", "invalid_value", id="too-many-stops"),
        pytest.param(body(stop=["x" * 256] * 8 + ["y"]), "stop", "invalid_value", id="too-many-characters"),
        pytest.param(body(stop=["x" * 256] * 15 + ["y" * 257]), "stop[15]", "invalid_value", id="sixteenth-too-long"),
        pytest.param(body(stop="x" * 257), "stop", "invalid_value", id="stop-too-long"),
        pytest.param(body(stop=["a", "x" * 257]), "stop[1]", "invalid_value", id="one-stop-too-long"),
        pytest.param(body(model=""), "model", "invalid_value", id="empty-model"),
        pytest.param(body(n=2), "n", "unsupported_parameter", id="n"),
        pytest.param(body(tools=[{"type": "function"}]), "tools[0].function", "invalid_value",
                     id="tool-without-function"),
        pytest.param(body(tools=[TOOL, TOOL]), "tools", "invalid_value", id="duplicate-tools"),
        pytest.param(body(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]),
                     "tools[0].function.parameters", "invalid_value", id="invalid-tool-schema"),
        pytest.param(body(tools=[{"type": "function", "function": {"name": "bad name"}}]), "tools[0].function.name",
                     "invalid_value", id="invalid-tool-name"),
        pytest.param(body(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "other"}}),
                     "tool_choice", "invalid_value", id="tool-choice-not-offered"),
        pytest.param(body(tool_choice="required"), "tool_choice", "invalid_value", id="required-without-tools"),
        pytest.param(body(tool_choice="sometimes"), "tool_choice", "invalid_value", id="unknown-tool-choice"),
        pytest.param(body(messages=[{"role": "user", "content": None}]), "messages[0].content", "invalid_value",
                     id="null-content-without-tool-calls"),
        pytest.param(body(messages=[{"role": "tool", "content": "42"}]), "messages[0].tool_call_id", "invalid_value",
                     id="tool-result-without-call-id"),
        pytest.param(body(messages=[{"role": "user", "content": "x", "tool_calls": [CALL]}]), "messages[0].tool_calls",
                     "invalid_value", id="tool-calls-on-a-user-message"),
        pytest.param(body(response_format={"type": "xml"}), "response_format.type", "invalid_value", id="format-type"),
        pytest.param(body(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 1}}}),
                     "response_format.json_schema.schema", "invalid_value", id="invalid-output-schema"),
        pytest.param(body(functions=[{"name": "f"}]), "functions", "unsupported_parameter", id="functions"),
        pytest.param(body(logprobs=True), "logprobs", "unsupported_parameter", id="logprobs"),
        pytest.param(body(stream_options={"include_usage": True}), "stream_options", "invalid_value",
                     id="stream-options-without-stream"),
    ],
)
def test_invalid_requests_name_the_param(raw: bytes, param: str | None, code: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        start_chat(raw, {})
    err = json.loads(caught.value.body())["error"]
    assert caught.value.status == 400
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert err["code"] == code
    assert err["message"]


def test_harmless_parameters_are_accepted() -> None:
    start_chat(body(user="x", seed=3, presence_penalty=0.5, frequency_penalty=0.1, n=1, store=False,
                    metadata={"k": "v"}, response_format={"type": "text"}, tool_choice="none"), {})


def test_unknown_model_fails_before_shimmy_when_the_list_is_known() -> None:
    with pytest.raises(ModelNotFound) as caught:
        start_chat(body(model="gpt-4"), {}, known_models={"phi3-lora"})
    assert caught.value.status == 404
    assert json.loads(caught.value.body())["error"]["code"] == "model_not_found"


# -- non-stream response ------------------------------------------------------------------------------


def state_for(**fields: object) -> Exchange:
    return start_chat(body(**fields), {})[1]


def test_complete_builds_a_chat_completion_with_exact_usage() -> None:
    state = state_for(max_tokens=10)
    doc = json.loads(state.complete(shimmy_stream("Hello", " world", "!\n")))
    assert doc["object"] == "chat.completion"
    assert doc["id"].startswith("chatcmpl-") and doc["model"] == "phi3-lora"
    assert doc["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "Hello world!\n", "refusal": None}, "logprobs": None,
         "finish_reason": "stop"}
    ]
    usage = doc["usage"]
    assert usage["completion_tokens"] == 3
    assert usage["total_tokens"] == usage["prompt_tokens"] + 3 and usage["prompt_tokens"] > 0


def test_finish_reason_length_at_max_tokens() -> None:
    doc = json.loads(state_for(max_tokens=2).complete(shimmy_stream("a", "b")))
    assert doc["choices"][0]["finish_reason"] == "length"
    assert doc["usage"]["completion_tokens"] == 2


def test_stop_sequence_cuts_the_text_and_the_count() -> None:
    doc = json.loads(state_for(stop="STOP", max_tokens=5).complete(shimmy_stream("one", " tw", "oST", "OP", " x")))
    assert doc["choices"][0]["message"]["content"] == "one two"
    assert doc["choices"][0]["finish_reason"] == "stop"
    assert doc["usage"]["completion_tokens"] == 4  # the token that completed the stop counts; later ones do not


def test_template_end_marker_is_a_stop_sequence() -> None:
    doc = json.loads(state_for().complete(shimmy_stream("Hi", "<|end|>", "junk")))
    assert doc["choices"][0]["message"]["content"] == "Hi"


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        pytest.param(shimmy_stream("a", "[ERROR] engine crashed", done=True), "generation_failed", id="error-event"),
        pytest.param(shimmy_stream("a", done=False), "upstream_truncated", id="no-done"),
    ],
)
def test_complete_turns_upstream_failures_into_502(wire: bytes, code: str) -> None:
    with pytest.raises(UpstreamError) as caught:
        state_for().complete(wire)
    assert caught.value.status == 502
    assert json.loads(caught.value.body())["error"]["code"] == code


# -- stream response ----------------------------------------------------------------------------------


def test_relay_emits_role_content_finish_usage_done() -> None:
    state = state_for(stream=True, stream_options={"include_usage": True}, max_tokens=3)
    wire = shimmy_stream("Hello", " world", "!")
    out = b"".join(state.relay(wire[i : i + 7], end=False) for i in range(0, len(wire), 7))
    out += state.relay(b"", end=True)
    chunks = events(out)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"]["content"] for c in chunks[1:4]] == ["Hello", " world", "!"]
    assert chunks[4]["choices"][0]["finish_reason"] == "length"
    assert chunks[5]["choices"] == [] and chunks[5]["usage"]["completion_tokens"] == 3
    assert {c["id"] for c in chunks} == {state.api.id} and {c["created"] for c in chunks} == {state.api.created}
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "phi3-lora" for c in chunks)


def test_relay_without_usage_has_no_usage_chunk() -> None:
    state = state_for(stream=True)
    chunks = events(state.relay(shimmy_stream("a"), end=False) + state.relay(b"", end=True))
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in c for c in chunks)


def test_relay_stop_across_tokens_ends_the_stream_and_drops_the_rest() -> None:
    state = state_for(stream=True, stop=["<END>"])
    out = state.relay(shimmy_stream("ab", "<E", "ND>", "tail", done=False), end=False)
    chunks = events(out)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "ab"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert state.relay(shimmy_stream("more"), end=True) == b""


def test_relay_error_event_becomes_in_band_error_then_done() -> None:
    state = state_for(stream=True)
    out = state.relay(shimmy_stream("a", "[ERROR] out of memory"), end=False)
    frames = [f for f in out.decode().split("\n\n") if f]
    assert frames[-1] == "data: [DONE]"
    err = json.loads(frames[-2].removeprefix("data: "))["error"]
    assert err["type"] == "server_error" and "out of memory" in err["message"]


def test_relay_stream_without_done_ends_with_in_band_error() -> None:
    state = state_for(stream=True)
    out = state.relay(shimmy_stream("a", done=False), end=False) + state.relay(b"", end=True)
    frames = [f for f in out.decode().split("\n\n") if f]
    assert json.loads(frames[-2].removeprefix("data: "))["error"]["code"] == "generation_failed"
    assert frames[-1] == "data: [DONE]"


def test_relay_empty_chunks_emit_nothing_but_the_role_once() -> None:
    state = state_for(stream=True)
    first = state.relay(b"data: par", end=False)
    assert events(first + b"data: [DONE]\n\n")[0]["choices"][0]["delta"]["role"] == "assistant"
    assert state.relay(b"", end=False) == b""


def test_errors_are_openai_shaped() -> None:
    err = json.loads(GatewayError("boom").body())
    assert err == {"error": {"message": "boom", "type": "server_error", "param": None, "code": "internal_error"}}


# -- stop matcher ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stops", "tokens", "emitted", "stopped"),
    [
        pytest.param(("END",), ["a", "b"], ["a", "b"], False, id="no-match"),
        pytest.param(("END",), ["aE", "N", "x"], ["a", "", "ENx"], False, id="partial-then-not"),
        pytest.param(("END",), ["aEN", "Dz"], ["a", ""], True, id="straddles"),
        pytest.param(("xy", "abc"), ["zab", "xy"], ["z", "ab"], True, id="earliest-wins"),
        pytest.param((), ["a"], ["a"], False, id="no-stops"),
    ],
)
def test_stop_matcher_holds_only_possible_prefixes(
    stops: tuple[str, ...], tokens: list[str], emitted: list[str], stopped: bool
) -> None:
    matcher = StopMatcher(stops)
    assert [matcher.feed(t) for t in tokens] == emitted
    assert matcher.stopped is stopped


@given(tokens=st.lists(st.text(alphabet="ab<|e>x", max_size=6), max_size=20),
       stops=st.lists(st.text(alphabet="ab<|e>", min_size=1, max_size=5), min_size=1, max_size=4))
def test_stop_matcher_equals_cutting_the_whole_text(tokens: list[str], stops: list[str]) -> None:
    """Token by token, the matcher emits exactly the whole text up to its earliest stop sequence."""
    text = "".join(tokens)
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    matcher = StopMatcher(tuple(stops))
    emitted = "".join(matcher.feed(t) for t in tokens) + matcher.flush()
    assert emitted == (text if cut < 0 else text[:cut])
    assert matcher.stopped is (cut >= 0)


def _naive_emitted(stops: list[str], fed: str) -> str:
    """The reference hold-back: all of `fed` but its longest suffix that is a proper prefix of a stop sequence."""
    keep = max((n for s in stops for n in range(1, len(s)) if fed.endswith(s[:n])), default=0)
    return fed[: len(fed) - keep]


@given(tokens=st.lists(st.text(alphabet="ab<|e>x", max_size=6), max_size=20),
       stops=st.lists(st.text(alphabet="ab<|e>", min_size=1, max_size=5), min_size=1, max_size=4))
def test_stop_matcher_releases_text_as_soon_as_it_cannot_start_a_stop(tokens: list[str], stops: list[str]) -> None:
    """After each token, what was emitted equals a naive recomputation over everything fed so far."""
    matcher = StopMatcher(tuple(stops))
    fed = emitted = ""
    for token in tokens:
        emitted += matcher.feed(token)
        fed += token
        if any(s in fed for s in stops):
            break  # from here the cut decides (the test above)
        assert emitted == _naive_emitted(stops, fed)


def test_stop_matcher_waits_for_a_longer_stop_that_started_earlier() -> None:
    matcher = StopMatcher(("bc", "abcd"))
    assert [matcher.feed(t) for t in "xabc"] == ["x", "", "", ""]  # "bc" matched, but "abcd" may still start at a
    assert not matcher.stopped
    assert matcher.feed("d") == "" and matcher.stopped
    early = StopMatcher(("bc", "abcd"))
    assert [early.feed(t) for t in "xabc"] + [early.flush()] == ["x", "", "", "", "a"]  # the end: "bc" cuts "xabc"
    assert early.stopped


# -- re-chunking ----------------------------------------------------------------------------------------

RECORDED = shimmy_stream("Hello", "!", " How", " can", " I", "\n", "help", " you", "?\n\n", "", " Bye")


@given(cuts=st.lists(st.integers(min_value=0, max_value=len(RECORDED)), max_size=30),
       stop=st.sampled_from([None, "can I", "u?", "\n\n", "zz"]))
def test_relay_is_invariant_under_rechunking(cuts: list[int], stop: str | None) -> None:
    """However Envoy splits Shimmy's bytes, the client gets the same text, count and finish."""
    def run(pieces: list[bytes]) -> tuple[str, int, str]:
        state = state_for(stream=True, stop=stop, stream_options={"include_usage": True})
        out = b"".join(state.relay(p, end=False) for p in pieces) + state.relay(b"", end=True)
        chunks = events(out)
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        finish = next(c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and
                      c["choices"][0]["finish_reason"])
        return text, chunks[-1]["usage"]["completion_tokens"], finish

    bounds = sorted({0, *cuts, len(RECORDED)})
    pieces = [RECORDED[a:b] for a, b in itertools.pairwise(bounds)]
    assert run(pieces) == run([RECORDED])


def test_stream_past_the_deadline_ends_in_band() -> None:
    state = start_chat(body(stream=True), {}, timeout=-1)[1]
    frames = [f for f in state.relay(shimmy_stream("a", done=False), end=False).decode().split("\n\n") if f]
    assert json.loads(frames[-2].removeprefix("data: "))["error"]["code"] == "timeout"
    assert frames[-1] == "data: [DONE]"
    assert state.relay(shimmy_stream("b"), end=True) == b""


def test_a_maximal_stop_set_is_accepted_on_chat_and_messages() -> None:
    from extproc.apis.messages import Messages
    from extproc.stops import MAX_STOP_CHARACTERS, MAX_STOP_LENGTH, MAX_STOP_SEQUENCES

    stops = [f"{i:x}" * (MAX_STOP_CHARACTERS // MAX_STOP_SEQUENCES) for i in range(MAX_STOP_SEQUENCES)]
    assert sum(map(len, stops)) == MAX_STOP_CHARACTERS and max(map(len, stops)) <= MAX_STOP_LENGTH
    start_chat(body(stop=stops), {})
    request, _ = Messages.parse(json.dumps({"model": "m", "max_tokens": 3, "stop_sequences": stops,
                                            "messages": [{"role": "user", "content": "x"}]}).encode())
    assert request.stops == tuple(stops)
