"""Tools and structured output through the running stack, driven by the agent frameworks people use.

The emulator plays the model's raw output (`reply`), so each test decides what the model "wrote" and checks what
the client library makes of the gateway's answer. Default model `phi3-lora` renders with the phi3 family (a JSON
call convention); one test uses a ChatML-named alias for the `<tool_call>` convention.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from tests.integration.conftest import Stack, sse_events

WEATHER_CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'


class Weather(BaseModel):
    city: str
    celsius: int


def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"18C in {city}"


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture
def client(stack: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0) as api:
        yield api


@pytest.fixture
def chat_model(stack: Stack) -> Iterator[object]:
    """LangChain's ChatOpenAI on an HTTP client the test closes (every socket a test opens, it closes)."""
    from langchain_openai import ChatOpenAI

    with httpx.Client() as http:
        yield ChatOpenAI(
            base_url=f"{stack.url}/v1", api_key="unused", model="phi3-lora", max_retries=0, http_client=http
        )


def ask(stack: Stack, **fields: object) -> httpx.Response:
    body = {"model": "phi3-lora", "messages": [{"role": "user", "content": "Weather in Paris?"}], **fields}
    return httpx.post(f"{stack.url}/v1/chat/completions", json=body, timeout=30)


def test_openai_sdk_gets_a_tool_call_and_shimmy_saw_the_tools(stack: Stack, client: openai.OpenAI) -> None:
    stack.configure(reply=WEATHER_CALL)
    answer = client.chat.completions.create(
        model="phi3-lora", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER_TOOL]
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    prompt = stack.emulator_stats()["last_generate_body"]["prompt"]
    assert prompt.startswith("<|system|>\nYou have access to the following functions") and '"get_weather"' in prompt


def test_openai_sdk_assembles_a_streamed_tool_call(stack: Stack, client: openai.OpenAI) -> None:
    stack.configure(reply=f"Let me look. {WEATHER_CALL}")
    with client.chat.completions.stream(
        model="phi3-lora", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER_TOOL]
    ) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me look. "
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and json.loads(call.function.arguments) == {"city": "Paris"}


def test_tool_call_tags_are_read_whatever_the_family(stack: Stack) -> None:
    stack.configure(reply=f"<tool_call>\n{WEATHER_CALL}\n</tool_call>")
    response = ask(stack, tools=[WEATHER_TOOL], model="phi3-lora", stream=True)
    events = sse_events(response.text.splitlines())
    deltas = [e["choices"][0]["delta"] for e in events if isinstance(e, dict) and e["choices"]]
    assert not any("tool_call>" in (d.get("content") or "") for d in deltas)
    assert next(d["tool_calls"][0]["function"].get("name") for d in deltas if "tool_calls" in d) == "get_weather"


@pytest.mark.parametrize(
    ("reply", "fields", "code"),
    [
        ("It is sunny.", {"tool_choice": "required"}, "missing_tool_call"),
        ('{"name": "launch_rocket", "arguments": {}}', {}, "invalid_tool_call"),
        ('{"name": "get_weather", "arguments": {"town": "Paris"}}', {}, "invalid_tool_call"),
        ("Sure, here you go", {"response_format": {"type": "json_object"}, "tools": None}, "invalid_json_output"),
    ],
)
def test_what_the_model_did_not_deliver_is_a_502_not_an_answer(
    stack: Stack, reply: str, fields: dict, code: str
) -> None:
    stack.configure(reply=reply)
    response = ask(stack, **{"tools": [WEATHER_TOOL], **fields})
    assert response.status_code == 502
    assert response.json()["error"]["code"] == code and response.json()["error"]["type"] == "server_error"


def test_chat_completions_parse_with_a_pydantic_model(stack: Stack, client: openai.OpenAI) -> None:
    stack.configure(reply='```json\n{"city": "Paris", "celsius": 18}\n```')
    answer = client.chat.completions.parse(
        model="phi3-lora", messages=[{"role": "user", "content": "Weather in Paris?"}], response_format=Weather
    )
    assert answer.choices[0].message.parsed == Weather(city="Paris", celsius=18)
    prompt = stack.emulator_stats()["last_generate_body"]["prompt"]
    assert "conforms to this JSON schema" in prompt and '"celsius"' in prompt


def test_langchain_bind_tools_two_turn_loop(stack: Stack, chat_model: Any) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage

    bound = chat_model.bind_tools([get_weather])
    history: list = [HumanMessage("Weather in Paris?")]
    stack.configure(reply=WEATHER_CALL)
    first = bound.invoke(history)
    [call] = first.tool_calls
    assert call["name"] == "get_weather" and call["args"] == {"city": "Paris"}
    history += [first, ToolMessage(get_weather(**call["args"]), tool_call_id=call["id"])]
    stack.configure(reply="It is 18C in Paris.")
    final = bound.invoke(history)
    assert final.content == "It is 18C in Paris." and not final.tool_calls
    prompt = stack.emulator_stats()["last_generate_body"]["prompt"]
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt and "18C in Paris" in prompt


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(stack: Stack, chat_model: Any, method: str) -> None:
    document = {"city": "Paris", "celsius": 18}
    reply = json.dumps(document) if method == "json_schema" else json.dumps({"name": "Weather", "arguments": document})
    stack.configure(reply=reply)
    assert chat_model.with_structured_output(Weather, method=method).invoke("Weather in Paris?") == Weather(**document)


def test_pydantic_ai_output_type(stack: Stack) -> None:
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    stack.configure(reply=json.dumps({"name": "final_result", "arguments": {"city": "Paris", "celsius": 18}}))

    async def run() -> object:
        async with openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0) as api:
            model = OpenAIChatModel("phi3-lora", provider=OpenAIProvider(openai_client=api))
            return (await Agent(model, output_type=Weather).run("Weather in Paris?")).output

    assert asyncio.run(run()) == Weather(city="Paris", celsius=18)


def test_openai_agents_sdk_with_one_function_tool(stack: Stack) -> None:
    from agents import Agent, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    stack.configure(reply=WEATHER_CALL)

    async def run() -> object:
        async with openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0) as api:
            agent = Agent(
                name="weather",
                instructions="Answer with the tool.",
                model=OpenAIChatCompletionsModel(model="phi3-lora", openai_client=api),
                tools=[function_tool(get_weather)],
                tool_use_behavior="stop_on_first_tool",
            )
            return (await Runner.run(agent, "Weather in Paris?")).final_output

    assert asyncio.run(run()) == "18C in Paris"


def test_anthropic_sdk_with_a_tool(stack: Stack) -> None:
    import anthropic

    tool = {"name": "get_weather", "description": "The weather in a city",
            "input_schema": WEATHER_TOOL["function"]["parameters"]}
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    stack.configure(reply=WEATHER_CALL)
    with anthropic.Anthropic(base_url=stack.url, api_key="unused", max_retries=0) as api:
        message = api.messages.create(model="phi3-lora", max_tokens=64, messages=ask, tools=[tool])
        assert message.stop_reason == "tool_use"
        [use] = [block for block in message.content if block.type == "tool_use"]
        assert (use.name, use.input) == ("get_weather", {"city": "Paris"})
        with api.messages.stream(model="phi3-lora", max_tokens=64, messages=ask, tools=[tool]) as stream:
            streamed = stream.get_final_message()
        assert streamed.stop_reason == "tool_use"
        assert [b.input for b in streamed.content if b.type == "tool_use"] == [{"city": "Paris"}]
        history = [*ask, {"role": "assistant", "content": [use.model_dump()]},
                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18C"}]}]
        stack.configure(reply="It is 18C.")
        final = api.messages.create(model="phi3-lora", max_tokens=64, messages=history, tools=[tool])
        assert (final.stop_reason, final.content[0].text) == ("end_turn", "It is 18C.")
        with pytest.raises(anthropic.APIStatusError) as failed:
            stack.configure(reply="No tool for you.")
            api.messages.create(model="phi3-lora", max_tokens=64, messages=ask, tools=[tool],
                                tool_choice={"type": "any"})
        assert failed.value.status_code == 502 and failed.value.body["error"]["type"] == "api_error"


def test_responses_create_with_a_function_tool(stack: Stack, client: openai.OpenAI) -> None:
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER_TOOL["function"]["parameters"]}
    stack.configure(reply=WEATHER_CALL)
    response = client.responses.create(model="phi3-lora", input="Weather in Paris?", tools=[tool])
    [call] = [item for item in response.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    with client.responses.stream(model="phi3-lora", input="Weather in Paris?", tools=[tool]) as stream:
        deltas = [event.delta for event in stream if event.type == "response.function_call_arguments.delta"]
        streamed = stream.get_final_response()
    assert json.loads("".join(deltas)) == {"city": "Paris"}
    assert [item.type for item in streamed.output if item.type == "function_call"] == ["function_call"]
    stack.configure(reply="It is 18C.")
    follow_up = client.responses.create(
        model="phi3-lora",
        input=[{"role": "user", "content": "Weather in Paris?"}, call.model_dump(exclude_none=True),
               {"type": "function_call_output", "call_id": call.call_id, "output": "18C"}],
        tools=[tool],
    )
    assert follow_up.output_text == "It is 18C."


def test_openai_agents_responses_stream_of_only_a_call_adds_no_empty_turn(stack: Stack) -> None:
    """Issue 24: a streamed answer that is only a function call has no empty `message` item, which the Agents SDK
    would carry into the next prompt as an empty assistant turn."""
    from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    stack.configure(reply=WEATHER_CALL)

    async def run() -> list[Any]:
        async with openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0) as api:
            agent = Agent(name="weather", instructions="Answer with the tool.",
                          model=OpenAIResponsesModel(model="phi3-lora", openai_client=api),
                          tools=[function_tool(get_weather)], tool_use_behavior="stop_on_first_tool")
            result = Runner.run_streamed(agent, "Weather in Paris?")
            async for _ in result.stream_events():
                pass
            assert result.final_output == "18C in Paris"
            return result.to_input_list()

    history = asyncio.run(run())
    assert [item.get("type", "message") for item in history] == ["message", "function_call", "function_call_output"]
    with openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0) as client:
        stack.configure(reply="It is 18C.")
        client.responses.create(model="phi3-lora", input=history, stream=False)
    prompt = stack.emulator_stats()["last_generate_body"]["prompt"]
    assert "<|assistant|>\n<|end|>" not in prompt and '"get_weather"' in prompt


def test_anthropic_stream_of_only_a_tool_call_round_trips(stack: Stack) -> None:
    """Issue 24: no empty text block opens a stream whose answer is only a tool call, so the history the SDK
    assembles can be sent back as it is (Anthropic refuses empty text blocks)."""
    import anthropic

    tool = {"name": "get_weather", "input_schema": WEATHER_TOOL["function"]["parameters"]}
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    stack.configure(reply=WEATHER_CALL)
    with anthropic.Anthropic(base_url=stack.url, api_key="unused", max_retries=0) as api:
        with api.messages.stream(model="phi3-lora", max_tokens=64, messages=ask, tools=[tool]) as stream:
            streamed = stream.get_final_message()
    assert [block.type for block in streamed.content] == ["tool_use"]
    assert all(block.text for block in streamed.content if block.type == "text")


def test_anthropic_structured_output_with_the_sdks_parse(stack: Stack) -> None:
    """Issue 24: `output_config.format` (Anthropic's structured outputs, what `messages.parse` sends) is the same
    structured output as chat's json_schema: the schema in the prompt, the answer validated against it."""
    import anthropic

    stack.configure(reply='```json\n{"city": "Paris", "celsius": 18}\n```')
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    with anthropic.Anthropic(base_url=stack.url, api_key="unused", max_retries=0) as api:
        parsed = api.messages.parse(model="phi3-lora", max_tokens=64, messages=ask, output_format=Weather)
        assert parsed.parsed_output == Weather(city="Paris", celsius=18) and parsed.stop_reason == "end_turn"
        prompt = stack.emulator_stats()["last_generate_body"]["prompt"]
        assert "conforms to this JSON schema" in prompt and '"celsius"' in prompt
        with api.messages.stream(model="phi3-lora", max_tokens=64, messages=ask, output_format=Weather) as stream:
            assert stream.get_final_message().parsed_output == Weather(city="Paris", celsius=18)
        stack.configure(reply='{"city": "Paris"}')
        schema = {"type": "json_schema", "schema": Weather.model_json_schema()}
        with pytest.raises(anthropic.APIStatusError) as failed:
            api.messages.create(model="phi3-lora", max_tokens=64, messages=ask, output_config={"format": schema})
    assert failed.value.status_code == 502 and "does not match the schema" in failed.value.message


def test_responses_custom_tools_free_form_and_lark_grammar(stack: Stack, client: openai.OpenAI) -> None:
    """Issue 24: custom tools (free-form text input, and a lark grammar the model's input is checked against),
    through the openai SDK: create, stream, and the call's output sent back."""
    grammar = 'start: expr\nexpr: NUMBER (("+" | "*") NUMBER)*\n%import common.NUMBER\n%ignore " "'
    calc = {"type": "custom", "name": "calc", "description": "Arithmetic",
            "format": {"type": "grammar", "syntax": "lark", "definition": grammar}}
    note = {"type": "custom", "name": "note", "description": "Write a note"}
    stack.configure(reply='{"name": "calc", "arguments": {"input": "2 + 3 * 4"}}')
    response = client.responses.create(model="phi3-lora", input="What is 2 + 3 * 4?", tools=[calc, note])
    [call] = response.output
    assert (call.type, call.name, call.input) == ("custom_tool_call", "calc", "2 + 3 * 4")
    assert "lark grammar" in stack.emulator_stats()["last_generate_body"]["prompt"]
    stack.configure(reply='{"name": "note", "arguments": {"input": "buy milk, then eggs"}}')
    with client.responses.stream(model="phi3-lora", input="Note it", tools=[calc, note]) as stream:
        deltas = [e.delta for e in stream if e.type == "response.custom_tool_call_input.delta"]
        streamed = stream.get_final_response()
    assert "".join(deltas) == "buy milk, then eggs" and streamed.output[0].input == "buy milk, then eggs"
    stack.configure(reply="It is 14.")
    follow = client.responses.create(model="phi3-lora", tools=[calc, note], input=[
        {"role": "user", "content": "What is 2 + 3 * 4?"}, call.model_dump(exclude_none=True),
        {"type": "custom_tool_call_output", "call_id": call.call_id, "output": "14"}])
    assert follow.output_text == "It is 14."
    stack.configure(reply='{"name": "calc", "arguments": {"input": "two plus three"}}')
    with pytest.raises(openai.InternalServerError) as failed:
        client.responses.create(model="phi3-lora", input="2+3?", tools=[calc])
    assert "does not match its grammar" in failed.value.message
    lookbehind = {"type": "grammar", "syntax": "regex", "definition": r"(?<=a)b"}  # not in RE2's (nor OpenAI's) syntax
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="phi3-lora", input="x",
                                tools=[{"type": "custom", "name": "z", "format": lookbehind}])
    assert refused.value.body["param"] == "tools[0].format.definition" and "cannot check" in refused.value.message
