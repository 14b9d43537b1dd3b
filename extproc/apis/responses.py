"""OpenAI Responses (`POST /v1/responses`), stateless: `response` objects and the typed event stream, as the Open
Responses specification requires them (every field of a ResponseResource, `null` where there is no value).

Nothing is stored: `store` is accepted and answered `false`, `previous_response_id` and `item_reference` input items
are refused, and `GET /v1/responses/{id}` is answered by Envoy (`subpath_error` below), because the gateway's replicas
share no state. The answer is one `message` output item with one `output_text` part, then a `function_call` item
per tool call; an answer that is only calls has no message item. A stream sends, each event with its
`sequence_number`: response.created, response.in_progress, then with the first text response.output_item.added,
response.content_part.added, response.output_text.delta..., and once the text is whole response.output_text.done,
response.content_part.done, response.output_item.done; then response.completed, or response.incomplete
(`incomplete_details.reason: max_output_tokens`), or response.failed (with `error`) instead of all after the deltas.
Tool calls follow the message item (or stand alone) as function_call items: response.output_item.added,
response.function_call_arguments.delta, response.function_call_arguments.done, response.output_item.done; a custom
tool's call is a custom_tool_call item (its text `input`), with response.custom_tool_call_input.delta and .done.
"""

from __future__ import annotations

import random
import time
from typing import Any, ClassVar

import msgspec

from extproc.errors import GatewayError
from extproc.generation import SSE_KEEPALIVE, Generation, GenerationRequest, Message
from extproc.openai_schema import (
    CompactRequest,
    ResponsesNamedChoice,
    ResponsesRequest,
    ResponsesTool,
    parse_compact_request,
    parse_responses_request,
)
from extproc.shimmy_protocol import DEFAULT_MAX_TOKENS
from extproc.tools import CUSTOM_INPUT, NO_TOOLING, Grammar, Tool, ToolCall, Tooling, custom_tool

__all__ = ["Responses", "ResponsesCompact"]

_encode = msgspec.json.Encoder().encode


def _event(kind: str, payload: dict[str, Any]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (kind.encode(), _encode({"type": kind, **payload}))


def _messages(request: ResponsesRequest | CompactRequest) -> list[Message]:
    """The conversation: instructions, then the input items; consecutive function_call items are one assistant
    turn's (parallel) calls, a function_call_output a tool turn, a compaction item the summary it holds."""
    out = [Message("system", request.instructions)] if request.instructions else []
    if isinstance(request.input, str):
        return [*out, Message("user", request.input)]
    for item in request.input or ():
        if item.type in ("function_call", "custom_tool_call"):
            arguments = item.arguments if item.type == "function_call" else _encode({CUSTOM_INPUT: item.input}).decode()
            call = ToolCall(item.call_id or "", item.name or "", arguments or "{}")
            if out and out[-1].role == "assistant" and out[-1].tool_calls:
                out[-1] = Message("assistant", out[-1].text, (*out[-1].tool_calls, call))
            else:
                out.append(Message("assistant", "", (call,)))
        elif item.type in ("function_call_output", "custom_tool_call_output"):
            out.append(Message("tool", item.text()))
        elif item.type == "compaction":
            out.append(Message("system", f"{_SUMMARY_HEADING}\n{item.encrypted_content}"))
        else:
            out.append(Message(item.role or "user", item.text()))
    return out


def _tooling(request: ResponsesRequest) -> Tooling:
    fmt = request.text.format if request.text is not None else None
    schema = None
    if fmt is not None and fmt.type == "json_schema":
        schema = fmt.schema or {}
    elif fmt is not None and fmt.type == "json_object":
        schema = {}
    if not request.tools and schema is None:
        return NO_TOOLING
    choice = request.tool_choice
    return Tooling(
        tools=tuple(_tool(t) for t in request.tools or ()),
        choice=choice.name if isinstance(choice, ResponsesNamedChoice) else choice or "auto",
        parallel=request.parallel_tool_calls is not False,
        schema=schema,
    )


def _tool(tool: ResponsesTool) -> Tool:
    if tool.type == "function":
        return Tool(tool.name, tool.description, tool.parameters or {"type": "object"})
    fmt = tool.format
    grammar = Grammar(fmt.syntax, fmt.definition) if fmt and fmt.syntax and fmt.definition is not None else None
    return custom_tool(tool.name, tool.description, grammar)


def _echo(tool: ResponsesTool) -> dict[str, Any]:
    """A tool as the response lists it: a function with every field (null where unset), a custom tool with its
    format (free-form text by default)."""
    if tool.type == "function":
        return {"type": "function", "name": tool.name, "description": tool.description,
                "parameters": tool.parameters, "strict": tool.strict}
    fmt = msgspec.to_builtins(tool.format) if tool.format else {"type": "text"}
    return {"type": "custom", "name": tool.name, "description": tool.description,
            "format": {k: v for k, v in fmt.items() if v is not None}}


def _input(call: ToolCall) -> str:
    """A custom tool call's input: its one argument."""
    value = msgspec.json.decode(call.arguments)[CUSTOM_INPUT]
    assert isinstance(value, str)  # its schema says so, and the call was validated against it
    return value


def _custom_item(call: ToolCall, streaming: bool = False) -> dict[str, Any]:
    return {"id": "ctc_" + call.id.removeprefix("call_"), "type": "custom_tool_call", "call_id": call.id,
            "name": call.name, "input": "" if streaming else _input(call)}


def _call_item(call: ToolCall, arguments: str | None = None) -> dict[str, Any]:
    return {
        "id": "fc_" + call.id.removeprefix("call_"),
        "type": "function_call",
        "status": "completed" if arguments is None else "in_progress",
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments if arguments is None else arguments,
    }


class Responses:
    """One response's framing. It keeps the text it streamed: the closing events repeat it whole."""

    route: ClassVar[str] = "responses"
    operation: ClassVar[str] = "chat"
    keepalive: ClassVar[bytes] = SSE_KEEPALIVE
    path: ClassVar[str] = "/v1/responses"
    error_shape: ClassVar[str] = "openai"
    endpoints: ClassVar[dict[str, str]] = {}
    # GET/DELETE /v1/responses/{id}, .../input_items, .../cancel: nothing is ever stored.
    subpath_error: ClassVar[tuple[str, str] | None] = (
        "not_stored",
        "Responses are not stored: the gateway is stateless (its replicas share no state), so no response can be"
        " retrieved, listed, cancelled or deleted; send the whole conversation in input instead of"
        " previous_response_id",
    )
    __slots__ = ("_delta", "_seq", "created_at", "custom", "id", "item_id", "message", "request", "texts")

    def __init__(self, request: ResponsesRequest) -> None:
        self.request = request
        self.custom = frozenset(t.name for t in request.tools or () if t.type == "custom")  # their calls' names
        self.id = f"resp_{random.getrandbits(128):032x}"
        self.item_id = f"msg_{random.getrandbits(128):032x}"
        self.created_at = int(time.time())
        self.texts: list[str] = []  # a stream's text so far
        self.message = ""  # a stream's message item: "" not sent yet, "open" (text flows), "done" (closed)
        self._seq = 0
        self._delta = (
            b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","item_id":"%s",'
            b'"output_index":0,"content_index":0,"logprobs":[],"delta":' % self.item_id.encode()
        )

    @classmethod
    def parse(cls, body: bytes) -> tuple[GenerationRequest, Responses]:
        request = parse_responses_request(body)
        limit = request.max_output_tokens
        generation = GenerationRequest(
            model=request.model,
            messages=_messages(request),
            max_tokens=limit if limit is not None else DEFAULT_MAX_TOKENS,
            temperature=request.temperature,
            top_p=request.top_p,
            stream=bool(request.stream),
            tooling=_tooling(request),
        )
        return generation, cls(request)

    @staticmethod
    def error_body(exc: GatewayError) -> bytes:
        return exc.body()

    # -- the objects -------------------------------------------------------------------------------

    def _part(self, text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _item(self, status: str, text: str | None) -> dict[str, Any]:
        content = [] if text is None else [self._part(text)]
        return {"id": self.item_id, "type": "message", "status": status, "role": "assistant", "content": content}

    def _response(self, gen: Generation, status: str, output: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
        """The ResponseResource: every field the specification requires, the sampling knobs Shimmy has not at
        their neutral values, what was asked for echoed."""
        r = self.request
        finished = status != "in_progress"
        fmt = msgspec.to_builtins(r.text.format) if r.text and r.text.format else {"type": "text"}
        if fmt["type"] == "json_schema":
            fmt["strict"] = bool(fmt["strict"])
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "completed_at": int(time.time()) if status == "completed" else None,
            "status": status,
            "error": fields.get("error"),
            "incomplete_details": fields.get("incomplete_details"),
            "instructions": r.instructions,
            "max_output_tokens": r.max_output_tokens,
            "max_tool_calls": None,
            "model": r.model,
            "output": output,
            "parallel_tool_calls": r.parallel_tool_calls is not False,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": False,  # whatever the client asked: nothing is stored
            "background": False,
            "service_tier": "default",
            "temperature": r.temperature if r.temperature is not None else 1.0,
            "top_p": r.top_p if r.top_p is not None else 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "top_logprobs": 0,
            "text": {"format": fmt},
            "tool_choice": msgspec.to_builtins(r.tool_choice) if r.tool_choice is not None else "auto",
            "tools": [_echo(t) for t in r.tools or ()],
            "truncation": "disabled",
            "usage": self._usage(gen) if finished else None,
            "user": r.user,
            "metadata": r.metadata or {},
            "safety_identifier": r.safety_identifier,
            "prompt_cache_key": r.prompt_cache_key,
        }

    @staticmethod
    def _usage(gen: Generation) -> dict[str, Any]:
        return {
            "input_tokens": gen.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": gen.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": gen.prompt_tokens + gen.completion_tokens,
        }

    def _ending(self, gen: Generation) -> tuple[str, dict[str, Any]]:
        """(status, the fields that go with it): a generation cut at its limit is `incomplete`."""
        if gen.stop_reason == "length":
            return "incomplete", {"incomplete_details": {"reason": "max_output_tokens"}}
        return "completed", {}

    def _output(self, gen: Generation, status: str, text: str) -> list[dict[str, Any]]:
        """The output items: the message (left out when the answer is only calls), then each call."""
        items = [self._item(status, text)] if text or not gen.calls else []
        return items + [self._call(call) for call in gen.calls]

    def _call(self, call: ToolCall) -> dict[str, Any]:
        """A call's output item: a custom_tool_call with its text input, or a function_call."""
        return _custom_item(call) if call.name in self.custom else _call_item(call)

    def render(self, gen: Generation, text: str) -> bytes:
        status, fields = self._ending(gen)
        return _encode(self._response(gen, status, self._output(gen, status, text), **fields))

    # -- the stream --------------------------------------------------------------------------------

    def _next(self, kind: str, payload: dict[str, Any]) -> bytes:
        payload["sequence_number"] = self._seq
        self._seq += 1
        return _event(kind, payload)

    def stream_start(self, gen: Generation) -> bytes:
        return self._next("response.created", {"response": self._response(gen, "in_progress", [])}) + self._next(
            "response.in_progress", {"response": self._response(gen, "in_progress", [])}
        )

    def _open_message(self) -> bytes:
        """The message item and its text part, sent with the first text (an answer of calls alone has none)."""
        if self.message:
            return b""
        self.message = "open"
        part = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        return self._next(
            "response.output_item.added", {"output_index": 0, "item": self._item("in_progress", None)}
        ) + self._next("response.content_part.added", {**part, "part": self._part("")})

    def stream_text(self, gen: Generation, pieces: list[str]) -> bytes:
        self.texts += pieces
        out = [self._open_message()]
        for piece in pieces:
            out.append(self._delta + _encode(piece) + b',"sequence_number":%d}\n\n' % self._seq)
            self._seq += 1
        return b"".join(out)

    def _close_message(self, gen: Generation) -> bytes:
        if self.message != "open":
            return b""
        self.message = "done"
        text = "".join(self.texts)
        status, _ = self._ending(gen)
        part = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        return b"".join(
            (
                self._next("response.output_text.done", {**part, "text": text, "logprobs": []}),
                self._next("response.content_part.done", {**part, "part": self._part(text)}),
                self._next("response.output_item.done", {"output_index": 0, "item": self._item(status, text)}),
            )
        )

    def stream_calls(self, gen: Generation, calls: tuple[ToolCall, ...]) -> bytes:
        """The message item (if any) closes; each call follows as a function_call item, its arguments in one
        delta."""
        out = [self._close_message(gen)]
        for index, call in enumerate(calls, start=1 if self.message else 0):
            at = {"output_index": index}
            if call.name in self.custom:
                text, item = _input(call), _custom_item(call)
                out += (
                    self._next("response.output_item.added", {**at, "item": _custom_item(call, streaming=True)}),
                    self._next("response.custom_tool_call_input.delta", {**at, "item_id": item["id"], "delta": text}),
                    self._next("response.custom_tool_call_input.done", {**at, "item_id": item["id"], "input": text}),
                    self._next("response.output_item.done", {**at, "item": item}),
                )
                continue
            args = {**at, "item_id": "fc_" + call.id.removeprefix("call_")}
            out += (
                self._next("response.output_item.added", {**at, "item": _call_item(call, arguments="")}),
                self._next("response.function_call_arguments.delta", {**args, "delta": call.arguments}),
                self._next("response.function_call_arguments.done", {**args, "arguments": call.arguments}),
                self._next("response.output_item.done", {**at, "item": _call_item(call)}),
            )
        return b"".join(out)

    def stream_end(self, gen: Generation) -> bytes:
        """The closing events; an answer with neither text nor calls still has its (empty) message, as the
        non-stream answer has."""
        text = "".join(self.texts)
        status, fields = self._ending(gen)
        opening = b"" if gen.calls else self._open_message()
        output = ([self._item(status, text)] if self.message else []) + [self._call(call) for call in gen.calls]
        return (
            opening
            + self._close_message(gen)
            + self._next(f"response.{status}", {"response": self._response(gen, status, output, **fields)})
        )

    def stream_error(self, gen: Generation, exc: GatewayError) -> bytes:
        error = {"code": exc.code or exc.type, "message": exc.message}
        output = [self._item("incomplete", "".join(self.texts))] if self.message else []
        return self._next("response.failed", {"response": self._response(gen, "failed", output, error=error)})


_SUMMARY_HEADING = "Summary of the earlier conversation:"
SUMMARY_REQUEST = (
    "Summarize the conversation so far for whoever continues it: the user's goals, what was done and decided, "
    "the facts, names and numbers that matter, and what is still open. Write only the summary."
)
SUMMARY_MAX_TOKENS = 1024  # a summary's budget (the context limit may clamp it further)


class ResponsesCompact:
    """`POST /v1/responses/compact`, stateless: the conversation in `input` becomes its user messages and one
    `compaction` item holding a summary that the model writes of the whole conversation.

    OpenAI's compaction item carries `encrypted_content`, opaque to the client. The gateway stores nothing and holds
    no key, so its `encrypted_content` is the summary in plain text: sent back as an input item (to
    `/v1/responses` or to another compaction), it becomes a system turn that opens with "Summary of the earlier
    conversation:". The answer is never streamed (OpenAI's endpoint has no `stream`)."""

    route: ClassVar[str] = "responses_compact"
    keepalive: ClassVar[bytes] = SSE_KEEPALIVE  # never streamed: the protocol asks every adapter for one
    operation: ClassVar[str] = "chat"
    path: ClassVar[str] = "/v1/responses/compact"
    error_shape: ClassVar[str] = "openai"
    endpoints: ClassVar[dict[str, str]] = {}
    subpath_error: ClassVar[tuple[str, str] | None] = None
    __slots__ = ("created_at", "id", "request")

    def __init__(self, request: CompactRequest) -> None:
        self.request = request
        self.id = f"resp_{random.getrandbits(128):032x}"
        self.created_at = int(time.time())

    @classmethod
    def parse(cls, body: bytes) -> tuple[GenerationRequest, ResponsesCompact]:
        request = parse_compact_request(body)
        generation = GenerationRequest(
            model=request.model,
            messages=[*_messages(request), Message("user", SUMMARY_REQUEST)],
            max_tokens=SUMMARY_MAX_TOKENS,
        )
        return generation, cls(request)

    @staticmethod
    def error_body(exc: GatewayError) -> bytes:
        return exc.body()

    def _kept(self) -> list[dict[str, Any]]:
        """The user messages of the input, as output items."""
        given = self.request.input
        texts = [given] if isinstance(given, str) else [i.text() for i in given or () if i.type == "message" and
                                                        (i.role or "user") == "user"]
        return [
            {"id": f"msg_{random.getrandbits(128):032x}", "type": "message", "status": "completed", "role": "user",
             "content": [{"type": "input_text", "text": text}]}
            for text in texts
        ]

    def render(self, gen: Generation, text: str) -> bytes:
        summary = {"id": f"cmp_{random.getrandbits(128):032x}", "type": "compaction", "encrypted_content": text}
        return _encode({
            "id": self.id,
            "object": "response.compaction",
            "created_at": self.created_at,
            "output": [*self._kept(), summary],
            "usage": Responses._usage(gen),
        })

    # Never called: a compaction's GenerationRequest never streams. Here for the Api protocol.
    def stream_start(self, gen: Generation) -> bytes:
        raise AssertionError("a compaction is never streamed")

    stream_end = stream_start

    def stream_text(self, gen: Generation, pieces: list[str]) -> bytes:
        raise AssertionError("a compaction is never streamed")

    def stream_calls(self, gen: Generation, calls: tuple[ToolCall, ...]) -> bytes:
        raise AssertionError("a compaction is never streamed")

    def stream_error(self, gen: Generation, exc: GatewayError) -> bytes:
        raise AssertionError("a compaction is never streamed")
