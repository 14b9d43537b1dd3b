"""OpenAI chat completions (`POST /v1/chat/completions`): `chat.completion` objects and `chat.completion.chunk`
events. The request schema and its refusals are `extproc.openai_schema`'s."""

from __future__ import annotations

import random
import time
from typing import ClassVar

import msgspec

from extproc.errors import GatewayError
from extproc.generation import Generation, GenerationRequest
from extproc.openai_schema import parse_chat_request
from extproc.shimmy_protocol import DEFAULT_MAX_TOKENS
from extproc.sse import DONE, encode_event

__all__ = ["ChatCompletions", "finish_reason", "usage"]

_encode = msgspec.json.Encoder().encode


def finish_reason(gen: Generation) -> str:
    """OpenAI's finish_reason (chat and legacy completions): a stop sequence is "stop" too."""
    return "length" if gen.stop_reason == "length" else "stop"


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
            messages=[(m.role, m.text()) for m in request.messages],
            max_tokens=limit if limit is not None else DEFAULT_MAX_TOKENS,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            stops=request.stop_sequences,
            stream=bool(request.stream),
        )
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return generation, cls(request.model, include_usage)

    @staticmethod
    def error_body(exc: GatewayError) -> bytes:
        return exc.body()

    def render(self, gen: Generation, text: str) -> bytes:
        return _encode(
            {
                "id": self.id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text, "refusal": None},
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

    def stream_end(self, gen: Generation) -> bytes:
        head, tail = self._head, self._tail
        out = head + b'[{"index":0,"delta":{},"finish_reason":"%s"}]' % finish_reason(gen).encode() + tail
        if self.include_usage:
            out += head + b'[],"usage":' + _encode(usage(gen)) + tail
        return out + DONE

    def stream_error(self, gen: Generation, exc: GatewayError) -> bytes:
        return encode_event(exc.body()) + DONE
