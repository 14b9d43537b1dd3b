"""Anthropic Messages (`POST /v1/messages`, `POST /v1/messages/count_tokens`): `message` objects, Anthropic's event
stream and Anthropic's error shape.

A stream sends message_start, then with the first text content_block_start, ping, content_block_delta
(text_delta)..., content_block_stop; a tool_use block per call (at index 0 when the answer is only calls: no empty
text block, which Anthropic's API would refuse when the client sends the history back); then message_delta
(stop_reason, stop_sequence, output_tokens) and message_stop. A failure after the headers is an `error` event
instead of the closing events. Errors are `{"type":"error","error":{"type":...,"message":...}}` with
Anthropic's types for the status (`error_type`); Envoy's own replies on these paths are rendered the same way by
the local-reply mappers in envoy/gateway.yaml.
"""

from __future__ import annotations

import random
from typing import Annotated, Any, ClassVar, Literal

import msgspec

from extproc.errors import GatewayError, InvalidRequest
from extproc.generation import Generation, GenerationRequest
from extproc.generation import Message as Turn
from extproc.openai_schema import (
    I32_MAX,
    MAX_CONTENT_PARTS,
    MAX_MESSAGES,
    MAX_TOKENS_LIMIT,
    MAX_TOOLS,
    decode,
    refuse,
)
from extproc.schemas import check_schemas
from extproc.stops import MAX_STOP_LENGTH, MAX_STOP_SEQUENCES, check_stops
from extproc.tools import NO_TOOLING, Tool, ToolCall, Tooling

__all__ = ["Messages", "MessagesCountTokens", "error_type"]

_encode = msgspec.json.Encoder().encode


def _json(value: Any) -> str:
    return _encode(value).decode()

_STOP_REASONS = {"end": "end_turn", "length": "max_tokens", "stop_sequence": "stop_sequence", "tool_calls": "tool_use"}
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def error_type(status: int) -> str:
    """Anthropic's error type for an HTTP status (its docs: other 4xx are invalid_request_error, 5xx api_error)."""
    return _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


class TextBlock(msgspec.Struct, tag="text", tag_field="type"):
    """Text; with tool_use and tool_result the only blocks we accept: images, documents and thinking fail decoding
    by name."""

    text: str


class ToolUseBlock(msgspec.Struct, tag="tool_use", tag_field="type"):
    """An earlier call, in an assistant message of the history."""

    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(msgspec.Struct, tag="tool_result", tag_field="type"):
    """A call's result, in a user message."""

    tool_use_id: str
    content: str | Annotated[list[TextBlock], msgspec.Meta(max_length=MAX_CONTENT_PARTS)] = ""
    is_error: bool = False

    def text(self) -> str:
        text = self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)
        return f"Error: {text}" if self.is_error else text


Block = TextBlock | ToolUseBlock | ToolResultBlock


class Message(msgspec.Struct):
    role: Literal["user", "assistant"]
    content: str | Annotated[list[Block], msgspec.Meta(max_length=MAX_CONTENT_PARTS)]

    def turns(self) -> list[Turn]:
        """The canonical turns: tool results are turns of their own (before the user's text, as Anthropic orders
        them), an assistant's tool_use blocks its calls."""
        if isinstance(self.content, str):
            return [Turn(self.role, self.content)]
        text = "".join(b.text for b in self.content if isinstance(b, TextBlock))
        calls = tuple(
            ToolCall(b.id, b.name, _json(b.input)) for b in self.content if isinstance(b, ToolUseBlock)
        )
        results = [Turn("tool", b.text()) for b in self.content if isinstance(b, ToolResultBlock)]
        if calls or self.role == "assistant":
            return [*results, Turn(self.role, text, calls)]
        return [*results, Turn(self.role, text)] if text or not results else results


class ToolDefinition(msgspec.Struct):
    name: Annotated[str, msgspec.Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    input_schema: dict[str, Any]
    description: str = ""
    type: Literal["custom"] | None = None  # server tools (web search, code execution...) fail decoding by name
    cache_control: dict[str, Any] | None = None  # accepted without effect


class ToolChoice(msgspec.Struct):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class JsonOutputFormat(msgspec.Struct, tag="json_schema", tag_field="type"):
    """Structured outputs: the answer's text is a JSON document valid against `schema`, as chat's
    `response_format: json_schema` (the same core path: `Tooling.schema`)."""

    schema: dict[str, Any]


class OutputConfig(msgspec.Struct):
    format: JsonOutputFormat | None = None
    effort: str | None = None  # accepted without effect: there is no reasoning to spend it on


class _Prompt(msgspec.Struct, kw_only=True):
    """What both endpoints read: the prompt, and the parameters refused because they would change it."""

    model: Annotated[str, msgspec.Meta(min_length=1)]
    messages: Annotated[list[Message], msgspec.Meta(min_length=1, max_length=MAX_MESSAGES)]
    system: str | Annotated[list[TextBlock], msgspec.Meta(max_length=MAX_CONTENT_PARTS)] | None = None
    tools: Annotated[list[ToolDefinition], msgspec.Meta(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    thinking: dict[str, Any] | None = None
    mcp_servers: list[Any] | None = None
    output_config: OutputConfig | None = None

    def prompt(self) -> list[Turn]:
        system = self.system if isinstance(self.system, str | None) else "".join(b.text for b in self.system)
        head = [Turn("system", system)] if system else []
        return head + [turn for m in self.messages for turn in m.turns()]

    @property
    def schema(self) -> dict[str, Any] | None:
        fmt = self.output_config.format if self.output_config is not None else None
        return fmt.schema if fmt is not None else None

    def tooling(self) -> Tooling:
        """Anthropic's tool_choice in the core's terms: any = required, tool = that tool's name; and the output
        format's schema."""
        tools = tuple(Tool(t.name, t.description, t.input_schema) for t in self.tools or ())
        choice = self.tool_choice or ToolChoice("auto")
        if not tools and self.schema is None:
            return NO_TOOLING
        name = {"auto": "auto", "any": "required", "none": "none"}.get(choice.type, choice.name or "")
        return Tooling(tools=tools, choice=name, parallel=not choice.disable_parallel_tool_use, schema=self.schema)

    def refuse_unsupported(self) -> None:
        thinking = self.thinking is not None and bool(self.thinking) and self.thinking.get("type") != "disabled"
        names = [t.name for t in self.tools or ()]
        check_schemas(
            [(f"tools[{i}].input_schema", tool.input_schema) for i, tool in enumerate(self.tools or ())]
            + [("output_config.format.schema", self.schema)]
        )
        choice = self.tool_choice
        if choice is not None and choice.type == "tool" and choice.name not in names:
            raise InvalidRequest(f"tool_choice names {choice.name!r}, which is not in tools", param="tool_choice")
        if choice is not None and choice.type == "any" and not names:
            raise InvalidRequest("tool_choice 'any' needs tools", param="tool_choice")
        refuse(
            (
                ("tools", len(set(names)) != len(names), "Tool names must be unique"),
                ("thinking", thinking, "Extended thinking is not supported"),
                ("mcp_servers", bool(self.mcp_servers), "MCP servers are not supported"),
            )
        )


class MessagesRequest(_Prompt, kw_only=True):
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS_LIMIT)]  # required, as Anthropic requires it
    stop_sequences: (
        Annotated[
            list[Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_STOP_LENGTH)]],
            msgspec.Meta(max_length=MAX_STOP_SEQUENCES),
        ]
        | None
    ) = None  # their total: `check_stops`, as every API's
    temperature: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    top_k: Annotated[int, msgspec.Meta(ge=1, le=I32_MAX)] | None = None  # sampling: honoured when sent (SDK 2.x
    stream: bool | None = None  # no longer has arguments for them; raw HTTP, older SDKs and extra_body do)
    # Accepted without effect.
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    container: Any = None


_messages = msgspec.json.Decoder(MessagesRequest)
_count = msgspec.json.Decoder(_Prompt)


def _error_body(exc: GatewayError) -> bytes:
    message = f"{exc.param}: {exc.message}" if exc.param else exc.message
    return _encode({"type": "error", "error": {"type": error_type(exc.status), "message": message}})


def _tool_use(call: ToolCall) -> dict[str, Any]:
    """A call as Anthropic's tool_use block, with an id in Anthropic's form."""
    return {"type": "tool_use", "id": "toolu_" + call.id.removeprefix("call_"), "name": call.name,
            "input": msgspec.json.decode(call.arguments)}


_PING = b'event: ping\ndata: {"type":"ping"}\n\n'  # after the first content_block_start, as Anthropic sends it


class Messages:
    """One message's framing: precomputed bytes around each text delta."""

    route: ClassVar[str] = "messages"
    operation: ClassVar[str] = "chat"
    keepalive: ClassVar[bytes] = b'event: ping\ndata: {"type":"ping"}\n\n'  # Anthropic's own keep-alive
    path: ClassVar[str] = "/v1/messages"
    error_shape: ClassVar[str] = "anthropic"
    endpoints: ClassVar[dict[str, str]] = {"/v1/messages/count_tokens": "messages_count_tokens"}
    subpath_error: ClassVar[tuple[str, str] | None] = None
    __slots__ = ("id", "model", "text")

    _DELTA = (
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":'
    )

    def __init__(self, model: str) -> None:
        self.model = model
        self.id = f"msg_{random.getrandbits(128):032x}"
        self.text = ""  # a stream's text block (index 0): "" not sent yet, "open", "done" (closed)

    @classmethod
    def parse(cls, body: bytes) -> tuple[GenerationRequest, Messages]:
        request = decode(_messages, body)
        request.refuse_unsupported()
        check_stops(request.stop_sequences or (), "stop_sequences")
        generation = GenerationRequest(
            model=request.model,
            messages=request.prompt(),
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            stops=tuple(request.stop_sequences or ()),
            stream=bool(request.stream),
            tooling=request.tooling(),
        )
        return generation, cls(request.model)

    @staticmethod
    def error_body(exc: GatewayError) -> bytes:
        return _error_body(exc)

    def _message(self, gen: Generation, content: list[dict[str, Any]], done: bool) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": _STOP_REASONS[gen.stop_reason] if done else None,
            "stop_sequence": gen.stop_sequence if done else None,
            "usage": {"input_tokens": gen.prompt_tokens, "output_tokens": gen.completion_tokens if done else 0},
        }

    def render(self, gen: Generation, text: str) -> bytes:
        content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text or not gen.calls else []
        content += [_tool_use(call) for call in gen.calls]
        return _encode(self._message(gen, content, done=True))

    def stream_start(self, gen: Generation) -> bytes:
        start = _encode({"type": "message_start", "message": self._message(gen, [], done=False)})
        return b"event: message_start\ndata: %s\n\n" % start

    def _open_text(self) -> bytes:
        """The text block, opened with the first text: an answer of calls alone has none."""
        if self.text:
            return b""
        self.text = "open"
        return (
            b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
            b'"content_block":{"type":"text","text":""}}\n\n' + _PING
        )

    def stream_text(self, gen: Generation, pieces: list[str]) -> bytes:
        delta = self._DELTA
        return self._open_text() + b"".join(delta + _encode(piece) + b"}}\n\n" for piece in pieces)

    def stream_calls(self, gen: Generation, calls: tuple[ToolCall, ...]) -> bytes:
        """The text block (if any) closes; each call is a tool_use block whose input comes as one
        input_json_delta."""
        out = [self._close_text()]
        for index, call in enumerate(calls, start=1 if self.text else 0):
            start = {"type": "content_block_start", "index": index, "content_block": {**_tool_use(call), "input": {}}}
            delta = {"type": "content_block_delta", "index": index,
                     "delta": {"type": "input_json_delta", "partial_json": call.arguments}}
            out += (
                b"event: content_block_start\ndata: %s\n\n" % _encode(start) + (b"" if index else _PING),
                b"event: content_block_delta\ndata: %s\n\n" % _encode(delta),
                b'event: content_block_stop\ndata: {"type":"content_block_stop","index":%d}\n\n' % index,
            )
        return b"".join(out)

    def _close_text(self) -> bytes:
        if self.text != "open":
            return b""
        self.text = "done"
        return b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'

    def stream_end(self, gen: Generation) -> bytes:
        delta = _encode(
            {
                "type": "message_delta",
                "delta": {"stop_reason": _STOP_REASONS[gen.stop_reason], "stop_sequence": gen.stop_sequence},
                "usage": {"output_tokens": gen.completion_tokens},
            }
        )
        opening = b"" if gen.calls else self._open_text()  # an empty answer: one empty text block, as render's
        return (
            opening
            + self._close_text()
            + b"event: message_delta\ndata: %s\n\n" % delta
            + b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
        )

    def stream_error(self, gen: Generation, exc: GatewayError) -> bytes:
        return b"event: error\ndata: %s\n\n" % _error_body(exc)


class MessagesCountTokens:
    """`POST /v1/messages/count_tokens`: the prompt's tokens, counted as a generation would count them, with no
    generation (the processor answers it itself; Shimmy never sees it)."""

    route: ClassVar[str] = "messages_count_tokens"
    error_body = staticmethod(_error_body)

    @staticmethod
    def parse(body: bytes) -> GenerationRequest:
        request = decode(_count, body)
        request.refuse_unsupported()
        return GenerationRequest(model=request.model, messages=request.prompt(), tooling=request.tooling())

    @staticmethod
    def render(input_tokens: int) -> bytes:
        return b'{"input_tokens":%d}' % input_tokens
