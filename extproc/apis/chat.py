"""OpenAI chat completions (`POST /v1/chat/completions`): `chat.completion` objects and `chat.completion.chunk`
events. The request schema and its refusals are `extproc.openai_schema`'s."""

from __future__ import annotations

import random
import time
from typing import ClassVar

import msgspec

from extproc.errors import GatewayError
from extproc.generation import SSE_KEEPALIVE, Generation, GenerationRequest, Message
from extproc.openai_schema import (
    ChatRequest,
    JsonObjectFormat,
    JsonSchemaFormat,
    NamedToolChoice,
    parse_chat_request,
)
from extproc.shimmy_protocol import DEFAULT_MAX_TOKENS
from extproc.sse import DONE, encode_event
from extproc.tools import NO_TOOLING, Tool, ToolCall, Tooling

__all__ = ["ChatCompletions", "finish_reason", "usage"]

_encode = msgspec.json.Encoder().encode


_FINISH_REASONS = {"end": "stop", "stop_sequence": "stop", "length": "length", "tool_calls": "tool_calls"}


def finish_reason(gen: Generation) -> str:
    """OpenAI's finish_reason (chat and legacy completions): a stop sequence is "stop" too."""
    return _FINISH_REASONS[gen.stop_reason]


def _messages(request: ChatRequest) -> list[Message]:
    return [
        Message(
            m.role,
            m.text(),
            tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in m.tool_calls or ()),
        )
        for m in request.messages
    ]


def _tooling(request: ChatRequest) -> Tooling:
    fmt = request.response_format
    schema = None
    if isinstance(fmt, JsonSchemaFormat):
        schema = fmt.json_schema.schema or {}
    elif isinstance(fmt, JsonObjectFormat):
        schema = {}
    if not request.tools and schema is None:
        return NO_TOOLING
    choice = request.tool_choice
    return Tooling(
        tools=tuple(
            Tool(t.function.name, t.function.description, t.function.parameters or {"type": "object"})
            for t in request.tools or ()
        ),
        choice=choice.function.name if isinstance(choice, NamedToolChoice) else choice or "auto",
        parallel=request.parallel_tool_calls is not False,
        schema=schema,
    )


def _call(call: ToolCall) -> dict[str, object]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def usage(gen: Generation) -> dict[str, int]:
    """OpenAI's usage object (chat and legacy completions)."""
    return {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": gen.completion_tokens,
        "total_tokens": gen.prompt_tokens + gen.completion_tokens,
    }


class ChatCompletions:
    """One chat completion's framing. A chunk is precomputed bytes around its `choices`, so a token costs one
    string encode and a join."""

    route: ClassVar[str] = "chat"
    operation: ClassVar[str] = "chat"
    keepalive: ClassVar[bytes] = SSE_KEEPALIVE
    path: ClassVar[str] = "/v1/chat/completions"
    error_shape: ClassVar[str] = "openai"
    endpoints: ClassVar[dict[str, str]] = {}
    subpath_error: ClassVar[tuple[str, str] | None] = None
    __slots__ = ("_head", "_tail", "created", "id", "include_usage", "model")

    def __init__(self, model: str, include_usage: bool = False) -> None:
        self.model = model  # as the client named it
        self.include_usage = include_usage
        # Unique, not secret: 128 random bits without uuid4's getrandom() system call per request.
        self.id = f"chatcmpl-{random.getrandbits(128):032x}"
        self.created = int(time.time())
        self._head = b'data: {"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s,"choices":' % (
            self.id.encode(),
            self.created,
            _encode(model),
        )
        self._tail = b"}\n\n"

    @classmethod
    def parse(cls, body: bytes) -> tuple[GenerationRequest, ChatCompletions]:
        """Validate an OpenAI chat request (InvalidRequest naming the param if it is not one we can serve)."""
        request = parse_chat_request(body)
        limit = request.token_limit
        generation = GenerationRequest(
            model=request.model,
            messages=_messages(request),
            max_tokens=limit if limit is not None else DEFAULT_MAX_TOKENS,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            stops=request.stop_sequences,
            stream=bool(request.stream),
            tooling=_tooling(request),
        )
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return generation, cls(request.model, include_usage)

    @staticmethod
    def error_body(exc: GatewayError) -> bytes:
        return exc.body()

    def render(self, gen: Generation, text: str) -> bytes:
        message: dict[str, object] = {"role": "assistant", "content": text, "refusal": None}
        if gen.calls:
            message["content"] = text or None
            message["tool_calls"] = [_call(c) for c in gen.calls]
        return _encode(
            {
                "id": self.id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.model,
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": finish_reason(gen),
                    }
                ],
                "usage": usage(gen),
            }
        )

    def stream_start(self, gen: Generation) -> bytes:
        return self._head + b'[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]' + self._tail

    def stream_text(self, gen: Generation, pieces: list[str]) -> bytes:
        head, tail = self._head, self._tail
        return b"".join(
            head + b'[{"index":0,"delta":{"content":%s},"finish_reason":null}]' % _encode(piece) + tail
            for piece in pieces
        )

    def stream_calls(self, gen: Generation, calls: tuple[ToolCall, ...]) -> bytes:
        """Each call as OpenAI streams one: id and name first, then the arguments."""
        head, tail = self._head, self._tail
        out = []
        for i, call in enumerate(calls):
            opening = {"index": i, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
            arguments = {"index": i, "function": {"arguments": call.arguments}}
            for delta in (opening, arguments):
                choice = {"index": 0, "delta": {"tool_calls": [delta]}, "finish_reason": None}
                out.append(head + b"[" + _encode(choice) + b"]" + tail)
        return b"".join(out)

    def stream_end(self, gen: Generation) -> bytes:
        head, tail = self._head, self._tail
        out = head + b'[{"index":0,"delta":{},"finish_reason":"%s"}]' % finish_reason(gen).encode() + tail
        if self.include_usage:
            out += head + b'[],"usage":' + _encode(usage(gen)) + tail
        return out + DONE

    def stream_error(self, gen: Generation, exc: GatewayError) -> bytes:
        return encode_event(exc.body()) + DONE
