"""One processor object per ext_proc stream (= one HTTP request), one method per phase.

Envoy's route tells us which endpoint a stream belongs to through the `x-gateway-route` gRPC metadata
(envoy/gateway.yaml, `grpc_initial_metadata`), and each route's processing mode sends only the phases its
processor needs:

    route    phases Envoy sends                          messages per request
    health   request headers                             1 (answered at once)
    metrics  response headers, response body (STREAMED)  2 + one per chunk of admin's stats (ours after the last)
    models   response headers, response body (BUFFERED)  2
    model    request headers, response headers,          3 (GET /v1/models/{model})
             response body (BUFFERED)
    messages_count_tokens  request body (BUFFERED)       1 (answered at once: Shimmy is not asked)
    chat     request body (BUFFERED), response headers,  2 + one per Shimmy chunk (a non-stream answer's
    (every   response body (FULL_DUPLEX_STREAMED)        headers are answered with its whole body, which
    API of extproc.apis alike:                           lets it end early and still carry an error status)
    messages, responses, completions)

A generation first needs a slot (`extproc.admission`): its request body may wait for one.

A phase a processor does not override answers "continue unchanged" (the `Processor` base).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Literal, TypeVar
from urllib.parse import unquote

import msgspec
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2

from extproc import metrics, mutations
from extproc.admission import AbandonReason, Admission, Busy
from extproc.apis import APIS
from extproc.apis.messages import MessagesCountTokens
from extproc.errors import GatewayError, InvalidRequest, ModelNotFound, Unavailable, UpstreamError
from extproc.generation import Api, Exchange, Generation, count_prompt, start
from extproc.health import ShimmyMonitor
from extproc.lease import SlotLease
from extproc.limits import ContextLimits
from extproc.record import RequestRecord
from extproc.shimmy_protocol import GENERATE_PATH, model_names, upstream_error
from extproc.tokens import ESTIMATE, PromptCounter
from shimmy_spec.versions import BackendProfile

__all__ = [
    "ROUTES",
    "Context",
    "GenerationProcessor",
    "HealthProcessor",
    "MetricsProcessor",
    "ModelProcessor",
    "ModelsProcessor",
    "Processor",
    "TokenCountProcessor",
]

_T = TypeVar("_T")
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class Context:
    """What processors share across streams: read-only settings and the Shimmy monitor."""

    templates: Mapping[str, str]
    monitor: ShimmyMonitor
    generation_timeout: float  # seconds; a stream still running then ends with an in-band error
    keepalive: float = 15.0  # seconds of silence on a stream before a keep-alive goes out (0: never; cli sets it)
    aliases: Mapping[str, str] = field(default_factory=dict)  # client-facing name -> Shimmy's model
    prompt_counter: PromptCounter = ESTIMATE  # exact with TOKENIZER_GGUF, else the estimate
    admission: Admission | None = None  # generation slots; None admits everything (Envoy's breaker alone)
    profile: BackendProfile | None = None  # the Shimmy behind us (cli.build: SHIMMY_VERSION's); None: always stream
    limits: ContextLimits | None = None  # each model's context (cli.build sets it from the profile); None: unchecked
    waiting_timeout: float = 0.0  # seconds Envoy allows a request body that waits (for a slot); 0: no override

    @property
    def known_models(self) -> Collection[str] | None:
        return self.monitor.models


def _header(headers: ep.HttpHeaders, name: str) -> str:
    for h in headers.headers.headers:
        if h.key == name:
            raw: bytes = h.raw_value or h.value.encode()
            return raw.decode()
    return ""


def _status(headers: ep.HttpHeaders) -> int:
    return int(_header(headers, ":status") or 0)


def _local_reply(headers: ep.HttpHeaders) -> bool:
    """An error Envoy made itself (an earlier filter refused the request, or the queue is full).

    Envoy's local-reply config makes every such reply JSON (envoy/gateway.yaml), while Shimmy's native errors are
    empty or plain text, so a JSON error is passed through untouched rather than wrapped as Shimmy's failure.
    """
    return _header(headers, "content-type").startswith("application/json")


def _error(exc: GatewayError) -> ep.ProcessingResponse:
    return mutations.immediate(exc.status, exc.body())


def _retry_after(exc: GatewayError) -> list[mutations.Header]:
    return [("retry-after", str(exc.retry_after))] if isinstance(exc, Busy | Unavailable) else []


class Processor:
    """Pass-through: every phase continues unchanged."""

    # The route's response body mode is FULL_DUPLEX_STREAMED (Envoy's protocol_config on the stream's first
    # message says so); else BUFFERED, as in an Envoy of the user's own that keeps the older chat route.
    response_duplex = False
    traceparent = ""  # the span context of Envoy's ext_proc call (W3C), when Envoy traces

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def attributes(self, attributes: Mapping[str, struct_pb2.Struct]) -> None:
        """Envoy's request attributes (the ext_proc filter's `request_attributes`), before the phase they came with."""

    def request_headers(self, msg: ep.HttpHeaders) -> ep.ProcessingResponse:
        return ep.ProcessingResponse(request_headers=ep.HeadersResponse())

    def request_body(self, msg: ep.HttpBody) -> ep.ProcessingResponse:
        return mutations.continue_request_body()

    def response_headers(self, msg: ep.HttpHeaders) -> ep.ProcessingResponse:
        return mutations.continue_response_headers()

    def response_body(self, msg: ep.HttpBody) -> ep.ProcessingResponse | None:
        """None answers nothing for this chunk, which only a FULL_DUPLEX_STREAMED body allows."""
        return mutations.continue_response_body()

    def waiting(self) -> ep.ProcessingResponse | None:
        """What goes to Envoy before the server awaits an answer (a phase returned an awaitable): for a request
        body that may wait for a slot, the longer timer it needs (`Context.waiting_timeout`)."""
        return None

    timed = False  # GenerationProcessor: the stream loop calls `tick` when `wake_at` comes, message or not

    def wake_at(self) -> float | None:
        """When (time.monotonic()) `tick` is due next; None: no timer."""
        return None

    def tick(self, now: float) -> list[ep.ProcessingResponse]:
        """Answers the processor sends of its own accord, at `now` (full duplex bodies take them at any time)."""
        return []

    def close(self) -> None:
        """The stream ended (normally, or because the client or Envoy went away)."""


class HealthProcessor(Processor):
    """Liveness (`/v1/health/live`) and readiness (`/v1/health/ready`, `/v1/health`, `/health`), from the monitor's
    last probe: answered at once, so a probe never waits on a busy Shimmy."""

    def request_headers(self, msg: ep.HttpHeaders) -> ep.ProcessingResponse:
        monitor = self.ctx.monitor
        live = _header(msg, ":path").partition("?")[0].endswith("/live")
        status, body = monitor.liveness() if live else monitor.answer()
        return mutations.immediate(status, body)


class ModelsProcessor(Processor):
    """Shimmy `/api/models` (Envoy rewrote the path) -> OpenAI model list."""

    passthrough = False  # the response is an Envoy local reply, not Shimmy's list

    def response_headers(self, msg: ep.HttpHeaders) -> ep.ProcessingResponse:
        status = _status(msg)
        if status != 200:
            if not _local_reply(msg):
                return _error(upstream_error(status, b""))
            self.passthrough = True
        return mutations.continue_response_headers()

    def response_body(self, msg: ep.HttpBody) -> ep.ProcessingResponse:
        if self.passthrough:
            return mutations.continue_response_body()
        try:
            names = model_names(msg.body)
        except GatewayError as exc:
            return _error(exc)
        served = set(names)
        ids = sorted(served | {alias for alias, model in self.ctx.aliases.items() if model in served})
        try:
            body = self.answer(ids, int(time.time()))
        except GatewayError as exc:
            return _error(exc)
        return mutations.response_body(body, [("content-type", "application/json"), ("content-length", str(len(body)))])

    def answer(self, ids: list[str], created: int) -> bytes:
        """The OpenAI list of the served models and their aliases."""
        return _encode({"object": "list", "data": [_model(i, created) for i in ids]})


def _model(model_id: str, created: int) -> dict[str, object]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "shimmy"}


class ModelProcessor(ModelsProcessor):
    """`GET /v1/models/{model}`: the one model from Shimmy's list (an alias counts), or 404 model_not_found."""

    wanted = ""

    def request_headers(self, msg: ep.HttpHeaders) -> ep.ProcessingResponse:
        path = _header(msg, ":path").partition("?")[0]
        self.wanted = unquote(path.rpartition("/")[2])
        return super().request_headers(msg)

    def answer(self, ids: list[str], created: int) -> bytes:
        if self.wanted not in ids:
            raise ModelNotFound(self.wanted)
        return _encode(_model(self.wanted, created))


class TokenCountProcessor(Processor):
    """`POST /v1/messages/count_tokens`: the prompt is rendered and counted exactly as a generation would be
    (`generation.count_prompt`), and the count is the answer; Shimmy is never asked."""

    def request_body(self, msg: ep.HttpBody) -> ep.ProcessingResponse | Awaitable[ep.ProcessingResponse]:
        if len(msg.body) > OFF_LOOP_BYTES:  # as a generation's: its tools' schemas are checked, its prompt counted
            return _on_preparing_thread(self._answer, msg.body)
        return self._answer(msg.body)

    def _answer(self, raw: bytes) -> ep.ProcessingResponse:
        ctx, api = self.ctx, MessagesCountTokens
        try:
            request = api.parse(raw)
            tokens = count_prompt(request, ctx.templates, ctx.known_models, ctx.aliases, counter=ctx.prompt_counter)
        except GatewayError as exc:
            return mutations.immediate(exc.status, api.error_body(exc))
        return mutations.immediate(200, api.render(tokens))


class MetricsProcessor(Processor):
    """Envoy's `/stats/prometheus` (Envoy rewrote the path to its admin) with the processor's metrics appended.

    Only to admin's 200: any other answer on this route (the API key filter's 401, admin unreachable) is Envoy's
    own reply and passes through untouched, so the metrics never leak past the key. The body is STREAMED, not
    BUFFERED: Envoy's stats outgrow a small MAX_REQUEST_BYTES (the connection's buffer limit), so ours go after
    admin's last chunk instead of onto one buffered body.
    """

    passthrough = True  # until the response headers say admin answered 200

    def response_headers(self, msg: ep.HttpHeaders) -> ep.ProcessingResponse:
        self.passthrough = _status(msg) != 200
        if self.passthrough:
            return mutations.continue_response_headers()
        return mutations.response_headers(remove=["content-length"])  # the body grows by ours

    def response_body(self, msg: ep.HttpBody) -> ep.ProcessingResponse:
        if self.passthrough or not msg.end_of_stream:
            return mutations.continue_response_body()
        return mutations.response_body(msg.body + metrics.exposition())


_STREAM_HEADERS = (
    ("content-type", "text/event-stream"),
    ("cache-control", "no-cache"),
    ("x-accel-buffering", "no"),
)
_JSON_HEADERS = (("content-type", "application/json"),)

# Bodies larger than this are prepared on a thread of their own, one at a time (so the event loop still gets
# Python's GIL every switch interval, 5 ms), smaller ones on the loop: the hop costs ~0.1 ms, and checking the
# schemas of a 2 KiB body never seen before measured ~5 ms (8 KiB: 18 ms; a cached schema: well under 1 ms).
OFF_LOOP_BYTES = 2 * 1024
_PREPARING = ThreadPoolExecutor(max_workers=1, thread_name_prefix="extproc-prepare")


async def _on_preparing_thread(prepare: Callable[[bytes], _T], raw: bytes) -> _T:
    return await asyncio.get_running_loop().run_in_executor(_PREPARING, prepare, raw)

_SHIMMY_END = re.compile(rb"^data: ?\[(?:DONE|ERROR)", re.MULTILINE)  # Shimmy's last event, read past the answer's end

Phase = Literal["request", "forwarded", "held", "streaming", "buffered", "passthrough"]


class GenerationProcessor(Processor):
    """A client API's request -> Shimmy `/api/generate` and back: the phase protocol, and nothing else.

    The generation is `extproc.generation`'s, the API's shapes are its adapter's (`extproc.apis`), the slot is the
    `SlotLease`'s and the request's metrics and access-log summary are the `RequestRecord`'s; this class moves bytes
    between them and Envoy, and keeps time: the deadline and the keep-alive fire from a timer (`wake_at`, `tick`),
    not only when Shimmy's next chunk arrives, so a Shimmy gone silent still gets the client its error.
    """

    timed = True

    def __init__(self, ctx: Context, api: type[Api]) -> None:
        super().__init__(ctx)
        self.api = api
        self.exchange: Exchange | None = None
        self.lease = SlotLease(ctx.admission)
        self.record = RequestRecord(api.route, api.operation)
        self.phase: Phase = "request"
        self.held_headers: list[mutations.Header] | None = None  # the client's headers, until they can go (below)
        self.body_seen = False  # Shimmy's first body chunk arrived: Envoy takes body answers from now on
        self.quiet_since = 0.0  # when the client last got bytes of a stream (the keep-alive counts from it)

    @property
    def traceparent(self) -> str:
        return self.record.traceparent

    @traceparent.setter
    def traceparent(self, value: str) -> None:
        """The server sets it (Envoy's span context); the request's span continues it (`RequestRecord`)."""
        self.record.traceparent = value

    def attributes(self, attributes: Mapping[str, struct_pb2.Struct]) -> None:
        self.record.arrived(attributes)

    # --- request ---------------------------------------------------------------------------------------------

    def request_body(self, msg: ep.HttpBody) -> ep.ProcessingResponse | Awaitable[ep.ProcessingResponse]:
        """Shimmy's request, once a generation slot is free: at once, or (awaitable) after queueing for one.

        A large body is prepared on the preparing thread: checking a client's new JSON schemas, tokenizing a long
        prompt or building a stop automaton would otherwise hold the event loop (and every other stream) for up to
        a third of a second (measured: 334 ms for 90 KiB of tools never seen before)."""
        if len(msg.body) > OFF_LOOP_BYTES:
            return self._prepared_off_loop(msg.body)
        return self._admit(self._prepare(msg.body))

    def _prepare(self, raw: bytes) -> tuple[Exchange, bytes] | GatewayError:
        """The client's request parsed, checked and translated: Shimmy's body, or the error to answer with."""
        ctx = self.ctx
        try:
            request, api = self.api.parse(raw)
            self.record.model = request.model
            body, exchange = start(
                request,
                api,
                ctx.templates,
                ctx.known_models,
                ctx.generation_timeout - (time.monotonic() - self.record.started),  # the deadline counts from arrival
                ctx.aliases,
                counter=ctx.prompt_counter,
                profile=ctx.profile,
                limits=ctx.limits,
            )
        except GatewayError as exc:
            return exc
        return exchange, body

    def waiting(self) -> ep.ProcessingResponse | None:
        timeout = self.ctx.waiting_timeout
        return mutations.message_timeout(timeout) if timeout > 0 and self.phase == "request" else None

    async def _prepared_off_loop(self, raw: bytes) -> ep.ProcessingResponse:
        prepared = await _on_preparing_thread(self._prepare, raw)
        admitted = self._admit(prepared)
        return admitted if isinstance(admitted, ep.ProcessingResponse) else await admitted

    def _admit(
        self, prepared: tuple[Exchange, bytes] | GatewayError
    ) -> ep.ProcessingResponse | Awaitable[ep.ProcessingResponse]:
        if isinstance(prepared, GatewayError):
            return self._failed(prepared)
        ctx = self.ctx
        exchange, body = prepared
        self.exchange = exchange
        self.record.served_model = ctx.known_models is not None  # checked against Shimmy's list, not taken on trust
        forward = mutations.request_body(
            body,
            [(":path", GENERATE_PATH), ("content-type", "application/json"), ("content-length", str(len(body)))],
        )
        gen = exchange.gen
        if self.lease.try_acquire(gen.model, gen.max_tokens, gen.prompt_tokens):
            self.phase = "forwarded"
            return forward
        if not ctx.monitor.healthy:  # no slot, and none will come soon from a Shimmy that is not answering
            self.exchange = None  # nothing reached Shimmy
            return self._failed(Unavailable("Shimmy is not available; retry later"))
        return self._queue(gen, forward)

    async def _queue(self, gen: Generation, forward: ep.ProcessingResponse) -> ep.ProcessingResponse:
        """Wait for a slot (bounded below Envoy's message_timeout), else 429 with Retry-After."""
        since = time.monotonic()
        try:
            await self.lease.acquire(gen.model, gen.max_tokens, gen.prompt_tokens)
        except Busy as exc:
            self.record.queued = (since, time.monotonic())
            self.exchange = None  # nothing reached Shimmy
            return self._failed(exc)
        self.record.queued = (since, time.monotonic())
        self.phase = "forwarded"
        return forward

    # --- response --------------------------------------------------------------------------------------------

    def response_headers(self, msg: ep.HttpHeaders) -> ep.ProcessingResponse | None:
        status, envoy_reply = _status(msg), _local_reply(msg)
        self.lease.upstream_status(status, envoy_reply)  # first, whatever branch answers: a non-200 ends Shimmy's work
        exchange = self.exchange
        if exchange is None or (status != 200 and envoy_reply):
            # Either an earlier filter answered (an Envoy local reply, already JSON) and it passes through, or
            # a request without a body still reached Shimmy, whose answer must not count.
            self.phase = "passthrough"
            if exchange is None and 200 <= status < 300:
                return self._failed(InvalidRequest("The request body is missing", code="missing_body"))
            self.exchange = None  # Shimmy generated nothing: no tokens to count
            response = mutations.continue_response_headers()
            return response if exchange is None else self.record.end(response, "error", f"http_{status}", None)
        gen = exchange.gen
        if status == 502 and not gen.upstream_stream:  # 1.x one-piece answer: its only way to say it failed
            message = "Shimmy failed to generate the answer (502: the generation failed, or the model's load did)"
            return self._failed(UpstreamError(message, code="generation_failed"))
        if status != 200:  # Shimmy refused or failed before generating
            return self._failed(upstream_error(status, b"", gen.model))
        counted = (  # "exact" or "estimated"
            ("x-gateway-prompt-tokens", gen.prompt_tokens_kind),
            ("x-gateway-completion-tokens", gen.completion_tokens_kind),
        )
        if not self.response_duplex:  # BUFFERED (an Envoy of the user's own): the headers are answered at once
            if gen.stream:  # and the stream switches to full duplex here
                self.phase, self.quiet_since = "streaming", time.monotonic()
                stream_headers = _STREAM_HEADERS + counted
                return mutations.response_headers(stream_headers, ["content-length"], mutations.DUPLEX_RESPONSE)
            self.phase = "buffered"  # the whole body comes in one message, headers still held by Envoy
            return mutations.response_headers(_JSON_HEADERS + counted, ["content-length"])
        # FULL_DUPLEX_STREAMED: the headers wait. A stream's, for Shimmy's first body chunk: Envoy takes no body
        # answer before one, so until then only an immediate response (the deadline's 504) can reach the client.
        # A non-stream answer's, until it is whole, so its status can still be an error (a Shimmy failure
        # mid-generation is a 502, never a 200 with a broken body); a stop sequence or the deadline ends the answer
        # without Shimmy's rest.
        self.phase = "held"
        self.held_headers = [*(_STREAM_HEADERS if gen.stream else _JSON_HEADERS), *counted]
        return None

    def response_body(self, msg: ep.HttpBody) -> ep.ProcessingResponse | list[ep.ProcessingResponse] | None:
        exchange = self.exchange
        if exchange is None:  # an Envoy local reply passing through (see response_headers): full duplex echoes it
            if self.response_duplex:
                return mutations.streamed_body(msg.body, msg.end_of_stream)
            return mutations.continue_response_body()
        gen, end = exchange.gen, msg.end_of_stream
        self.body_seen = True
        if exchange.finished:  # the client's answer is complete; Shimmy's late chunks only count its tokens
            self.lease.progress(self.lease.tokens + msg.body.count(b"\n\n"))  # about one per event
            if end or _SHIMMY_END.search(msg.body) is not None:
                self.lease.shimmy_done()
            return None
        if gen.stream:
            if self.held_headers is not None:  # Shimmy's first chunk: the stream's headers go out with it
                self.phase, self.quiet_since = "streaming", time.monotonic()
                headers, self.held_headers = self.held_headers, None
                first = self._stream_chunk(exchange, gen, msg.body, end)
                released = mutations.response_headers(headers, ["content-length"])
                return [released] if first is None else [released, first]
            return self._stream_chunk(exchange, gen, msg.body, end)
        if not self.response_duplex:
            try:
                body = exchange.complete(msg.body)
            except GatewayError as exc:
                return self._failed(exc)
            finally:
                self.lease.shimmy_done()  # a buffered body is Shimmy's whole answer
            return self.record.end(mutations.response_body(body, [("content-length", str(len(body)))]), "ok", "", gen)
        try:
            whole = exchange.collect(msg.body, end)
        except GatewayError as exc:
            return self._held_error(exc)
        finally:
            self._shimmy_progress(gen, end)
        if whole is None:
            return None
        answer = self._release_held(whole)
        self.record.end(answer[-1], "ok", "", gen)
        return answer

    def _stream_chunk(
        self, exchange: Exchange, gen: Generation, data: bytes, end: bool
    ) -> ep.ProcessingResponse | None:
        """One chunk of Shimmy's stream -> the client's stream bytes, if any; its end is recorded."""
        out = exchange.relay(data, end)
        self._shimmy_progress(gen, end)
        if not exchange.finished:
            if not out:
                return None
            self.quiet_since = time.monotonic()
            return mutations.streamed_body(out, False)
        outcome = ("error", exchange.failure) if exchange.failure else ("ok", "")
        return self.record.end(mutations.streamed_body(out, True), *outcome, gen)

    def _shimmy_progress(self, gen: Generation, end: bool) -> None:
        """Tell the slot how far Shimmy got; `end`: Shimmy's response is over, so is its generation."""
        if gen.upstream_stream:  # a one-piece answer (1.x) arrives whole: no pace to learn
            self.lease.progress(gen.completion_tokens)
        if end or gen.upstream_done or gen.upstream_failed:
            self.lease.shimmy_done()  # Shimmy's [DONE] or [ERROR]: the ext_proc stream may close before its last byte

    def _held_error(self, exc: GatewayError) -> list[ep.ProcessingResponse]:
        """A non-stream answer's error, with its own status (the headers were held for this), released as the held
        headers and a body, as a whole answer is."""
        self.held_headers = [(":status", str(exc.status)), *_JSON_HEADERS]
        answer = self._release_held(self.api.error_body(exc))
        gen = self.exchange.gen if self.exchange is not None else None
        self.record.end(answer[-1], "error", exc.code or exc.type, gen)
        return answer

    def _release_held(self, body: bytes) -> list[ep.ProcessingResponse]:
        """The held headers and the whole body, which ends the response (chunked: full duplex drops lengths)."""
        headers, self.held_headers = self.held_headers or [], None
        return [mutations.response_headers(headers, ["content-length"]), mutations.streamed_body(body, True)]

    # --- time ------------------------------------------------------------------------------------------------

    def wake_at(self) -> float | None:
        """The deadline, and a stream's next keep-alive, while Shimmy's answer is awaited and the client's is open.

        Before Shimmy's response headers the processor has no message of Envoy's to answer: there Envoy's route
        timeout, a second later, answers 504. A keep-alive needs the stream's headers out, which wait for Shimmy's
        first byte (`response_headers`): a prefill gets none.
        """
        exchange, phase = self.exchange, self.phase
        if exchange is None or exchange.finished or self.record.ended:
            return None
        if phase == "streaming":
            keepalive = self.ctx.keepalive
            deadline = exchange.gen.deadline
            return min(deadline, self.quiet_since + keepalive) if keepalive > 0 else deadline
        return exchange.gen.deadline if phase == "held" else None

    def tick(self, now: float) -> list[ep.ProcessingResponse]:
        """What is due at `now`: the deadline's error (in-band on a stream, the held status otherwise), or a
        stream's keep-alive; nothing when the timer fired early or for an answer that has ended since."""
        exchange = self.exchange
        if exchange is None or exchange.finished or self.record.ended or self.phase not in ("streaming", "held"):
            return []
        if now >= exchange.gen.deadline:
            if not self.body_seen:  # the headers message is still open: a JSON error before the headers
                self.held_headers = None
                return [self._failed(exchange.expire())]
            if self.phase == "held":
                return self._held_error(exchange.expire())
            out = exchange.expire_stream()
            return [self.record.end(mutations.streamed_body(out, True), "error", "timeout", exchange.gen)]
        keepalive = self.ctx.keepalive
        if self.phase != "streaming" or keepalive <= 0 or now < self.quiet_since + keepalive:
            return []
        self.quiet_since = now
        data = exchange.keepalive()
        return [mutations.streamed_body(data, False)] if data else []

    # --- the end ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        exchange = self.exchange
        if exchange is not None:  # unless its end was recorded: the client or Envoy went away mid-request
            self.record.end(None, "cancelled", "", exchange.gen)
        self.lease.close(self._abandon_reason())  # a slot still held: Shimmy goes on generating for nobody

    def _abandon_reason(self) -> AbandonReason:
        exchange = self.exchange
        if exchange is None or not exchange.finished:
            return "client_gone"
        if exchange.failure is not None:
            return "deadline" if exchange.failure == "timeout" else "error"
        return "stop_sequence"

    def _failed(self, exc: GatewayError) -> ep.ProcessingResponse:
        response = mutations.immediate(exc.status, self.api.error_body(exc), _retry_after(exc))
        gen = self.exchange.gen if self.exchange is not None else None
        return self.record.end(response, "error", exc.code or exc.type, gen)


ROUTES: dict[str, Callable[[Context], Processor]] = {
    **{route: partial(GenerationProcessor, api=api) for route, api in APIS.items()},
    "models": ModelsProcessor,
    "model": ModelProcessor,
    MessagesCountTokens.route: TokenCountProcessor,
    "health": HealthProcessor,
    "metrics": MetricsProcessor,
}
