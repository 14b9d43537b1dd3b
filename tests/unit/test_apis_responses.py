"""The OpenAI Responses adapter on the generation core: parsing, the response object, the typed event stream."""

from __future__ import annotations

import json

import pytest

from extproc.apis.responses import SUMMARY_MAX_TOKENS, SUMMARY_REQUEST, Responses, ResponsesCompact
from extproc.errors import InvalidRequest, UpstreamError
from extproc.generation import Message
from tests.open_responses import check_event, check_response
from tests.unit.translate import shimmy_stream, start_api

TOKENS = ("The", " quick", " brown", " fox")


def body(**fields: object) -> bytes:
    return json.dumps({"model": "phi3-lora", "input": "Hi", **fields}).encode()


def typed(sse: bytes) -> list[dict]:
    """The events, each checked against the Open Responses specification."""
    out = []
    for block in filter(None, sse.decode().split("\n\n")):
        event, data = block.split("\n")
        payload = json.loads(data.removeprefix("data: "))
        assert payload["type"] == event.removeprefix("event: ")
        check_event(payload)
        out.append(payload)
    return out


def whole(raw: bytes) -> dict:
    """A non-stream answer, checked against the Open Responses specification."""
    response = json.loads(raw)
    check_response(response)
    return response


def test_instructions_and_input_items_render_with_the_template() -> None:
    shimmy, _ = start_api(Responses, body(instructions="Be brief", max_output_tokens=9, temperature=0.3, top_p=0.4,
                                          input=[{"role": "user", "content": "Hi"},
                                                 {"type": "message", "role": "assistant", "id": "msg_1",
                                                  "status": "completed",
                                                  "content": [{"type": "output_text", "text": "Yo",
                                                               "annotations": []}]}]))
    sent = json.loads(shimmy)
    assert sent["prompt"] == ("<|system|>\nBe brief<|end|>\n<|user|>\nHi<|end|>\n"
                              "<|assistant|>\nYo<|end|>\n<|assistant|>\n")
    assert (sent["max_tokens"], sent["temperature"], sent["top_p"]) == (9, 0.3, 0.4)


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (body(previous_response_id="resp_1"), "previous_response_id"),
        (body(conversation="conv_1"), "conversation"),
        (body(tools=[{"type": "web_search"}]), "tools[0].type"),
        (body(tools=[{"type": "function", "name": "f", "parameters": {"type": 7}}]), "tools[0].parameters"),
        (body(tools=[{"type": "function", "name": "f"}], tool_choice={"type": "function", "name": "g"}),
         "tool_choice"),
        (body(input=[{"type": "function_call", "name": "f", "arguments": "{}"}]), "input[0].call_id"),
        (body(input=[{"type": "function_call_output", "call_id": "c"}]), "input[0].output"),
        (body(text={"format": {"type": "json_schema", "name": "n", "schema": {"type": 1}}}), "text.format.schema"),
        (body(tool_choice="required"), "tool_choice"),
        (body(max_output_tokens=0), "max_output_tokens"),
        (body(input=""), "input"),
        (body(input=[{"type": "reasoning", "summary": []}]), "input[0].type"),
        (body(text={"format": {"type": "json_schema"}}), "text.format"),
        (body(stop=["x"], top_logprobs=2), "top_logprobs"),
        (body(input=[{"role": "user", "content": "x"}, {"type": "item_reference", "id": "msg_1"}]), "input[1]"),
    ],
)
def test_refusals_name_the_param(raw: bytes, param: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        Responses.parse(raw)
    assert json.loads(refused.value.body())["error"]["param"] == param


@pytest.mark.parametrize("fields", [{"previous_response_id": "resp_1"},
                                    {"input": [{"type": "item_reference", "id": "msg_1"}]}])
def test_stateless_refusal_says_why(fields: dict) -> None:
    with pytest.raises(InvalidRequest) as refused:
        Responses.parse(body(**fields))
    assert "share no state" in refused.value.message


def test_accepted_without_effect() -> None:
    request, _ = Responses.parse(body(store=True, metadata={"k": "v"}, reasoning={"effort": "low"}, truncation="auto",
                                      include=["reasoning.encrypted_content"], parallel_tool_calls=False,
                                      tool_choice="auto", text={"format": {"type": "text"}}, user="u"))
    assert request.messages == [Message("user", "Hi")]


def test_render_completed_with_usage_and_nothing_stored() -> None:
    _, exchange = start_api(Responses, body(store=True, metadata={"k": "v"}))
    response = whole(exchange.complete(shimmy_stream(*TOKENS)))
    assert (response["object"], response["status"], response["store"]) == ("response", "completed", False)
    assert response["output"][0]["content"][0] == {"type": "output_text", "text": "The quick brown fox",
                                                   "annotations": [], "logprobs": []}
    assert response["output"][0]["status"] == "completed" and response["metadata"] == {"k": "v"}
    usage = response["usage"]
    assert (usage["input_tokens"], usage["output_tokens"]) == (exchange.gen.prompt_tokens, 4)
    assert usage["total_tokens"] == usage["input_tokens"] + 4


def test_render_at_the_limit_is_incomplete() -> None:
    _, exchange = start_api(Responses, body(max_output_tokens=2))
    response = whole(exchange.complete(shimmy_stream("The", " quick")))
    assert response["status"] == "incomplete" and response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["output"][0]["status"] == "incomplete"


def test_stream_sends_typed_events_in_order_with_sequence_numbers() -> None:
    _, exchange = start_api(Responses, body(stream=True))
    out = exchange.relay(shimmy_stream("The", " quick", done=False), False)
    out += exchange.relay(shimmy_stream(" brown"), True)
    events = typed(out)
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    item_id = events[2]["item"]["id"]
    assert {e["item_id"] for e in events if "item_id" in e} == {item_id}
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["usage"] is None
    assert events[7]["text"] == events[8]["part"]["text"] == "The quick brown"
    final = events[-1]["response"]
    assert final["output"][0]["id"] == item_id and final["usage"]["output_tokens"] == 3


def test_stream_failure_is_response_failed() -> None:
    _, exchange = start_api(Responses, body(stream=True))
    events = typed(exchange.relay(b"data: The\n\n", True))  # cut short: no [DONE]
    assert [e["type"] for e in events][-2:] == ["response.output_text.delta", "response.failed"]
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "generation_failed"
    assert failed["output"][0]["content"][0]["text"] == "The"


TOOL = {"type": "function", "name": "get_weather", "parameters": {"type": "object",
                                                                  "properties": {"city": {"type": "string"}}}}
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'


def test_every_field_the_specification_requires_in_each_ending() -> None:
    fields = dict(instructions="x", temperature=0.2, safety_identifier="s", prompt_cache_key="k", tools=[TOOL],
                  text={"format": {"type": "json_schema", "name": "n", "schema": {"type": "object"}}})
    _, exchange = start_api(Responses, body(**fields))
    done = whole(exchange.complete(shimmy_stream('{"a": 1}')))
    assert done["completed_at"] >= done["created_at"] and (done["safety_identifier"], done["prompt_cache_key"]) == (
        "s", "k")
    _, cut = start_api(Responses, body(max_output_tokens=1))
    assert whole(cut.complete(shimmy_stream("The", " quick")))["completed_at"] is None


def test_a_stream_of_only_a_function_call_has_no_message_item() -> None:
    _, exchange = start_api(Responses, body(stream=True, tools=[TOOL]))
    events = typed(exchange.relay(shimmy_stream(CALL), True))
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed",
    ]
    assert events[2]["output_index"] == 0 and events[2]["item"]["type"] == "function_call"
    assert [item["type"] for item in events[-1]["response"]["output"]] == ["function_call"]
    _, exchange = start_api(Responses, body(tools=[TOOL]))
    assert [item["type"] for item in whole(exchange.complete(shimmy_stream(CALL)))["output"]] == ["function_call"]


def test_a_stream_of_text_then_a_call_and_an_empty_answer() -> None:
    _, exchange = start_api(Responses, body(stream=True, tools=[TOOL]))
    events = typed(exchange.relay(shimmy_stream("Sure. ", CALL), True))
    added = [(e["output_index"], e["item"]["type"]) for e in events if e["type"] == "response.output_item.added"]
    assert added == [(0, "message"), (1, "function_call")]
    _, empty = start_api(Responses, body(stream=True))
    events = typed(empty.relay(shimmy_stream(), True))
    assert [item["content"][0]["text"] for item in events[-1]["response"]["output"]] == [""]


def compact(**fields: object) -> bytes:
    return json.dumps({"model": "phi3-lora", **fields}).encode()


def test_compact_summarizes_the_input_and_keeps_the_user_messages() -> None:
    conversation = [{"role": "user", "content": "Plan a trip to Rome"},
                    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Sure"}]},
                    {"role": "user", "content": [{"type": "input_text", "text": "In May"}]}]
    shimmy, exchange = start_api(ResponsesCompact, compact(input=conversation))
    sent = json.loads(shimmy)
    assert sent["prompt"].endswith(f"<|user|>\n{SUMMARY_REQUEST}<|end|>\n<|assistant|>\n")
    assert "<|assistant|>\nSure<|end|>" in sent["prompt"] and sent["max_tokens"] == SUMMARY_MAX_TOKENS
    answer = json.loads(exchange.complete(shimmy_stream("A trip", " to Rome in May.")))
    check_response(answer, "CompactResource")
    assert answer["object"] == "response.compaction"
    assert [(i["type"], i.get("role")) for i in answer["output"]] == [("message", "user"), ("message", "user"),
                                                                       ("compaction", None)]
    assert [i["content"][0]["text"] for i in answer["output"][:2]] == ["Plan a trip to Rome", "In May"]
    assert answer["output"][2]["encrypted_content"] == "A trip to Rome in May."
    assert answer["usage"]["output_tokens"] == 2


def test_a_compaction_item_goes_back_into_the_prompt_as_its_summary() -> None:
    shimmy, _ = start_api(Responses, body(input=[{"type": "compaction", "encrypted_content": "Trip to Rome, May."},
                                                 {"role": "user", "content": "Hotels?"}]))
    assert json.loads(shimmy)["prompt"].startswith(
        "<|system|>\nSummary of the earlier conversation:\nTrip to Rome, May.<|end|>\n<|user|>\nHotels?<|end|>")


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (compact(), "input"),
        (compact(input="x", previous_response_id="resp_1"), "previous_response_id"),
        (compact(input=[{"type": "item_reference", "id": "msg_1"}]), "input[0]"),
        (compact(input=[{"type": "compaction"}]), "input[0].encrypted_content"),
        (compact(input="x", model=""), "model"),
    ],
)
def test_compact_refusals_name_the_param(raw: bytes, param: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        ResponsesCompact.parse(raw)
    assert json.loads(refused.value.body())["error"]["param"] == param


MATH = 'start: expr\nexpr: NUMBER (("+" | "*") NUMBER)*\n%import common.NUMBER\n%ignore " "'
CUSTOM = [{"type": "custom", "name": "calc", "description": "Arithmetic",
           "format": {"type": "grammar", "syntax": "lark", "definition": MATH}},
          {"type": "custom", "name": "note"},
          {"type": "custom", "name": "zip", "format": {"type": "grammar", "syntax": "regex", "definition": r"\d{5}"}}]


def test_custom_tools_are_offered_and_their_calls_are_text_checked_by_grammar() -> None:
    shimmy, exchange = start_api(Responses, body(tools=CUSTOM))
    prompt = json.loads(shimmy)["prompt"]
    assert '"calc"' in prompt and "lark grammar" in prompt and "free-form" in prompt
    answer = whole(exchange.complete(shimmy_stream('{"name": "calc", "arguments": {"input": "2 + 3 * 4"}}')))
    [call] = answer["output"]
    assert (call["type"], call["name"], call["input"]) == ("custom_tool_call", "calc", "2 + 3 * 4")
    assert [t["type"] for t in answer["tools"]] == ["custom"] * 3 and answer["tools"][1]["format"] == {"type": "text"}
    for name, text in (("note", "anything at all"), ("zip", "75001")):
        _, free = start_api(Responses, body(tools=CUSTOM))
        reply = json.dumps({"name": name, "arguments": {"input": text}})
        assert whole(free.complete(shimmy_stream(reply)))["output"][0]["input"] == text
    for name, text in (("calc", "2 + + 3"), ("zip", "7500")):
        _, wrong = start_api(Responses, body(tools=CUSTOM))
        with pytest.raises(UpstreamError) as failed:
            wrong.complete(shimmy_stream(json.dumps({"name": name, "arguments": {"input": text}})))
        assert failed.value.code == "invalid_tool_call" and "does not match its grammar" in failed.value.message


def test_a_custom_tool_call_streams_its_input_events() -> None:
    _, exchange = start_api(Responses, body(stream=True, tools=CUSTOM, tool_choice={"type": "custom", "name": "calc"}))
    events = typed(exchange.relay(shimmy_stream('{"name": "calc", "arguments": {"input": "1+1"}}'), True))
    assert [e["type"] for e in events][2:] == [
        "response.output_item.added", "response.custom_tool_call_input.delta", "response.custom_tool_call_input.done",
        "response.output_item.done", "response.completed",
    ]
    assert events[3]["delta"] == events[4]["input"] == "1+1"
    assert events[-1]["response"]["output"][0]["input"] == "1+1"


def test_a_custom_call_and_its_output_go_back_into_the_prompt() -> None:
    shimmy, _ = start_api(Responses, body(tools=CUSTOM, input=[
        {"role": "user", "content": "2+2?"},
        {"type": "custom_tool_call", "call_id": "c1", "name": "calc", "input": "2+2"},
        {"type": "custom_tool_call_output", "call_id": "c1", "output": "4"}]))
    prompt = json.loads(shimmy)["prompt"]
    assert '{"name": "calc", "arguments": {"input":"2+2"}}' in prompt
    assert "<tool_response>\n4\n</tool_response>" in prompt


@pytest.mark.parametrize(
    ("tool", "param"),
    [
        ({"format": {"type": "grammar", "syntax": "lark", "definition": "start: ("}}, "tools[0].format.definition"),
        ({"format": {"type": "grammar", "syntax": "regex", "definition": r"(?<=a)b"}}, "tools[0].format.definition"),
        ({"format": {"type": "grammar", "syntax": "lark"}}, "tools[0].format"),
        ({"format": {"type": "grammar", "syntax": "ebnf", "definition": "x"}}, "tools[0].format.syntax"),
        ({"format": {"type": "grammar", "syntax": "lark", "definition": "x" * 65537}}, "tools[0].format.definition"),
    ],
)
def test_grammars_that_cannot_be_checked_are_refused(tool: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        Responses.parse(body(tools=[{"type": "custom", "name": "t", **tool}]))
    assert json.loads(refused.value.body())["error"]["param"] == param
