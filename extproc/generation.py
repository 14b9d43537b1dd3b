"""The generation core: one Shimmy generation, whatever API the client speaks.

Every client API (`extproc.apis`) parses its request into a `GenerationRequest` and frames the answer; everything
between is here, once: the rendered prompt, the limits, the Shimmy body, decoding Shimmy's SSE, counting completion
tokens, stop sequences, the deadline, the stop reason and the failures. `start` returns Shimmy's body and an
`Exchange`, which the processor feeds Shimmy's bytes and which answers with the client's bytes.

    GenerationRequest   what the client asked for, API-neutral (messages or a raw prompt, limits, sampling, stops,
                        tools and output schema)
    Generation          the running generation: tokens counted, text released past stop sequences and tool calls,
                        how it ended
    Api                 an adapter's side of the contract: render a whole answer, frame a stream, shape an error
    Exchange            a Generation framed by its Api: `complete` for a buffered answer, `relay` for a stream

Shimmy streams to us (see shimmy_protocol): one event per engine token is the only exact completion count it
offers. Except where the backend profile says a stream swallows failures (1.x): there a non-stream client's
generation is asked for in one piece, so Shimmy's 502 tells a failure, and its completion is counted by tokenizing
the answer (`Generation.completion_tokens_kind`). Prompt tokens: Shimmy reports none, so they are counted here by a
`PromptCounter` (`extproc.tokens`): exact with the model's GGUF vocabulary, else estimated
(`Generation.prompt_tokens_kind` says which), and checked against the model's context (`extproc.limits`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Protocol

from extproc import templates
from extproc.errors import GatewayError, ModelNotFound, Timeout, UpstreamError
from extproc.limits import ESTIMATE_MARGIN, ContextLimits
from extproc.shimmy_protocol import DEFAULT_MAX_TOKENS, DONE, ERROR_PREFIX, generate_body, response_text
from extproc.sse import SSEDecoder, SSEError
from extproc.stops import StopMatcher
from extproc.tokens import ESTIMATE, ESTIMATED, EXACT, PromptCounter, estimate_tokens
from extproc.tools import NO_TOOLING, CallDetector, ToolCall, Tooling, parse_output, to_turns
from shimmy_spec.versions import BackendProfile

__all__ = [
    "SSE_KEEPALIVE",
    "TIMEOUT_MESSAGE",
    "Api",
    "Exchange",
    "Generation",
    "GenerationRequest",
    "Message",
    "StopReason",
    "count_prompt",
    "start",
]

TIMEOUT_MESSAGE = "The generation took longer than the gateway allows"
SSE_KEEPALIVE = b": keep-alive\n\n"  # an SSE comment: every client skips it, every proxy sees traffic

StopReason = Literal["end", "length", "stop_sequence", "tool_calls"]
"""How a generation ended: the model ended its turn, it reached `max_tokens`, a client stop sequence matched, or
the model called tools (its answer is the calls)."""


@dataclass(frozen=True, slots=True)
class Message:
    """One turn of the conversation; an assistant turn may carry the tool calls it made."""

    role: str  # system, developer, user, assistant or tool
    text: str = ""
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """What the client asked for, in no API's terms."""

    model: str  # as the client named it (an alias, maybe); answers carry it back
    messages: Sequence[Message] = ()  # rendered with the model's template
    prompt: str | None = None  # a raw prompt, sent untemplated (legacy completions) instead of `messages`
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stops: tuple[str, ...] = ()  # the client's stop sequences; the template's end-of-turn markers are added here
    stream: bool = False
    tooling: Tooling = NO_TOOLING  # tools offered and how they must be used, or a schema the answer must meet


@dataclass(slots=True)
class Generation:
    """Everything one generation needs between Shimmy's first byte and its last."""

    model: str  # as the client asked
    stream: bool
    max_tokens: int  # sent to Shimmy explicitly; reaching it means the stop reason "length"
    prompt_tokens: int
    stops: StopMatcher  # the client's stop sequences plus the template's end-of-turn markers
    client_stops: frozenset[str]  # which of those the client sent: a match is "stop_sequence", not "end"
    deadline: float  # time.monotonic() after which a stream ends with an in-band timeout error
    prompt_tokens_kind: str = ESTIMATED  # "exact" or "estimated": the x-gateway-prompt-tokens header value
    completion_tokens: int = 0  # one per Shimmy SSE event, counted until a stop sequence cuts the text
    upstream_done: bool = False  # Shimmy sent [DONE]; without it the stream was cut short
    upstream_failed: bool = False  # Shimmy sent [ERROR]: its generation is over too
    error: str | None = None  # Shimmy's [ERROR] text, or our reason the stream is unusable
    first_content_at: float | None = None  # time.monotonic() of the first text released (time to first token)
    tooling: Tooling = NO_TOOLING
    calls: tuple[ToolCall, ...] = ()  # the tool calls read from the output, once it is whole
    sse: SSEDecoder = field(default_factory=SSEDecoder)
    upstream_stream: bool = True  # Shimmy streams; False: one `{"response": ...}` body (1.x, non-stream client)
    completion_tokens_kind: str = EXACT  # the x-gateway-completion-tokens header value: one-piece answers are counted
    counter: PromptCounter = ESTIMATE  # counts a one-piece answer's tokens
    shimmy_model: str = ""  # Shimmy's name of the model (`model` is the client's), for the counter

    def feed(self, data: bytes, end: bool) -> list[str]:
        """Shimmy's SSE bytes -> the text pieces that may be released now, in order."""
        try:
            events = self.sse.feed(data)
            if end:
                events += self.sse.flush()
        except SSEError as exc:
            self.error = f"unreadable stream from Shimmy: {exc}"
            return []
        out: list[str] = []
        stops = self.stops
        for event in events:
            if self.upstream_done or self.error is not None:
                break
            if event == DONE:
                self.upstream_done = True
            elif event.startswith(ERROR_PREFIX):
                self.error = event[len(ERROR_PREFIX) :].strip() or "generation failed"
                self.upstream_failed = True
            elif not stops.stopped:
                self.completion_tokens += 1
                piece = stops.feed(event)
                if piece:
                    out.append(piece)
        if out and self.first_content_at is None:
            self.first_content_at = time.monotonic()
        return out

    def flush(self) -> str:
        """At the end: text held back because it might have begun a stop sequence, and did not."""
        return self.stops.flush()

    @property
    def done(self) -> bool:
        """Nothing more will be released: Shimmy finished, or a stop sequence ended the answer."""
        return self.upstream_done or self.stops.stopped

    def failure(self, end: bool) -> GatewayError | None:
        """The failure that ends this generation now, if any. `end`: Shimmy's response is over."""
        if self.error is not None:
            return UpstreamError(f"Shimmy failed during generation: {self.error}", code="generation_failed")
        if end and not self.done:
            return UpstreamError("Shimmy's stream ended before [DONE]", code="generation_failed")
        if not self.done and time.monotonic() > self.deadline:
            return Timeout(TIMEOUT_MESSAGE)
        return None

    @property
    def stop_reason(self) -> StopReason:
        if self.calls:
            return "tool_calls"
        if self.stops.stopped:
            return "stop_sequence" if self.stops.matched in self.client_stops else "end"
        return "length" if self.completion_tokens >= self.max_tokens else "end"

    @property
    def stop_sequence(self) -> str | None:
        """The client's stop sequence that ended the answer, if one did."""
        return self.stops.matched if self.stop_reason == "stop_sequence" else None

    def answer(self, text: str) -> str:
        """The whole output -> the answer's content, its tool calls read into `calls` where the request offered
        tools or asked for a schema; OutputError if the output fails what the request demands."""
        if not self.tooling.active:
            return text
        parsed = parse_output(text, self.tooling)
        self.calls = parsed.calls
        return parsed.text

    def whole(self, body: bytes) -> str:
        """A one-piece answer: stop sequences cut its text afterwards (Shimmy cannot end early on them), and its
        tokens are counted up to the end of the stop sequence that matched, as the stream would have counted them.

        The count never exceeds `max_tokens`, and reaching it is what makes the stop reason "length". Without the
        model's vocabulary the count is an estimate, and the stop reason errs towards "length": an answer whose
        estimate, raised by the prompt check's margin, reaches `max_tokens` may have been cut, and is reported as
        cut (at `max_tokens` tokens), so that a client that checks for truncation is never told a cut answer ended.
        """
        generated = response_text(body)
        stops = self.stops
        text = stops.feed(generated) + stops.flush()
        cut_by_stop = stops.stopped and stops.matched is not None
        if cut_by_stop:
            generated = generated[: len(text) + len(stops.matched or "")]
        count, kind = self.counter.count_text(self.shimmy_model, generated), self.counter.kind
        if count is None:
            count, kind = estimate_tokens(generated), ESTIMATED
        if kind == ESTIMATED and not cut_by_stop and math.ceil(count * ESTIMATE_MARGIN) >= self.max_tokens:
            count = self.max_tokens
        self.completion_tokens, self.completion_tokens_kind = min(count, self.max_tokens), kind
        self.upstream_done = True  # no first_content_at: a whole answer has no time to first token
        return text


class Api(Protocol):
    """One client API's adapter, one instance per request. Its module parses the request (`parse`) and this side
    renders: the framing bytes are the adapter's, what they say comes from the `Generation`."""

    route: ClassVar[str]  # Envoy's x-gateway-route value; also the `api` label of metrics and the access log
    operation: ClassVar[str]  # the GenAI conventions' gen_ai.operation.name: "chat" or "text_completion"
    # What Envoy's routes are rendered from (gateway/envoy_config.py): the client's POST path; the error shape of
    # Envoy's own replies on it ("openai" or "anthropic", rendered by `error_body`); other POST paths answered by
    # the processor from the body alone (path -> x-gateway-route); the 404 (code, message) of other subpaths.
    path: ClassVar[str]
    error_shape: ClassVar[str]
    endpoints: ClassVar[dict[str, str]]
    subpath_error: ClassVar[tuple[str, str] | None]
    keepalive: ClassVar[bytes]  # what a stream sends while Shimmy is silent: an SSE comment, Anthropic's ping

    @classmethod
    def parse(cls, body: bytes) -> tuple[GenerationRequest, Api]:
        """Validate the client's body (GatewayError naming the param if it cannot be served)."""
        ...

    @staticmethod
    def error_body(exc: GatewayError) -> bytes:
        """`exc` in this API's error shape (the status is `exc.status`)."""
        ...

    def render(self, gen: Generation, text: str) -> bytes:
        """The whole non-stream answer."""
        ...

    def stream_start(self, gen: Generation) -> bytes:
        """What a stream sends before any text (a role chunk, message_start, response.created)."""
        ...

    def stream_text(self, gen: Generation, pieces: list[str]) -> bytes:
        """Text deltas."""
        ...

    def stream_calls(self, gen: Generation, calls: tuple[ToolCall, ...]) -> bytes:
        """The tool calls, whole (they are parsed once the output is complete), in the API's call deltas."""
        ...

    def stream_end(self, gen: Generation) -> bytes:
        """The stream's successful end: stop reason, usage, the terminator."""
        ...

    def stream_error(self, gen: Generation, exc: GatewayError) -> bytes:
        """An in-band error that ends the stream (headers are long gone)."""
        ...


@dataclass(slots=True)
class Exchange:
    """A Generation framed by its API: what the processor feeds Shimmy's bytes and answers the client with."""

    gen: Generation
    api: Api
    started: bool = False  # the stream's opening went out
    finished: bool = False  # the stream's end went out; later bytes are dropped
    failure: str | None = None  # code of the failure that ended the stream, if one did
    pieces: list[str] = field(default_factory=list)  # a non-stream answer's text so far (`collect`)
    chunks: list[bytes] = field(default_factory=list)  # a one-piece answer's body so far (`collect`, 1.x)
    detector: CallDetector | None = None  # streams whose output is read back: holds what may be a call

    def __post_init__(self) -> None:
        if self.gen.stream and self.gen.tooling.active:
            self.detector = CallDetector(self.gen.tooling)

    def complete(self, body: bytes) -> bytes:
        """Shimmy's whole body at once (a BUFFERED response) -> the API's answer; GatewayError as `collect`."""
        answer = self.collect(body, end=True)
        assert answer is not None  # at the end, collect answers or raises
        return answer

    def collect(self, data: bytes, end: bool) -> bytes | None:
        """A non-stream answer fed Shimmy's bytes chunk by chunk: the whole answer as soon as it is complete
        (Shimmy's `[DONE]`, or a stop sequence: Shimmy's later tokens are not waited for), else None.
        GatewayError if Shimmy failed, its stream ended short, or the deadline passed."""
        if self.finished:
            return None
        gen = self.gen
        if not gen.upstream_stream:  # a one-piece answer (1.x): nothing to read until Shimmy has sent it all
            self.chunks.append(data)
            if not end:
                return None
            self.finished = True
            return self._render(lambda: gen.whole(b"".join(self.chunks)))
        self.pieces += gen.feed(data, end)
        failure = gen.failure(end)
        if failure is not None:
            if failure.code == "generation_failed" and gen.error is None:
                failure.code = "upstream_truncated"
            self.finished, self.failure = True, failure.code or failure.type
            raise failure
        if not gen.done:
            return None
        self.finished = True
        self.pieces.append(gen.flush())
        return self._render(lambda: "".join(self.pieces))

    def _render(self, output: Callable[[], str]) -> bytes:
        """The whole answer from the whole output; a failure reading it (Shimmy's, or the output's) is recorded."""
        try:
            return self.api.render(self.gen, self.gen.answer(output()))
        except GatewayError as exc:
            self.failure = exc.code or exc.type
            raise

    def keepalive(self) -> bytes:
        """Bytes that keep a stream alive while Shimmy is silent (a slow prefill): the stream's opening if it has
        not gone out yet (every other event must follow it), else the API's keep-alive."""
        if self.finished:
            return b""
        if not self.started:
            self.started = True
            return self.api.stream_start(self.gen)
        return self.api.keepalive

    def expire(self) -> GatewayError:
        """The deadline passed while Shimmy was silent: the exchange ends with the timeout, nothing more is sent."""
        exc = Timeout(TIMEOUT_MESSAGE)
        self.finished, self.failure = True, exc.code or exc.type
        return exc

    def expire_stream(self) -> bytes:
        """The stream's end at the deadline: the API's in-band error event (after its opening, if still due)."""
        opening = b"" if self.started else self.api.stream_start(self.gen)
        self.started = True
        return opening + self.api.stream_error(self.gen, self.expire())

    def relay(self, data: bytes, end: bool) -> bytes:
        """Shimmy's SSE bytes (one body chunk) -> the client's stream bytes to send now (possibly empty)."""
        if self.finished:
            return b""
        gen, api, detector = self.gen, self.api, self.detector
        pieces = gen.feed(data, end)
        if detector is not None:
            pieces = [text for text in map(detector.feed, pieces) if text]
        out: list[bytes] = []
        if not self.started:
            self.started = True
            out.append(api.stream_start(gen))
        if pieces:
            out.append(api.stream_text(gen, pieces))
        failure = gen.failure(end)
        if failure is None and gen.done:
            try:
                out += self._last_text(gen.flush())
            except GatewayError as exc:
                failure = exc
        if failure is not None:
            self.failure = failure.code or failure.type
            out.append(api.stream_error(gen, failure))
            self.finished = True
        elif gen.done:
            out.append(api.stream_end(gen))
            self.finished = True
        return b"".join(out)

    def _last_text(self, held: str) -> list[bytes]:
        """The stream's last content once the output is whole: held-back text, or the calls read from it."""
        gen, api, detector = self.gen, self.api, self.detector
        if detector is None:
            return [api.stream_text(gen, [held])] if held else []
        released = detector.feed(held) if held else ""
        parsed = parse_output(detector.finish(), gen.tooling)
        gen.calls = parsed.calls
        out = [api.stream_text(gen, [text]) for text in (released, parsed.text) if text]
        if parsed.calls:
            out.append(api.stream_calls(gen, parsed.calls))
        return out


def start(
    request: GenerationRequest,
    api: Api,
    template_overrides: Mapping[str, str],
    known_models: Collection[str] | None = None,
    timeout: float = 600.0,
    aliases: Mapping[str, str] | None = None,
    *,
    counter: PromptCounter = ESTIMATE,
    profile: BackendProfile | None = None,
    limits: ContextLimits | None = None,
) -> tuple[bytes, Exchange]:
    """Shimmy's `/api/generate` body for `request`, and the Exchange that answers it through `api`.

    `known_models` (when the processor has read Shimmy's list) lets an unknown model fail here, before Shimmy.
    `timeout` is the generation deadline in seconds, enforced in-band on streams (Envoy answers 504 otherwise).
    `aliases` maps names clients use (`gpt-4o-mini`) to Shimmy's; answers carry the name the client sent.
    `counter` counts the prompt's tokens (Shimmy's model name); where it cannot, the estimate does.
    `profile`: the Shimmy release behind us (None: streams always). Where its streams swallow failures and its
    non-stream answer reports them, a non-stream client's generation is asked for in one piece.
    `limits`: each model's context; a prompt over it is refused here, and `max_tokens` clamped to what fits.
    """
    model, prompt, stops = _prompt(request, template_overrides, known_models, aliases)
    prompt_tokens, kind = _count(counter, model, prompt)
    max_tokens = request.max_tokens
    if limits is not None:
        param = "prompt" if request.prompt is not None else "messages"
        max_tokens = limits.fit(model, prompt_tokens, kind, max_tokens, param)
    upstream_stream = (
        request.stream or profile is None or profile.stream_errors_reported or not profile.nonstream_failure_502
    )
    body = generate_body(
        model, prompt, max_tokens, request.temperature, request.top_p, request.top_k, stream=upstream_stream
    )
    gen = Generation(
        model=request.model,
        stream=request.stream,
        max_tokens=max_tokens,
        prompt_tokens=prompt_tokens,
        prompt_tokens_kind=kind,
        stops=StopMatcher(request.stops + stops),
        client_stops=frozenset(request.stops),
        deadline=time.monotonic() + timeout,
        upstream_stream=upstream_stream,
        completion_tokens_kind=EXACT if upstream_stream else kind,
        counter=counter,
        shimmy_model=model,
        tooling=request.tooling,
    )
    return body, Exchange(gen, api)


def count_prompt(
    request: GenerationRequest,
    template_overrides: Mapping[str, str],
    known_models: Collection[str] | None = None,
    aliases: Mapping[str, str] | None = None,
    *,
    counter: PromptCounter = ESTIMATE,
) -> int:
    """The prompt tokens `start` would count for `request`, without a generation (Anthropic's count_tokens)."""
    model, prompt, _ = _prompt(request, template_overrides, known_models, aliases)
    return _count(counter, model, prompt)[0]


def _prompt(
    request: GenerationRequest,
    template_overrides: Mapping[str, str],
    known_models: Collection[str] | None,
    aliases: Mapping[str, str] | None,
) -> tuple[str, str, tuple[str, ...]]:
    """(Shimmy's model name, the prompt it is sent, the template's end-of-turn markers to stop at)."""
    model = aliases.get(request.model, request.model) if aliases else request.model
    if known_models is not None and model not in known_models:
        raise ModelNotFound(request.model)
    if request.prompt is not None:
        return model, request.prompt, ()
    template = templates.template_for(model, template_overrides)
    turns = to_turns(template, request.messages, request.tooling)
    return model, templates.render(template, turns), templates.STOP_MARKERS[template]


def _count(counter: PromptCounter, model: str, prompt: str) -> tuple[int, str]:
    """(tokens, "exact" or "estimated"): the counter's, or the estimate where it has no vocabulary for `model`."""
    tokens = counter.count(model, prompt)
    return (tokens, counter.kind) if tokens is not None else (estimate_tokens(prompt), ESTIMATED)
