"""Anthropic Messages (`POST /v1/messages`, `POST /v1/messages/count_tokens`): `message` objects, Anthropic's event
stream and Anthropic's error shape.

A stream sends message_start, content_block_start, ping, content_block_delta (text_delta)..., content_block_stop,
message_delta (stop_reason, stop_sequence, output_tokens) and message_stop; a failure after the headers is an
`error` event instead of the last three. Errors are `{"type":"error","error":{"type":...,"message":...}}` with
Anthropic's types for the status (`error_type`); Envoy's own replies on these paths are rendered the same way by
the local-reply mappers in envoy/gateway.yaml.
"""

from __future__ import annotations

import random
from typing import Annotated, Any, ClassVar, Literal

import msgspec

from extproc.errors import GatewayError
from extproc.generation import Generation, GenerationRequest
from extproc.openai_schema import I32_MAX, MAX_TOKENS_LIMIT, decode, refuse

__all__ = ["Messages", "MessagesCountTokens", "error_type"]

_encode = msgspec.json.Encoder().encode

MAX_STOP_SEQUENCES = 16  # Anthropic sets none; each one costs the stop matcher work on every token

_STOP_REASONS = {"end": "end_turn", "length": "max_tokens", "stop_sequence": "stop_sequence"}
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
    """The only content block we accept; images, documents, tool use and thinking fail decoding by name."""

    text: str


class Message(msgspec.Struct):
    role: Literal["user", "assistant"]
    content: str | list[TextBlock]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)


class _Prompt(msgspec.Struct, kw_only=True):
    """What both endpoints read: the prompt, and the parameters refused because they would change it."""

    model: Annotated[str, msgspec.Meta(min_length=1)]
    messages: Annotated[list[Message], msgspec.Meta(min_length=1)]
    system: str | list[TextBlock] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    thinking: dict[str, Any] | None = None
    mcp_servers: list[Any] | None = None
    output_config: dict[str, Any] | None = None  # `effort` accepted without effect; `format` refused

    def prompt(self) -> list[tuple[str, str]]:
        system = self.system if isinstance(self.system, str | None) else "".join(b.text for b in self.system)
        head = [("system", system)] if system else []
        return head + [(m.role, m.text()) for m in self.messages]

    def refuse_unsupported(self) -> None:
        no_tools = self.tool_choice not in (None, {"type": "none"}, {"type": "auto"})
        thinking = bool(self.thinking) and self.thinking.get("type") != "disabled"
        refuse(
            (
                ("tools", bool(self.tools), "Tool use is not supported"),
                ("tool_choice", no_tools, "Tool use is not supported"),
                ("thinking", thinking, "Extended thinking is not supported"),
                ("mcp_servers", bool(self.mcp_servers), "MCP servers are not supported"),
                ("output_config.format", bool(self.output_config and self.output_config.get("format")),
                 "Structured outputs are not supported"),
            )
        )


class MessagesRequest(_Prompt, kw_only=True):
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS_LIMIT)]  # required, as Anthropic requires it
    stop_sequences: (
        Annotated[list[Annotated[str, msgspec.Meta(min_length=1)]], msgspec.Meta(max_length=MAX_STOP_SEQUENCES)]
        | None
    ) = None
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


class Messages:
    """One message's framing: precomputed bytes around each text delta."""

    route: ClassVar[str] = "messages"
    __slots__ = ("id", "model")

    _DELTA = (
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":'
    )

    def __init__(self, model: str) -> None:
        self.model = model
        self.id = f"msg_{random.getrandbits(128):032x}"

    @classmethod
    def parse(cls, body: bytes) -> tuple[GenerationRequest, Messages]:
        request = decode(_messages, body)
        request.refuse_unsupported()
        generation = GenerationRequest(
            model=request.model,
            messages=request.prompt(),
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            stops=tuple(request.stop_sequences or ()),
            stream=bool(request.stream),
        )
        return generation, cls(request.model)

    error_body = staticmethod(_error_body)

    def _message(self, gen: Generation, content: list[dict[str, str]], done: bool) -> dict[str, Any]:
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
        return _encode(self._message(gen, [{"type": "text", "text": text}], done=True))

    def stream_start(self, gen: Generation) -> bytes:
        start = _encode({"type": "message_start", "message": self._message(gen, [], done=False)})
        return (
            b"event: message_start\ndata: %s\n\n" % start
            + b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
            b'"content_block":{"type":"text","text":""}}\n\n'
            b'event: ping\ndata: {"type":"ping"}\n\n'
        )

    def stream_text(self, gen: Generation, pieces: list[str]) -> bytes:
        delta = self._DELTA
        return b"".join(delta + _encode(piece) + b"}}\n\n" for piece in pieces)

    def stream_end(self, gen: Generation) -> bytes:
        delta = _encode(
            {
                "type": "message_delta",
                "delta": {"stop_reason": _STOP_REASONS[gen.stop_reason], "stop_sequence": gen.stop_sequence},
                "usage": {"output_tokens": gen.completion_tokens},
            }
        )
        return (
            b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
            b"event: message_delta\ndata: %s\n\n" % delta
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
        return GenerationRequest(model=request.model, messages=request.prompt())

    @staticmethod
    def render(input_tokens: int) -> bytes:
        return b'{"input_tokens":%d}' % input_tokens
