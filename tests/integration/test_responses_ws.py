"""Responses WebSocket mode (`GET /v1/responses`, `Upgrade: websocket`) through the running stack.

Driven by the OpenAI SDK's own client for it (`client.responses.connect()`), and by the `websockets` library
where a test needs the raw socket (the handshake's status, a close code). The state kept per connection and its
bounds: docs/apis.md, extproc/responses_ws.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.integration.conftest import Stack, sse_events, start_stack, stop_stack

TERMINAL = ("response.completed", "response.incomplete", "response.failed", "error")
WEATHER = {"type": "function", "name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def turn(conn: Any, **body: Any) -> list[Any]:
    """Send one response.create through the SDK's connection; its events up to the terminal one."""
    conn.response.create(model="phi3-lora", **body)
    events = []
    for event in conn:
        events.append(event)
        if event.type in TERMINAL:
            return events
    raise AssertionError(f"the connection closed after {[e.type for e in events]}")


def raw_turn(ws: ClientConnection, **body: Any) -> list[dict[str, Any]]:
    ws.send(json.dumps({"type": "response.create", "model": "phi3-lora", **body}))
    events = []
    while True:
        events.append(json.loads(ws.recv(timeout=30)))
        if events[-1]["type"] in TERMINAL:
            return events


@pytest.fixture
def client(stack: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0) as api:
        yield api


def last_prompt(stack: Stack) -> str:
    return str(stack.emulator_stats()["last_prompt"])


def test_several_turns_continue_the_connection_state(stack: Stack, client: openai.OpenAI) -> None:
    """Three turns on one socket, each naming the last with previous_response_id (store=false): the model sees the
    whole conversation, and every event is the one the HTTP stream sends."""
    stack.configure(reply="Noted.")
    http = httpx.post(f"{stack.url}/v1/responses", timeout=30,
                      json={"model": "phi3-lora", "input": "My name is Ada.", "stream": True})
    sse_types = [e["type"] for e in sse_events(http.text.splitlines()) if isinstance(e, dict)]
    with client.responses.connect() as conn:
        first = turn(conn, input="My name is Ada.", store=False)
        assert [e.type for e in first] == sse_types
        done = first[-1].response
        assert done.status == "completed" and done.output_text == "Noted." and done.previous_response_id is None
        second = turn(conn, input="I live in Paris.", previous_response_id=done.id, store=False)
        assert second[-1].type == "response.completed"
        assert second[-1].response.previous_response_id == done.id
        assert second[0].response.previous_response_id == done.id  # response.created says so too
        third = turn(conn, input=[{"role": "user", "content": "What is my name?"}],
                     previous_response_id=second[-1].response.id, store=False)
        assert third[-1].type == "response.completed"
        prompt = last_prompt(stack)
        assert prompt.index("My name is Ada.") < prompt.index("Noted.") < prompt.index("I live in Paris.")
        assert prompt.index("I live in Paris.") < prompt.index("What is my name?")
        tokens = [t[-1].response.usage.input_tokens for t in (first, second, third)]
        assert tokens[0] < tokens[1] < tokens[2]


def test_a_tool_call_round_trip_on_one_socket(stack: Stack, client: openai.OpenAI) -> None:
    """The agent loop WebSocket mode is for: the model calls a tool; the next turn sends only the tool's output."""
    stack.configure(reply='{"name": "get_weather", "arguments": {"city": "Paris"}}')
    with client.responses.connect() as conn:
        called = turn(conn, input="Weather in Paris?", tools=[WEATHER])[-1].response
        [call] = [item for item in called.output if item.type == "function_call"]
        assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
        stack.configure(reply="It is 18C in Paris.")
        answer = turn(conn, previous_response_id=called.id, tools=[WEATHER],
                      input=[{"type": "function_call_output", "call_id": call.call_id, "output": "18C"}])[-1]
        assert answer.type == "response.completed" and answer.response.output_text == "It is 18C in Paris."
        prompt = last_prompt(stack)
        assert prompt.index("Weather in Paris?") < prompt.rindex("get_weather") < prompt.rindex("18C")


def test_errors_are_events_and_the_socket_stays_usable(stack: Stack, client: openai.OpenAI) -> None:
    """An unknown previous_response_id, a body the gateway refuses, a message that is no client event: each is an
    `error` event with the HTTP status it would have had; a failed turn drops the state (nothing stale goes on)."""
    with client.responses.connect() as conn:
        [missing] = turn(conn, input="Hi", previous_response_id="resp_unknown")
        assert (missing.status, missing.error.code, missing.error.param) == (
            400, "previous_response_not_found", "previous_response_id")
        first = turn(conn, input="Hi")[-1].response
        [refused] = turn(conn, input="Hi", temperature=9, previous_response_id=first.id)
        assert (refused.status, refused.error.type, refused.error.param) == (400, "invalid_request_error",
                                                                            "temperature")
        [stale] = turn(conn, input="Hi", previous_response_id=first.id)
        assert stale.error.code == "previous_response_not_found"
        assert turn(conn, input="Hi")[-1].type == "response.completed"


def test_unknown_messages_and_background(stack: Stack) -> None:
    with connect(f"ws://127.0.0.1:{stack.gateway_port}/v1/responses") as ws:
        ws.send("not json")
        assert json.loads(ws.recv(timeout=10))["error"]["code"] == "invalid_json"
        ws.send(json.dumps({"type": "session.update"}))
        assert json.loads(ws.recv(timeout=10))["error"]["param"] == "type"
        ws.send(json.dumps({"type": "response.create", "model": "phi3-lora", "input": "Hi", "background": True}))
        assert json.loads(ws.recv(timeout=10))["error"]["param"] == "background"
        assert raw_turn(ws, input="Hi")[-1]["type"] == "response.completed"


@pytest.fixture(scope="module")
def bounded() -> Iterator[Stack]:
    """Keys required, and every bound of WebSocket mode small enough to reach."""
    started = start_stack({
        "GATEWAY_API_KEYS": "sk-ws-test", "RESPONSES_WS_MAX_CONNECTIONS": "1", "RESPONSES_WS_MAX_TURNS": "2",
        "RESPONSES_WS_IDLE_TIMEOUT_S": "1", "MAX_REQUEST_BYTES": "4096",
    })
    yield started
    stop_stack(started)
    started.log.unlink(missing_ok=True)


def test_the_upgrade_needs_a_key(bounded: Stack) -> None:
    url = f"ws://127.0.0.1:{bounded.gateway_port}/v1/responses"
    with pytest.raises(InvalidStatus) as refused:
        connect(url, additional_headers={"Authorization": "Bearer wrong"}).close()
    assert refused.value.response.status_code == 401
    with openai.OpenAI(base_url=f"{bounded.url}/v1", api_key="sk-ws-test", max_retries=0) as api, \
            api.responses.connect() as conn:
        assert turn(conn, input="Hi")[-1].type == "response.completed"  # turns carry a key through Envoy


def test_bounds_turns_connections_idle_and_bytes(bounded: Stack) -> None:
    url = f"ws://127.0.0.1:{bounded.gateway_port}/v1/responses"
    key = {"Authorization": "Bearer sk-ws-test"}
    with connect(url, additional_headers=key) as ws:
        with pytest.raises(InvalidStatus) as second:
            connect(url, additional_headers=key).close()
        assert second.value.response.status_code == 429
        assert json.loads(second.value.response.body)["error"]["code"] == "websocket_connection_limit_reached"
        first = raw_turn(ws, input="Hi")[-1]["response"]
        # The conversation kept must fit in MAX_REQUEST_BYTES: past it, it is dropped, and says why.
        raw_turn(ws, input="x" * 3000, previous_response_id=first["id"])
        ws.send(json.dumps({"type": "response.create", "model": "phi3-lora", "input": "Hi"}))
        limit = json.loads(ws.recv(timeout=10))
        assert limit["error"]["code"] == "websocket_connection_limit_reached"
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
    with connect(url, additional_headers=key) as ws:
        ws.send(json.dumps({"type": "response.create", "model": "phi3-lora", "input": "x" * 5000}))
        with pytest.raises(ConnectionClosed) as big:
            ws.recv(timeout=10)
        assert big.value.rcvd is not None and big.value.rcvd.code == 1009  # message too big
    with connect(url, additional_headers=key) as ws:
        with pytest.raises(ConnectionClosed) as idle:
            ws.recv(timeout=10)  # RESPONSES_WS_IDLE_TIMEOUT_S=1 without a turn
        assert idle.value.rcvd is not None and idle.value.rcvd.code == 1000


def test_a_conversation_too_large_to_resend_is_not_kept(bounded: Stack) -> None:
    bounded.configure(reply="word " * 120)  # the kept conversation, 3,700 bytes of input and this, is over 4,096
    with connect(f"ws://127.0.0.1:{bounded.gateway_port}/v1/responses",
                 additional_headers={"Authorization": "Bearer sk-ws-test"}) as ws:
        big = raw_turn(ws, input="y" * 3700)[-1]["response"]
        [gone] = raw_turn(ws, input="more", previous_response_id=big["id"])
        assert gone["error"]["code"] == "previous_response_not_found"
        assert "MAX_REQUEST_BYTES" in gone["error"]["message"]
