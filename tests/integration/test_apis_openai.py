"""Issue 16: OpenAI Responses, legacy completions, model retrieval, CORS, query strings and the key header, through
the running stack with the official `openai` SDK and raw HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.integration.conftest import Stack, sse_events, start_stack, stop_stack

REPLY = "The quick brown fox jumps"  # the emulator's tokens: "The", " quick", " brown", " fox", " jumps"
CHAT = {"model": "phi3-lora", "messages": [{"role": "user", "content": "Tell me"}]}


def sdk(stack: Stack, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0)


def typed_events(text: str) -> list[dict]:
    """Each event's data, checking that its `event:` line names its type."""
    out = []
    for block in filter(None, text.split("\n\n")):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        data = json.loads(lines["data"])
        assert data["type"] == lines["event"]
        out.append(data)
    return out


# -- Responses --------------------------------------------------------------------------------------


def test_sdk_responses_create_answers_one_message_with_usage(streamed: Stack) -> None:
    stack = streamed
    stack.configure(reply=REPLY)
    response = sdk(stack).responses.create(model="phi3-lora", instructions="Be brief", input="Tell me",
                                           max_output_tokens=64, temperature=0.5, store=True)
    assert (response.object, response.status, response.model) == ("response", "completed", "phi3-lora")
    assert response.output_text == REPLY and response.incomplete_details is None
    assert response.usage.output_tokens == 5 and response.usage.input_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + 5
    assert response.store is False  # accepted, and nothing is stored
    sent = stack.emulator_stats()["last_generate_body"]
    assert sent["prompt"] == "<|system|>\nBe brief<|end|>\n<|user|>\nTell me<|end|>\n<|assistant|>\n"
    assert (sent["max_tokens"], sent["temperature"]) == (64, 0.5)


def test_responses_input_items_carry_the_conversation(stack: Stack) -> None:
    stack.configure(reply=REPLY)
    sdk(stack).responses.create(model="phi3-lora", input=[
        {"role": "user", "content": "Hi"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "More"}]},
    ])
    prompt = stack.emulator_stats()["last_generate_body"]["prompt"]
    assert prompt == "<|user|>\nHi<|end|>\n<|assistant|>\nHello<|end|>\n<|user|>\nMore<|end|>\n<|assistant|>\n"


def test_sdk_responses_at_the_limit_is_incomplete(stack: Stack) -> None:
    stack.configure(reply=REPLY)
    response = sdk(stack).responses.create(model="phi3-lora", input="Tell me", max_output_tokens=2)
    assert (response.status, response.incomplete_details.reason) == ("incomplete", "max_output_tokens")
    assert response.output_text == "The quick" and response.usage.output_tokens == 2


def test_sdk_responses_stream(stack: Stack) -> None:
    stack.configure(reply=REPLY)
    events = list(sdk(stack).responses.create(model="phi3-lora", input="Tell me", stream=True))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == REPLY
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == REPLY and events[-1].response.usage.output_tokens == 5


def test_raw_responses_stream_sends_the_exact_event_order(stack: Stack) -> None:
    stack.configure(reply=REPLY)
    with httpx.stream("POST", f"{stack.url}/v1/responses",
                      json={"model": "phi3-lora", "input": "Tell me", "stream": True, "max_output_tokens": 2}) as r:
        events = typed_events(r.read().decode())
    assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.incomplete",
    ]
    assert [e["sequence_number"] for e in events] == list(range(10))
    assert events[6]["text"] == "The quick"
    final = events[-1]["response"]
    assert final["status"] == "incomplete" and final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["usage"]["output_tokens"] == 2 and final["output"][0]["content"][0]["text"] == "The quick"


def test_responses_failure_mid_stream_is_response_failed(streamed: Stack) -> None:
    stack = streamed
    stack.configure(reply=REPLY, error_after=2)
    with httpx.stream("POST", f"{stack.url}/v1/responses",
                      json={"model": "phi3-lora", "input": "Tell me", "stream": True}) as r:
        events = typed_events(r.read().decode())
    assert [e["type"] for e in events][-3:] == ["response.output_text.delta"] * 2 + ["response.failed"]
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "generation_failed"


def test_responses_are_not_stored_and_say_why(stack: Stack) -> None:
    with sdk(stack) as client:  # closed here: an exception's traceback would keep its connection alive
        with pytest.raises(openai.BadRequestError) as chained:
            client.responses.create(model="phi3-lora", input="x", previous_response_id="resp_1")
        with pytest.raises(openai.NotFoundError) as fetched:
            client.responses.retrieve("resp_1")
        with pytest.raises(openai.BadRequestError) as referenced:
            client.responses.create(model="phi3-lora", input=[{"type": "item_reference", "id": "msg_1"}])
    assert chained.value.body["param"] == "previous_response_id" and "share no state" in chained.value.message
    assert referenced.value.body["param"] == "input[0]" and "share no state" in referenced.value.message
    assert fetched.value.body["code"] == "not_stored" and "stateless" in fetched.value.message
    assert httpx.delete(f"{stack.url}/v1/responses/resp_1").json()["error"]["code"] == "not_stored"
    assert stack.emulator_stats()["generate_requests"] == 0


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
         "input[0].content[0].type"),
        ({"input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}}, "text.format"),
        ({"input": "x", "background": True}, "background"),
    ],
)
def test_responses_refusals_name_the_param(stack: Stack, payload: dict, param: str) -> None:
    resp = httpx.post(f"{stack.url}/v1/responses", json={"model": "phi3-lora", **payload})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param, resp.text


# -- legacy completions ------------------------------------------------------------------------------


def test_sdk_completions_send_the_raw_prompt_with_default_16_tokens(streamed: Stack) -> None:
    stack = streamed
    stack.configure(reply=REPLY)
    completion = sdk(stack).completions.create(model="phi3-lora", prompt="Once upon a time")
    assert completion.object == "text_completion" and completion.choices[0].text == REPLY
    assert completion.choices[0].finish_reason == "stop" and completion.usage.completion_tokens == 5
    sent = stack.emulator_stats()["last_generate_body"]
    assert (sent["prompt"], sent["max_tokens"]) == ("Once upon a time", 16)  # untemplated


def test_sdk_completions_stop_and_length(stack: Stack) -> None:
    stack.configure(reply=REPLY)
    stopped = sdk(stack).completions.create(model="phi3-lora", prompt=["x"], stop=" fox")
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == ("The quick brown", "stop")
    cut = sdk(stack).completions.create(model="phi3-lora", prompt="x", max_tokens=2)
    choice = cut.choices[0]
    assert (choice.text, choice.finish_reason, cut.usage.completion_tokens) == ("The quick", "length", 2)


def test_sdk_completions_stream_with_usage(stack: Stack) -> None:
    stack.configure(reply=REPLY)
    chunks = list(sdk(stack).completions.create(model="phi3-lora", prompt="x", stream=True,
                                                stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == REPLY
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5


def test_raw_completions_stream_order(stack: Stack) -> None:
    stack.configure(reply=REPLY)
    with httpx.stream("POST", f"{stack.url}/v1/completions",
                      json={"model": "phi3-lora", "prompt": "x", "stream": True, "max_tokens": 2}) as r:
        events = sse_events(list(r.iter_lines()))
    assert events[-1] == "[DONE]"
    assert [(e["object"], e["choices"][0]["text"], e["choices"][0]["finish_reason"]) for e in events[:-1]] == [
        ("text_completion", "The", None), ("text_completion", " quick", None), ("text_completion", "", "length"),
    ]


@pytest.mark.parametrize(
    ("field", "value"), [("echo", True), ("suffix", "end"), ("logprobs", 1), ("best_of", 2), ("n", 2)]
)
def test_completions_refuse_what_they_cannot_do_by_name(stack: Stack, field: str, value: object) -> None:
    with sdk(stack) as client, pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="phi3-lora", prompt="x", extra_body={field: value})
    assert refused.value.body["param"] == field and refused.value.body["code"] == "unsupported_parameter"
    assert stack.emulator_stats()["generate_requests"] == 0


# -- models, limits, query strings -----------------------------------------------------------------


def test_sdk_models_retrieve_and_unknown_model(stack: Stack) -> None:
    with sdk(stack) as client:
        model = client.models.retrieve("phi3-lora")
        with pytest.raises(openai.NotFoundError) as missing:
            client.models.retrieve("gpt-5")
    assert (model.id, model.object, model.owned_by) == ("phi3-lora", "model", "shimmy")
    assert missing.value.body["code"] == "model_not_found" and missing.value.body["param"] == "model"


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_token_limits_below_one_are_refused(stack: Stack, field: str) -> None:
    resp = httpx.post(f"{stack.url}/v1/chat/completions", json={**CHAT, field: 0})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == field
    assert stack.emulator_stats()["generate_requests"] == 0


@pytest.mark.parametrize(
    ("method", "path", "payload"),
    [
        ("POST", "/v1/chat/completions", {**CHAT, "max_tokens": 2}),
        ("POST", "/v1/completions", {"model": "phi3-lora", "prompt": "x", "max_tokens": 2}),
        ("POST", "/v1/responses", {"model": "phi3-lora", "input": "x", "max_output_tokens": 2}),
        ("POST", "/v1/messages", {"model": "phi3-lora", "max_tokens": 2, "messages": CHAT["messages"]}),
        ("GET", "/v1/models", None),
        ("GET", "/v1/models/phi3-lora", None),
        ("GET", "/health", None),
    ],
)
def test_a_query_string_changes_nothing(stack: Stack, method: str, path: str, payload: dict | None) -> None:
    """SAP's Java SDK appends ?api-version=... to every call."""
    plain = httpx.request(method, f"{stack.url}{path}", json=payload)
    queried = httpx.request(method, f"{stack.url}{path}?api-version=2024-02-01", json=payload)
    assert plain.status_code == queried.status_code == 200, queried.text
    assert set(plain.json()) == set(queried.json())


# -- CORS and the key header -----------------------------------------------------------------------


def test_cors_is_off_by_default_shimmys_headers_are_stripped(stack: Stack) -> None:
    origin = {"origin": "https://app.example"}
    for resp in (
        httpx.get(f"{stack.url}/v1/models", headers=origin),
        httpx.post(f"{stack.url}/v1/chat/completions", json={**CHAT, "max_tokens": 1}, headers=origin),
        httpx.get(f"{stack.url}/health", headers=origin),
    ):
        assert resp.status_code == 200
        assert not [h for h in resp.headers if h.startswith("access-control-")], resp.headers
    preflight = httpx.options(f"{stack.url}/v1/chat/completions",
                              headers={**origin, "access-control-request-method": "POST"})
    assert preflight.status_code == 405 and "access-control-allow-origin" not in preflight.headers


@pytest.fixture(scope="module")
def configured() -> Iterator[Stack]:
    started = start_stack({"CORS_ALLOWED_ORIGINS": "https://app.example", "GATEWAY_API_KEYS": "k-one",
                           "GATEWAY_API_KEY_HEADER": "x-gateway-key"})
    yield started
    stop_stack(started)
    started.log.unlink(missing_ok=True)


def test_cors_allowed_origins_get_preflights_and_headers(configured: Stack) -> None:
    ask = {"access-control-request-method": "POST", "access-control-request-headers": "content-type, x-api-key"}
    allowed = httpx.options(f"{configured.url}/v1/messages", headers={"origin": "https://app.example", **ask})
    assert allowed.status_code == 200, allowed.text
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in allowed.headers["access-control-allow-methods"]
    other = httpx.options(f"{configured.url}/v1/messages",
                          headers={"origin": "https://evil.example", "x-request-id": "preflight-evil", **ask})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
    from tests.integration.test_observability import access_log

    assert access_log(configured, "preflight-evil")["details"] == "cors_response"  # Envoy's answer, not Shimmy's
    answer = httpx.post(f"{configured.url}/v1/chat/completions", json={**CHAT, "max_tokens": 1},
                        headers={"origin": "https://app.example", "x-gateway-key": "k-one"})
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "https://app.example"
    assert configured.emulator_stats()["generate_requests"] == 1  # preflights never reach Shimmy


def test_the_key_header_is_configurable(configured: Stack) -> None:
    """Behind AI Core, Authorization carries AI Core's token: the gateway's key travels in its own header."""
    url = f"{configured.url}/v1/chat/completions"
    payload = {**CHAT, "max_tokens": 1}
    assert httpx.post(url, json=payload, headers={"x-gateway-key": "k-one",
                                                  "authorization": "Bearer ai-core-token"}).status_code == 200
    refused = httpx.post(url, json=payload, headers={"authorization": "Bearer k-one"})
    assert refused.status_code == 401 and "x-gateway-key" in refused.json()["error"]["message"]
    assert httpx.post(url, json=payload, headers={"x-api-key": "k-one"}).status_code == 200


# -- the same guarantees, labelled with the API -----------------------------------------------------


@pytest.mark.parametrize(
    ("api", "path", "payload"),
    [
        ("messages", "/v1/messages", {"model": "phi3-lora", "max_tokens": 3, "messages": CHAT["messages"]}),
        ("responses", "/v1/responses", {"model": "phi3-lora", "input": "x", "max_output_tokens": 3}),
        ("completions", "/v1/completions", {"model": "phi3-lora", "prompt": "x", "max_tokens": 3}),
        ("chat", "/v1/chat/completions", {**CHAT, "max_tokens": 3}),
    ],
)
def test_metrics_and_access_log_lines_carry_the_api(streamed: Stack, api: str, path: str, payload: dict) -> None:
    stack = streamed
    from tests.integration.test_observability import access_log, metric, quiet_metrics

    operation = "text_completion" if api == "completions" else "chat"
    ok = {"api": api, "error_type": "", "stream": "false", "gen_ai_operation_name": operation}
    output = {"api": api, "gen_ai_token_type": "output", "gen_ai_operation_name": operation}
    duration, tokens = "gen_ai_server_request_duration_seconds_count", "gen_ai_client_token_usage_sum"
    before = quiet_metrics(stack)
    resp = httpx.post(f"{stack.url}{path}", json=payload, headers={"x-request-id": f"api-{api}"})
    assert resp.status_code == 200, resp.text
    after = httpx.get(f"{stack.url}/metrics").text
    assert metric(after, duration, **ok) - metric(before, duration, **ok) == 1
    assert metric(after, tokens, **output) - metric(before, tokens, **output) == 3
    entry = access_log(stack, f"api-{api}")
    assert (entry["api"], entry["outcome"], entry["completion_tokens"]) == (api, "ok", 3)


def test_sdk_responses_compact_then_continue_from_the_compaction(stack: Stack) -> None:
    """Issue 24: /v1/responses/compact needs no storage: the conversation comes in, its user messages and a
    compaction item (the model's summary) come out, and that item carries the conversation on."""
    stack.configure(reply="Trip to Rome in May.")
    conversation = [{"role": "user", "content": "Plan a trip to Rome"},
                    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Sure"}]},
                    {"role": "user", "content": "In May"}]
    with sdk(stack) as client:
        compacted = client.responses.compact(model="phi3-lora", input=conversation)
        assert compacted.object == "response.compaction" and compacted.usage.output_tokens > 0
        assert [item.type for item in compacted.output] == ["message", "message", "compaction"]
        assert compacted.output[-1].encrypted_content == "Trip to Rome in May."
        assert "Summarize the conversation" in stack.emulator_stats()["last_generate_body"]["prompt"]
        stack.configure(reply=REPLY)
        # The SDK types every output message as the assistant's (output_text); compaction keeps user messages
        # (input_text), as OpenAI's reference example shows, so its dump warns of the content type.
        kept = [item.model_dump(exclude_none=True, warnings=False) for item in compacted.output]
        follow = client.responses.create(model="phi3-lora", input=[*kept, {"role": "user", "content": "Hotels?"}])
        assert follow.output_text == REPLY
        prompt = stack.emulator_stats()["last_generate_body"]["prompt"]
        assert "Summary of the earlier conversation:\nTrip to Rome in May." in prompt and "Hotels?" in prompt
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.compact(model="phi3-lora", previous_response_id="resp_1")
    assert refused.value.body["param"] == "previous_response_id" and "share no state" in refused.value.message
    assert httpx.get(f"{stack.url}/v1/responses/compact").status_code == 405
