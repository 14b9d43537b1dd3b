"""The Anthropic Messages adapter on the generation core: parsing, rendering, the event stream, errors."""

from __future__ import annotations

import json

import pytest

from extproc.apis.messages import Messages, MessagesCountTokens, error_type
from extproc.errors import GatewayError, InvalidRequest, ModelNotFound, Timeout, UpstreamError
from extproc.generation import count_prompt
from tests.unit.translate import shimmy_stream, start_api

TOKENS = ("The", " quick", " brown", " fox")


def body(**fields: object) -> bytes:
    return json.dumps({"model": "phi3-lora", "max_tokens": 16, "messages": [{"role": "user", "content": "Hi"}],
                       **fields}).encode()


def named_events(sse: bytes) -> list[tuple[str, dict]]:
    out = []
    for block in filter(None, sse.decode().split("\n\n")):
        event, data = block.split("\n")
        out.append((event.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


def test_system_blocks_and_messages_render_with_the_template() -> None:
    shimmy, _ = start_api(Messages, body(system=[{"type": "text", "text": "Be "}, {"type": "text", "text": "brief"}],
                                         temperature=0.2, top_p=0.5, top_k=4, stop_sequences=["x"]))
    sent = json.loads(shimmy)
    assert sent["prompt"] == "<|system|>\nBe brief<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    assert (sent["max_tokens"], sent["temperature"], sent["top_p"], sent["top_k"]) == (16, 0.2, 0.5, 4)


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}]}).encode(), "max_tokens"),
        (body(max_tokens=0), "max_tokens"),
        (body(temperature=1.5), "temperature"),
        (body(messages=[{"role": "tool", "content": "x"}]), "messages[0].role"),
        (body(messages=[{"role": "user", "content": [{"type": "image", "source": {}}]}]),
         "messages[0].content[0].type"),
        (body(stop_sequences=["s"] * 17), "stop_sequences"),
        (body(tools=[{"name": "t"}]), "tools[0].input_schema"),
        (body(tools=[{"name": "t", "type": "web_search_20250305", "input_schema": {}}]), "tools[0].type"),
        (body(tools=[{"name": "t", "input_schema": {"type": 3}}]), "tools[0].input_schema"),
        (body(tool_choice={"type": "any"}), "tool_choice"),
        (body(tools=[{"name": "t", "input_schema": {}}], tool_choice={"type": "tool", "name": "u"}), "tool_choice"),
        (body(thinking={"type": "enabled", "budget_tokens": 1}), "thinking"),
        (body(output_config={"format": {"type": "json_schema"}}), "output_config.format.schema"),
        (body(output_config={"format": {"type": "json_schema", "schema": {"type": 3}}}), "output_config.format.schema"),
        (body(output_config={"format": {"type": "xml"}}), "output_config.format.type"),
    ],
)
def test_refusals_name_the_param_in_anthropics_shape(raw: bytes, param: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        Messages.parse(raw)
    error = json.loads(Messages.error_body(refused.value))
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert error["error"]["message"].startswith(f"{param}:")


def test_accepted_without_effect() -> None:
    request, _ = Messages.parse(body(metadata={"user_id": "u"}, service_tier="auto", thinking={"type": "disabled"},
                                     output_config={"effort": "low"}, tool_choice={"type": "auto"}))
    assert request.max_tokens == 16


@pytest.mark.parametrize(
    ("exc", "status", "type_"),
    [
        (InvalidRequest("x"), 400, "invalid_request_error"),
        (ModelNotFound("m"), 404, "not_found_error"),
        (UpstreamError("x"), 502, "api_error"),
        (Timeout("x"), 504, "timeout_error"),
        (GatewayError("x"), 500, "api_error"),
    ],
)
def test_error_types_follow_the_status(exc: GatewayError, status: int, type_: str) -> None:
    assert exc.status == status and error_type(status) == type_
    assert json.loads(Messages.error_body(exc))["error"]["type"] == type_


def test_render_end_turn_with_usage() -> None:
    _, exchange = start_api(Messages, body())
    message = json.loads(exchange.complete(shimmy_stream(*TOKENS)))
    assert message["content"] == [{"type": "text", "text": "The quick brown fox"}]
    assert (message["type"], message["role"], message["model"]) == ("message", "assistant", "phi3-lora")
    assert (message["stop_reason"], message["stop_sequence"]) == ("end_turn", None)
    assert message["usage"] == {"input_tokens": exchange.gen.prompt_tokens, "output_tokens": 4}
    assert message["id"].startswith("msg_")


def test_render_max_tokens_and_stop_sequence() -> None:
    _, cut = start_api(Messages, body(max_tokens=2))
    assert json.loads(cut.complete(shimmy_stream("The", " quick")))["stop_reason"] == "max_tokens"
    _, stopped = start_api(Messages, body(stop_sequences=["row", "zzz"]))
    message = json.loads(stopped.complete(shimmy_stream(*TOKENS)))
    assert (message["stop_reason"], message["stop_sequence"]) == ("stop_sequence", "row")
    assert message["content"][0]["text"] == "The quick b" and message["usage"]["output_tokens"] == 3


def test_template_end_marker_is_end_turn_not_stop_sequence() -> None:
    _, exchange = start_api(Messages, body())
    message = json.loads(exchange.complete(shimmy_stream("Hi", "<|end|>", "junk")))
    assert (message["content"][0]["text"], message["stop_reason"], message["stop_sequence"]) == ("Hi", "end_turn", None)


def test_stream_sends_the_exact_event_sequence() -> None:
    _, exchange = start_api(Messages, body(stream=True, stop_sequences=["fox"]))
    out = exchange.relay(shimmy_stream("The", " quick", done=False), False)
    out += exchange.relay(shimmy_stream(" brown", " fox", " jumps"), True)
    events = named_events(out)
    assert [name for name, _ in events] == [
        "message_start", "content_block_start", "ping", "content_block_delta", "content_block_delta",
        "content_block_delta", "content_block_delta", "content_block_stop", "message_delta", "message_stop",
    ]
    assert all(data["type"] == name for name, data in events)
    texts = ("The", " quick", " brown", " ")  # the text before the stop sequence, and nothing after it
    assert [d["delta"] for _, d in events[3:7]] == [{"type": "text_delta", "text": t} for t in texts]
    assert events[8][1] == {"type": "message_delta", "delta": {"stop_reason": "stop_sequence", "stop_sequence": "fox"},
                            "usage": {"output_tokens": 4}}
    assert exchange.finished and exchange.relay(b"data: more\n\n", True) == b""


def test_stream_failure_is_an_error_event() -> None:
    _, exchange = start_api(Messages, body(stream=True))
    events = named_events(exchange.relay(b"data: The\n\ndata: [ERROR] out of memory\n\n", True))
    assert [name for name, _ in events][-2:] == ["content_block_delta", "error"]
    assert events[-1][1] == {"type": "error", "error": {"type": "api_error", "message":
                             "Shimmy failed during generation: out of memory"}}
    assert exchange.failure == "generation_failed"


def test_count_tokens_counts_what_a_generation_would() -> None:
    request = MessagesCountTokens.parse(body(system="Be brief"))
    generation, _ = Messages.parse(body(system="Be brief"))
    _, exchange = start_api(Messages, body(system="Be brief"))
    assert count_prompt(request, {}) == count_prompt(generation, {}) == exchange.gen.prompt_tokens
    assert MessagesCountTokens.render(12) == b'{"input_tokens":12}'
    with pytest.raises(ModelNotFound):
        count_prompt(request, {}, known_models={"other"})
    with pytest.raises(InvalidRequest):  # max_tokens is not required here, but tools are still refused
        MessagesCountTokens.parse(json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                              "tools": [{"name": "t"}]}).encode())


WEATHER = {"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'


def test_a_stream_of_only_a_tool_call_has_no_empty_text_block() -> None:
    _, exchange = start_api(Messages, body(stream=True, tools=[WEATHER]))
    events = named_events(exchange.relay(shimmy_stream(CALL), True))
    assert [name for name, _ in events] == [
        "message_start", "content_block_start", "ping", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop",
    ]
    assert events[1][1]["index"] == 0 and events[1][1]["content_block"]["type"] == "tool_use"
    _, whole = start_api(Messages, body(tools=[WEATHER]))
    assert [b["type"] for b in json.loads(whole.complete(shimmy_stream(CALL)))["content"]] == ["tool_use"]


def test_a_stream_of_text_then_a_call_numbers_the_blocks() -> None:
    _, exchange = start_api(Messages, body(stream=True, tools=[WEATHER]))
    events = named_events(exchange.relay(shimmy_stream("Sure. ", CALL), True))
    starts = [(d["index"], d["content_block"]["type"]) for name, d in events if name == "content_block_start"]
    assert starts == [(0, "text"), (1, "tool_use")]
    assert [d["index"] for name, d in events if name == "content_block_stop"] == [0, 1]


SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "celsius": {"type": "integer"}},
          "required": ["city", "celsius"], "additionalProperties": False}


def test_output_config_format_is_chats_structured_output() -> None:
    """The schema reaches the prompt and the answer is validated against it, as chat's response_format does."""
    fields = {"output_config": {"format": {"type": "json_schema", "schema": SCHEMA}}}
    shimmy, exchange = start_api(Messages, body(**fields))
    assert "Respond only with a JSON object that conforms to this JSON schema" in json.loads(shimmy)["prompt"]
    message = json.loads(exchange.complete(shimmy_stream('{"city": "Paris", ', '"celsius": 18}')))
    assert message["content"] == [{"type": "text", "text": '{"city":"Paris","celsius":18}'}]
    assert message["stop_reason"] == "end_turn"
    _, streamed = start_api(Messages, body(stream=True, **fields))
    events = named_events(streamed.relay(shimmy_stream('{"city": "Paris", "celsius": 18}'), True))
    assert [d["delta"]["text"] for name, d in events if name == "content_block_delta"] == [
        '{"city":"Paris","celsius":18}']
    _, wrong = start_api(Messages, body(**fields))
    with pytest.raises(UpstreamError) as failed:
        wrong.complete(shimmy_stream('{"city": "Paris"}'))
    assert failed.value.code == "invalid_json_output"
