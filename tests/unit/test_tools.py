"""Tools and structured output: the prompt conventions per family, reading calls back, and the stream's hold-back."""

from __future__ import annotations

import json

import pytest

from extproc.apis.messages import Messages
from extproc.apis.responses import Responses
from extproc.generation import Message
from extproc.templates import TEMPLATES
from extproc.tools import CallDetector, OutputError, Tool, ToolCall, Tooling, parse_output, to_turns
from tests.unit.translate import start_api, start_chat

WEATHER = Tool(
    "get_weather",
    "The weather in a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
TIME = Tool("get_time", "The time", {"type": "object", "properties": {}})
TOOLS = Tooling(tools=(WEATHER, TIME))
CALL = ToolCall("call_1", "get_weather", '{"city": "Paris"}')


# -- into the prompt ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", TEMPLATES)
def test_offered_tools_open_the_system_turn(family: str) -> None:
    turns = to_turns(family, [Message("system", "Be brief"), Message("user", "Weather?")], TOOLS)
    role, text = turns[0]
    assert role == "system" and text.startswith("Be brief\n\n")
    assert '"name": "get_weather"' in text and '"name": "get_time"' in text
    assert turns[1] == ("user", "Weather?")


def test_without_a_system_turn_the_instructions_become_one() -> None:
    turns = to_turns("chatml", [Message("user", "Weather?")], TOOLS)
    assert [role for role, _ in turns] == ["system", "user"]
    assert "<tools>" in turns[0][1] and "<tool_call>" in turns[0][1]


@pytest.mark.parametrize("family", TEMPLATES)
def test_tool_choice_none_renders_no_tools(family: str) -> None:
    messages = [Message("user", "Weather?")]
    assert to_turns(family, messages, Tooling(tools=(WEATHER,), choice="none")) == [("user", "Weather?")]


def test_a_named_choice_shows_only_that_tool_and_demands_it() -> None:
    text = to_turns("llama3", [Message("user", "x")], Tooling(tools=(WEATHER, TIME), choice="get_time"))[0][1]
    assert '"get_time"' in text and "get_weather" not in text
    assert 'You must call the function "get_time"' in text


def test_required_and_no_parallel_are_said() -> None:
    text = to_turns("gemma", [Message("user", "x")], Tooling(tools=(WEATHER,), choice="required", parallel=False))[0][1]
    assert "You must call at least one" in text and "at most one" in text


@pytest.mark.parametrize(
    ("family", "call", "result"),
    [
        ("chatml", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
         ("tool", "<tool_response>\n18C\n</tool_response>")),
        ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}', ("tool", "18C")),
        ("phi3", '{"name": "get_weather", "arguments": {"city": "Paris"}}',
         ("tool", "<tool_response>\n18C\n</tool_response>")),
        ("gemma", '{"name": "get_weather", "arguments": {"city": "Paris"}}',
         ("tool", "<tool_response>\n18C\n</tool_response>")),
    ],
)
def test_history_calls_and_results_in_the_family_convention(family: str, call: str, result: tuple[str, str]) -> None:
    history = [Message("user", "Weather?"), Message("assistant", "", (CALL,)), Message("tool", "18C")]
    turns = to_turns(family, history, Tooling(tools=(WEATHER,), choice="none"))
    assert turns == [("user", "Weather?"), ("assistant", call), result]


def test_several_history_calls_are_a_list_outside_chatml() -> None:
    two = (CALL, ToolCall("call_2", "get_time", "{}"))
    assert to_turns("phi3", [Message("assistant", "Checking.", two)], Tooling())[0] == (
        "assistant",
        'Checking.\n[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]',
    )


def test_a_schema_is_asked_for_in_the_prompt() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    text = to_turns("chatml", [Message("user", "x")], Tooling(schema=schema))[0][1]
    assert "JSON object that conforms to this JSON schema" in text and '"integer"' in text


# -- out of the output -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "output",
    [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        '{"name": "get_weather", "arguments": {"city": "Paris"}}',
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
        '[{"name": "get_weather", "arguments": {"city": "Paris"}}]',
        '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```',
        '{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}',  # the closing tag stopped short
    ],
)
def test_every_accepted_form_reads_as_the_same_call(output: str) -> None:
    parsed = parse_output(output, TOOLS)
    assert parsed.text == ""
    [call] = parsed.calls
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})
    assert call.id.startswith("call_") and len(call.id) > 10


def test_calls_get_fresh_ids_and_prose_stays_content() -> None:
    output = 'Let me check.\n```json\n[{"name": "get_weather", "arguments": {"city": "Oslo"}}, ' \
             '{"name": "get_time", "arguments": {}}]\n```'
    parsed = parse_output(output, TOOLS)
    assert parsed.text == "Let me check."
    assert [c.name for c in parsed.calls] == ["get_weather", "get_time"]
    assert len({c.id for c in parsed.calls}) == 2


@pytest.mark.parametrize(
    ("output", "tooling", "code", "words"),
    [
        ('{"name": "launch", "arguments": {}}', TOOLS, "invalid_tool_call", "not offered"),
        ('{"name": "get_weather", "arguments": {"town": "Paris"}}', TOOLS, "invalid_tool_call", "'city' is a required"),
        ('{"name": "get_weather", "arguments": [1]}', TOOLS, "invalid_tool_call", "not a JSON object"),
        ('{"name": "get_weather", "arguments": {"city": "Par', TOOLS, "invalid_tool_call", "not valid JSON"),
        ("<tool_call>{oops}</tool_call>", TOOLS, "invalid_tool_call", "not valid JSON"),
        ("It is sunny.", Tooling(tools=(WEATHER,), choice="required"), "missing_tool_call", "a tool call"),
        ('{"name": "get_time", "arguments": {}}', Tooling(tools=(WEATHER, TIME), choice="get_weather"),
         "invalid_tool_call", "not offered"),
        ('[{"name": "get_time", "arguments": {}}, {"name": "get_time", "arguments": {}}]',
         Tooling(tools=(TIME,), parallel=False), "invalid_tool_call", "parallel_tool_calls"),
        ("Sure! Here it is", Tooling(schema={}), "invalid_json_output", "not a JSON object"),
        ('{"n": "five"}', Tooling(schema={"type": "object", "properties": {"n": {"type": "integer"}}}),
         "invalid_json_output", "'five' is not of type 'integer'"),
    ],
)
def test_what_the_request_demands_is_never_passed_off(output: str, tooling: Tooling, code: str, words: str) -> None:
    with pytest.raises(OutputError) as caught:
        parse_output(output, tooling)
    assert caught.value.status == 502 and caught.value.code == code
    assert words in caught.value.message


def test_auto_lets_a_plain_answer_through() -> None:
    assert parse_output("It is sunny in <b>Paris</b>.", TOOLS).calls == ()
    assert parse_output("<b>Sunny</b>", TOOLS).text == "<b>Sunny</b>"


def test_a_valid_structured_answer_is_normalised_json() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    assert parse_output('```json\n{"n": 5}\n```', Tooling(schema=schema)).text == '{"n":5}'
    assert parse_output(' {"anything": [1]} ', Tooling(schema={})).text == '{"anything":[1]}'


def test_tools_and_a_schema_together_take_a_call_or_valid_json() -> None:
    both = Tooling(tools=(WEATHER,), schema={"type": "object", "required": ["answer"]})
    assert parse_output('{"name": "get_weather", "arguments": {"city": "Rome"}}', both).calls
    assert parse_output('{"answer": 1}', both).text == '{"answer":1}'


# -- streams -------------------------------------------------------------------------------------------------------


def feed_all(detector: CallDetector, pieces: list[str]) -> tuple[str, str]:
    released = "".join(detector.feed(p) for p in pieces)
    return released, detector.finish()


def test_prose_streams_and_a_call_is_held_whole() -> None:
    pieces = ["Let", " me", " check", ". <tool", "_call>\n{", '"name": "get_time"', ', "arguments": {}}']
    pieces.append("</tool_call>")
    released, held = feed_all(CallDetector(TOOLS), pieces)
    assert released == "Let me check. "
    assert held == '<tool_call>\n{"name": "get_time", "arguments": {}}</tool_call>'


def test_an_answer_that_opens_like_json_is_held() -> None:
    released, held = feed_all(CallDetector(TOOLS), ["  ", '{"name"', ': "get_time", "arguments": {}}'])
    assert released == "" and held == '  {"name": "get_time", "arguments": {}}'


def test_text_that_only_looked_like_an_opener_is_released() -> None:
    released, held = feed_all(CallDetector(TOOLS), ["Use ", "<to", "ol> tags"])
    assert released == "Use <tool> tags" and held == ""


def test_a_structured_answer_is_held_whole() -> None:
    released, held = feed_all(CallDetector(Tooling(schema={})), ["Sure", "!"])
    assert released == "" and held == "Sure!"


# -- through the chat adapter --------------------------------------------------------------------------------------

OFFER = [{"type": "function", "function": {"name": "get_weather", "parameters": dict(WEATHER.parameters)}}]
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def chat(**fields: object) -> bytes:
    base: dict[str, object] = {"model": "qwen", "messages": [{"role": "user", "content": "Weather in Paris?"}]}
    return json.dumps({**base, **fields}).encode()


def wire(*tokens: str) -> bytes:
    return "".join(f"data: {line}\n\n" for t in tokens for line in t.split("\n")).encode() + b"data: [DONE]\n\n"


def test_a_chat_answer_carries_the_calls() -> None:
    _, exchange = start_chat(chat(tools=OFFER), {})
    doc = json.loads(exchange.complete(wire(*CALL_TEXT.split(" "))))
    [choice] = doc["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}


def test_a_history_with_calls_is_accepted_and_rendered() -> None:
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
        ]},
        {"role": "tool", "tool_call_id": "call_9", "content": "18C"},
    ]
    shimmy, _ = start_chat(chat(messages=history, tools=OFFER), {})
    prompt = json.loads(shimmy)["prompt"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city":"Paris"}}\n</tool_call><|im_end|>' in prompt
    assert "<|im_start|>tool\n<tool_response>\n18C\n</tool_response><|im_end|>" in prompt


def test_a_chat_stream_sends_prose_then_call_deltas() -> None:
    _, exchange = start_chat(chat(tools=OFFER, stream=True), {})
    out = exchange.relay(wire("Checking", ".", " ", *CALL_TEXT.split(" ")), end=True)
    chunks = [json.loads(e.removeprefix("data: ")) for e in out.decode().split("\n\n") if e and e != "data: [DONE]"]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("content") or "" for d in deltas) == "Checking. "
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0]["id"].startswith("call_") and calls[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == {"city": "Paris"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert not any("<tool_call>" in (d.get("content") or "") for d in deltas)


def test_a_stream_whose_required_call_never_came_ends_with_an_error() -> None:
    _, exchange = start_chat(chat(tools=OFFER, tool_choice="required", stream=True), {})
    out = exchange.relay(wire("It", " is", " sunny"), end=True).decode()
    assert '"code":"missing_tool_call"' in out and out.endswith("data: [DONE]\n\n")
    assert exchange.failure == "missing_tool_call"


def test_structured_output_through_the_chat_adapter() -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object", "required": ["n"]}}}
    _, exchange = start_chat(chat(response_format=fmt), {})
    assert json.loads(json.loads(exchange.complete(wire('{"n":', " 3}")))["choices"][0]["message"]["content"]) == {
        "n": 3
    }
    _, exchange = start_chat(chat(response_format=fmt), {})
    with pytest.raises(OutputError):
        exchange.complete(wire('{"m":', " 3}"))


def test_a_bare_call_after_prose_is_read() -> None:
    parsed = parse_output('Sure! {"name": "get_time", "arguments": {}} Done.', TOOLS)
    assert parsed.text == "Sure!  Done." and [c.name for c in parsed.calls] == ["get_time"]
    released, held = feed_all(CallDetector(TOOLS), ["Sure", '! {"na', 'me": "get_time", "arguments": {}}'])
    assert released == "Sure! " and held.startswith('{"name"')


# -- through the Messages and Responses adapters -------------------------------------------------------------------


def sse(out: bytes) -> list[tuple[str, dict]]:
    """(event, data) pairs of a typed event stream."""
    events = []
    for block in out.decode().split("\n\n"):
        if block:
            kind, data = block.split("\n", 1)
            events.append((kind.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return events


ANTHROPIC_TOOL = {"name": "get_weather", "description": "Weather", "input_schema": dict(WEATHER.parameters)}


def anthropic(**fields: object) -> bytes:
    base = {"model": "qwen", "max_tokens": 64, "messages": [{"role": "user", "content": "Weather in Paris?"}]}
    return json.dumps({**base, "tools": [ANTHROPIC_TOOL], **fields}).encode()


def test_a_message_answers_with_tool_use_blocks() -> None:
    _, exchange = start_api(Messages, anthropic())
    doc = json.loads(exchange.complete(wire(CALL_TEXT)))
    assert doc["stop_reason"] == "tool_use"
    [block] = doc["content"]
    assert block["type"] == "tool_use" and block["id"].startswith("toolu_")
    assert (block["name"], block["input"]) == ("get_weather", {"city": "Paris"})


def test_a_messages_history_with_tool_use_and_results_is_rendered() -> None:
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                                          {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                                     {"type": "text", "text": "And tomorrow?"}]},
    ]
    shimmy, _ = start_api(Messages, anthropic(messages=history, tool_choice={"type": "any"}))
    prompt = json.loads(shimmy)["prompt"]
    assert 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city":"Paris"}}\n</tool_call>' in prompt
    result = "<|im_start|>tool\n<tool_response>\n18C\n</tool_response><|im_end|>\n"
    assert result + "<|im_start|>user\nAnd tomorrow?" in prompt
    assert "You must call at least one" in prompt


def test_a_message_stream_sends_input_json_deltas_in_their_own_block() -> None:
    _, exchange = start_api(Messages, anthropic(stream=True))
    events = sse(exchange.relay(wire("Let", " me", " see.", " ", CALL_TEXT), end=True))
    kinds = [kind for kind, _ in events]
    assert kinds == ["message_start", "content_block_start", "ping", "content_block_delta", "content_block_delta",
                     "content_block_delta", "content_block_delta", "content_block_stop", "content_block_start",
                     "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    start, delta = events[8][1], events[9][1]
    assert start["index"] == 1 and start["content_block"]["type"] == "tool_use"
    assert start["content_block"]["input"] == {}
    assert delta["delta"]["type"] == "input_json_delta" and json.loads(delta["delta"]["partial_json"]) == {
        "city": "Paris"
    }
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


RESPONSES_TOOL = {"type": "function", "name": "get_weather", "parameters": dict(WEATHER.parameters)}


def responses(**fields: object) -> bytes:
    return json.dumps({"model": "qwen", "input": "Weather in Paris?", "tools": [RESPONSES_TOOL], **fields}).encode()


def test_a_response_carries_function_call_items() -> None:
    _, exchange = start_api(Responses, responses())
    doc = json.loads(exchange.complete(wire(CALL_TEXT)))
    assert doc["status"] == "completed"
    [item] = doc["output"]
    assert item["type"] == "function_call" and item["call_id"].startswith("call_") and item["id"].startswith("fc_")
    assert (item["name"], json.loads(item["arguments"])) == ("get_weather", {"city": "Paris"})
    assert doc["tools"][0]["name"] == "get_weather" and doc["tool_choice"] == "auto"


def test_responses_input_with_calls_and_outputs_is_rendered() -> None:
    items = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city":"Rome"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "18C"},
        {"type": "function_call_output", "call_id": "c2", "output": "25C"},
    ]
    shimmy, _ = start_api(Responses, responses(input=items))
    prompt = json.loads(shimmy)["prompt"]
    assert prompt.count('<tool_call>\n{"name": "get_weather"') == 2  # the two calls of one assistant turn
    assert "<tool_response>\n18C\n</tool_response>" in prompt and "<tool_response>\n25C\n</tool_response>" in prompt


def test_a_response_stream_sends_function_call_argument_events() -> None:
    _, exchange = start_api(Responses, responses(stream=True))
    events = sse(exchange.relay(wire(CALL_TEXT), end=True))
    kinds = [kind for kind, _ in events]
    assert kinds[-5:] == ["response.output_item.added", "response.function_call_arguments.delta",
                          "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    assert json.loads(events[-4][1]["delta"]) == {"city": "Paris"}
    final = events[-1][1]["response"]
    assert [item["type"] for item in final["output"]] == ["function_call"]  # no empty message item (issue 24)
    assert [data["item"]["type"] for kind, data in events if kind == "response.output_item.added"] == [
        "function_call"]


def test_a_response_in_a_json_schema_format() -> None:
    fmt = {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object", "required": ["n"]}}}
    _, exchange = start_api(Responses, responses(tools=None, text=fmt))
    doc = json.loads(exchange.complete(wire('{"n": 2}')))
    assert json.loads(doc["output"][0]["content"][0]["text"]) == {"n": 2}
