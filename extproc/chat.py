"""OpenAI chat completions <-> Shimmy `/api/generate`: the translation, as pure functions over bytes.

`start_chat` validates the client's body and returns Shimmy's body plus the per-request `ChatState`.
Shimmy always streams to us (see shimmy_protocol); `ChatState.relay` turns Shimmy's SSE bytes into OpenAI
`chat.completion.chunk` events as they come, and `ChatState.complete` turns a whole buffered SSE body into one
`chat.completion`. Both count one completion token per Shimmy event and enforce stop sequences.

Prompt tokens: Shimmy reports none, so `usage.prompt_tokens` is counted here by a `PromptCounter`
(`extproc.tokens`): exact with the model's GGUF vocabulary, else an estimate (UTF-8 bytes of the rendered prompt
/ 4, rounded up). `ChatState.prompt_tokens_kind` says which, for the `x-gateway-prompt-tokens` header.
"""

from __future__ import annotations

import random
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import msgspec

from extproc import templates
from extproc.errors import ModelNotFound, UpstreamError, error_json
from extproc.openai_schema import parse_chat_request
from extproc.shimmy_protocol import DEFAULT_MAX_TOKENS, DONE, ERROR_PREFIX, generate_body
from extproc.sse import DONE as SSE_DONE
from extproc.sse import SSEDecoder, SSEError, encode_event
from extproc.stops import StopMatcher
from extproc.tokens import ESTIMATE, ESTIMATED, PromptCounter, estimate_tokens

__all__ = ["ChatState", "estimate_tokens", "start_chat"]

_encode = msgspec.json.Encoder().encode


def start_chat(
    body: bytes,
    template_overrides: Mapping[str, str],
    known_models: Collection[str] | None = None,
    timeout: float = 600.0,
    aliases: Mapping[str, str] | None = None,
    *,
    counter: PromptCounter = ESTIMATE,
) -> tuple[bytes, ChatState]:
    """Validate an OpenAI request; return Shimmy's `/api/generate` body and the state for the response.

    `known_models` (when the processor has read Shimmy's list) lets an unknown model fail here, before Shimmy.
    `timeout` is the generation deadline in seconds, enforced in-band on streams (Envoy answers 504 otherwise).
    `aliases` maps names clients use (`gpt-4o-mini`) to Shimmy's; answers carry the name the client sent.
    `counter` counts the rendered prompt's tokens (Shimmy's model name); where it cannot, the estimate does.
    """
    request = parse_chat_request(body)
    model = aliases.get(request.model, request.model) if aliases else request.model
    if known_models is not None and model not in known_models:
        raise ModelNotFound(request.model)
    template = templates.template_for(model, template_overrides)
    prompt = templates.render(template, [(m.role, m.text()) for m in request.messages])
    max_tokens = request.token_limit if request.token_limit is not None else DEFAULT_MAX_TOKENS
    shimmy_body = generate_body(model, prompt, max_tokens, request.temperature, request.top_p, request.top_k)
    prompt_tokens, prompt_tokens_kind = counter.count(model, prompt), counter.kind
    if prompt_tokens is None:
        prompt_tokens, prompt_tokens_kind = estimate_tokens(prompt), ESTIMATED
    state = ChatState(
        model=request.model,
        stream=bool(request.stream),
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
        max_tokens=max_tokens,
        prompt_tokens=prompt_tokens,
        prompt_tokens_kind=prompt_tokens_kind,
        stops=StopMatcher(request.stop_sequences + templates.STOP_MARKERS[template]),
        deadline=time.monotonic() + timeout,
    )
    return shimmy_body, state


def _chunk_framing(completion_id: str, created: int, model: str) -> tuple[bytes, bytes]:
    """Precomputed bytes around a chunk's `choices`, so a token costs one string encode and a join."""
    head = b'data: {"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s,"choices":' % (
        completion_id.encode(),
        created,
        _encode(model),
    )
    return head, b"}\n\n"


@dataclass(slots=True)
class ChatState:
    """Everything one chat request needs between Shimmy's first byte and its last."""

    model: str  # as the client asked; every response carries it back
    stream: bool
    include_usage: bool
    max_tokens: int  # sent to Shimmy explicitly; reaching it means finish_reason "length"
    prompt_tokens: int  # counted by the PromptCounter, see module docstring
    stops: StopMatcher  # client's stop sequences plus the template's end-of-turn markers
    deadline: float  # time.monotonic() after which a stream ends with an in-band timeout error
    prompt_tokens_kind: str = ESTIMATED  # "exact" or "estimated": the x-gateway-prompt-tokens header value
    completion_tokens: int = 0  # one per Shimmy SSE event, counted until a stop sequence cuts the text
    upstream_done: bool = False  # Shimmy sent [DONE]; without it the stream was cut short
    error: str | None = None  # Shimmy's [ERROR] text, or our reason the stream is unusable
    started: bool = False  # the role chunk went out
    first_content_at: float | None = None  # time.monotonic() of the first content token sent (time to first token)
    finished: bool = False  # the final chunk and [DONE] went out; later bytes are dropped
    failure: str | None = None  # code of the in-band error that ended the stream, if one did
    sse: SSEDecoder = field(default_factory=SSEDecoder)
    # Unique, not secret: 128 random bits without uuid4's getrandom() system call per request.
    id: str = field(default_factory=lambda: f"chatcmpl-{random.getrandbits(128):032x}")
    created: int = field(default_factory=lambda: int(time.time()))
    _head: bytes = field(init=False, repr=False)  # chunk bytes before `choices`, built once per stream
    _tail: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._head, self._tail = _chunk_framing(self.id, self.created, self.model)

    # -- shared by both response forms ------------------------------------------------------------

    def _take(self, events: list[str]) -> list[str]:
        """Apply Shimmy's events to the state; return the text pieces that may be emitted, in order."""
        out: list[str] = []
        for data in events:
            if self.upstream_done or self.error is not None:
                break
            if data == DONE:
                self.upstream_done = True
            elif data.startswith(ERROR_PREFIX):
                self.error = data[len(ERROR_PREFIX) :].strip() or "generation failed"
            elif not self.stops.stopped:
                self.completion_tokens += 1
                piece = self.stops.feed(data)
                if piece:
                    out.append(piece)
        return out

    def _decode(self, data: bytes, end: bool) -> list[str]:
        try:
            events = self.sse.feed(data)
            if end:
                events += self.sse.flush()
        except SSEError as exc:
            self.error = f"unreadable stream from Shimmy: {exc}"
            return []
        return events

    @property
    def finish_reason(self) -> str:
        if self.stops.stopped:
            return "stop"
        return "length" if self.completion_tokens >= self.max_tokens else "stop"

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    # -- non-stream ------------------------------------------------------------------------------

    def complete(self, body: bytes) -> bytes:
        """A whole buffered Shimmy SSE body -> one `chat.completion` JSON document."""
        pieces = self._take(self._decode(body, end=True))
        if self.error is not None:
            raise UpstreamError(f"Shimmy failed during generation: {self.error}", code="generation_failed")
        if not self.upstream_done:
            raise UpstreamError("Shimmy's stream ended before [DONE]", code="upstream_truncated")
        pieces.append(self.stops.flush())
        return _encode(
            {
                "id": self.id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(pieces)},
                        "logprobs": None,
                        "finish_reason": self.finish_reason,
                    }
                ],
                "usage": self.usage(),
            }
        )

    # -- stream ----------------------------------------------------------------------------------

    def _stream_failure(self, end: bool) -> tuple[str, str, None, str] | None:
        """The in-band error that ends this stream now, if any: (message, type, param, code)."""
        if self.error is not None:
            return f"Shimmy failed during generation: {self.error}", "server_error", None, "generation_failed"
        if end and not self.upstream_done:
            return "Shimmy's stream ended before [DONE]", "server_error", None, "generation_failed"
        if not self.upstream_done and not self.stops.stopped and time.monotonic() > self.deadline:
            return "The generation took longer than the gateway allows", "server_error", None, "timeout"
        return None

    def relay(self, data: bytes, end: bool) -> bytes:
        """Shimmy's SSE bytes (one body chunk) -> OpenAI SSE bytes to send now (possibly empty)."""
        if self.finished:
            return b""
        pieces = self._take(self._decode(data, end))
        head, tail = self._head, self._tail
        out: list[bytes] = []
        if not self.started:
            self.started = True
            out.append(head + b'[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]' + tail)
        if pieces and self.first_content_at is None:
            self.first_content_at = time.monotonic()
        for piece in pieces:
            out.append(head + b'[{"index":0,"delta":{"content":%s},"finish_reason":null}]' % _encode(piece) + tail)
        failure = self._stream_failure(end)
        if failure is not None:
            self.failure = failure[3]
            out.append(encode_event(error_json(*failure)))
            out.append(SSE_DONE)
            self.finished = True
        elif self.upstream_done or self.stops.stopped:
            held = self.stops.flush()
            if held:
                out.append(head + b'[{"index":0,"delta":{"content":%s},"finish_reason":null}]' % _encode(held) + tail)
            finish = b'[{"index":0,"delta":{},"finish_reason":"%s"}]' % self.finish_reason.encode()
            out.append(head + finish + tail)
            if self.include_usage:
                out.append(head + b'[],"usage":' + _encode(self.usage()) + tail)
            out.append(SSE_DONE)
            self.finished = True
        return b"".join(out)
