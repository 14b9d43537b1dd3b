"""OpenAI legacy completions (`POST /v1/completions`): `text_completion` objects and chunks.

The prompt goes to Shimmy as sent, untemplated (`GenerationRequest.prompt`), so only the client's own stop
sequences end the text early. The request schema and its refusals are `extproc.openai_schema`'s.
"""

from __future__ import annotations

import random
import time
from typing import ClassVar

import msgspec

from extproc.apis.chat import finish_reason, usage
from extproc.errors import GatewayError
from extproc.generation import SSE_KEEPALIVE, Generation, GenerationRequest
from extproc.openai_schema import parse_completion_request
from extproc.sse import DONE, encode_event
from extproc.tools import ToolCall

__all__ = ["Completions"]

_encode = msgspec.json.Encoder().encode


class Completions:
    """One legacy completion's framing: like chat's, precomputed bytes around each chunk's `choices`."""

    route: ClassVar[str] = "completions"
    operation: ClassVar[str] = "text_completion"
    keepalive: ClassVar[bytes] = SSE_KEEPALIVE
    path: ClassVar[str] = "/v1/completions"
    error_shape: ClassVar[str] = "openai"
    endpoints: ClassVar[dict[str, str]] = {}
    subpath_error: ClassVar[tuple[str, str] | None] = None
    __slots__ = ("_head", "created", "id", "include_usage", "model")

    def __init__(self, model: str, include_usage: bool = False) -> None:
        self.model = model
        self.include_usage = include_usage
        self.id = f"cmpl-{random.getrandbits(128):032x}"
        self.created = int(time.time())
        self._head = b'data: {"id":"%s","object":"text_completion","created":%d,"model":%s,"choices":' % (
            self.id.encode(),
            self.created,
            _encode(model),
        )

    @classmethod
    def parse(cls, body: bytes) -> tuple[GenerationRequest, Completions]:
        request = parse_completion_request(body)
        generation = GenerationRequest(
            model=request.model,
            prompt=request.text,
            max_tokens=request.max_tokens,
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
                "object": "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason(gen)}],
                "usage": usage(gen),
            }
        )

    def stream_start(self, gen: Generation) -> bytes:
        return b""  # no role to announce: the first chunk carries text

    def stream_text(self, gen: Generation, pieces: list[str]) -> bytes:
        head = self._head
        return b"".join(
            head + b'[{"text":%s,"index":0,"logprobs":null,"finish_reason":null}]}\n\n' % _encode(piece)
            for piece in pieces
        )

    def stream_calls(self, gen: Generation, calls: tuple[ToolCall, ...]) -> bytes:
        """Never called: a completions request offers no tools, so its answer has no calls."""
        return b""

    def stream_end(self, gen: Generation) -> bytes:
        head = self._head
        reason = finish_reason(gen).encode()
        out = head + b'[{"text":"","index":0,"logprobs":null,"finish_reason":"%s"}]}\n\n' % reason
        if self.include_usage:
            out += head + b'[],"usage":' + _encode(usage(gen)) + b"}\n\n"
        return out + DONE

    def stream_error(self, gen: Generation, exc: GatewayError) -> bytes:
        return encode_event(exc.body()) + DONE
