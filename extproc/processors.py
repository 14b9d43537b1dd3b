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

import datetime
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar
from urllib.parse import unquote

import msgspec
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2

from extproc import metrics, mutations, tracing
from extproc.admission import AbandonReason, Admission, Busy, Ticket
from extproc.apis import APIS
from extproc.apis.messages import MessagesCountTokens
from extproc.errors import GatewayError, InvalidRequest, ModelNotFound, Unavailable, UpstreamError
from extproc.generation import Api, Exchange, count_prompt, start
from extproc.health import ShimmyMonitor
from extproc.limits import ContextLimits
from extproc.shimmy_protocol import GENERATE_PATH, model_names, upstream_error
from extproc.tokens import ESTIMATE, PromptCounter
from shimmy.versions import BackendProfile

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

_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class Context:
    """What processors share across streams: read-only settings and the Shimmy monitor."""

    templates: Mapping[str, str]
    monitor: ShimmyMonitor
    generation_timeout: float  # seconds; a stream still running then ends with an in-band error
    aliases: Mapping[str, str] = field(default_factory=dict)  # client-facing name -> Shimmy's model
    prompt_counter: PromptCounter = ESTIMATE  # exact with TOKENIZER_GGUF, else the estimate
    admission: Admission | None = None  # generation slots; None admits everything (Envoy's breaker alone)
    profile: BackendProfile | None = None  # the Shimmy behind us (cli.build: SHIMMY_VERSION's); None: always stream
    limits: ContextLimits | None = None  # each model's context (cli.build sets it from the profile); None: unchecked

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

    def request_body(self, msg: ep.HttpBody) -> ep.ProcessingResponse:
        ctx, api = self.ctx, MessagesCountTokens
        try:
            request = api.parse(msg.body)
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


_EXT_PROC = "envoy.filters.http.ext_proc"  # the key Envoy files the request attributes under

_STREAM_HEADERS = (
    ("content-type", "text/event-stream"),
    ("cache-control", "no-cache"),
    ("x-accel-buffering", "no"),
)
_JSON_HEADERS = (("content-type", "application/json"),)


class GenerationProcessor(Processor):
    """A client API's request -> Shimmy `/api/generate` and back. The generation is `extproc.generation`'s, the
    API's shapes are its adapter's (`extproc.apis`); this class only moves bytes between them and Envoy.

    Besides that, it keeps the request's metrics and, on its last answer, hands Envoy the request's model, token
    counts and timings as dynamic metadata for the access log.
    """

    def __init__(self, ctx: Context, api: type[Api]) -> None:
        super().__init__(ctx)
        self.api = api
        self.exchange: Exchange | None = None
        self.started = time.monotonic()
        self.model = ""  # as the client named it, once the body is read
        self.served_model = False  # a generation started for it, on a model in Shimmy's list (or its alias)
        self.outcome: str | None = None  # set once the request's end is recorded
        self.ticket: Ticket | None = None  # this generation's slot, until Shimmy is done with it
        self.held_headers: list[mutations.Header] | None = None  # a non-stream answer's headers, until it is whole
        self.queued: tuple[float, float] | None = None  # (since, until): the wait for a slot, when there was one

    def attributes(self, attributes: Mapping[str, struct_pb2.Struct]) -> None:
        """The request's arrival (Envoy's `request.time`): its deadline and duration count from there, not from the
        moment its body was whole, so a slow upload cannot push the answer past the outer proxy's limit."""
        sent = attributes.get(_EXT_PROC)
        arrival = sent.fields.get("request.time") if sent is not None else None
        if arrival is None or not arrival.string_value:
            return
        try:
            arrived = datetime.datetime.fromisoformat(arrival.string_value).timestamp()
        except ValueError:
            return
        self.started = time.monotonic() - max(0.0, time.time() - arrived)

    def request_body(self, msg: ep.HttpBody) -> ep.ProcessingResponse | Awaitable[ep.ProcessingResponse]:
        """Shimmy's request, once a generation slot is free: at once, or (awaitable) after queueing for one."""
        ctx = self.ctx
        try:
            request, api = self.api.parse(msg.body)
            self.model = request.model
            body, self.exchange = start(
                request,
                api,
                ctx.templates,
                ctx.known_models,
                ctx.generation_timeout - (time.monotonic() - self.started),  # the deadline counts from arrival
                ctx.aliases,
                counter=ctx.prompt_counter,
                profile=ctx.profile,
                limits=ctx.limits,
            )
        except GatewayError as exc:
            return self._failed(exc)
        self.served_model = ctx.known_models is not None  # checked against Shimmy's list, not taken on trust
        forward = mutations.request_body(
            body,
            [(":path", GENERATE_PATH), ("content-type", "application/json"), ("content-length", str(len(body)))],
        )
        admission, gen = ctx.admission, self.exchange.gen
        if admission is None:
            return forward
        self.ticket = admission.try_admit(gen.model, gen.max_tokens, gen.prompt_tokens)
        if self.ticket is not None:
            return forward
        if not ctx.monitor.healthy:  # no slot, and none will come soon from a Shimmy that is not answering
            self.exchange = None  # nothing reached Shimmy
            return self._failed(Unavailable("Shimmy is not available; retry later"))
        return self._queue(admission, forward)

    async def _queue(self, admission: Admission, forward: ep.ProcessingResponse) -> ep.ProcessingResponse:
        """Wait for a slot (bounded below Envoy's message_timeout), else 429 with Retry-After."""
        gen = self.exchange.gen if self.exchange is not None else None
        assert gen is not None
        since = time.monotonic()
        try:
            self.ticket = await admission.admit(gen.model, gen.max_tokens, gen.prompt_tokens)
        except Busy as exc:
            self.queued = (since, time.monotonic())
            self.exchange = None  # nothing reached Shimmy
            return self._failed(exc)
        self.queued = (since, time.monotonic())
        return forward

    def _shimmy_progress(self, end: bool) -> None:
        """Tell the slot how far Shimmy got; `end`: Shimmy's response is over, so is its generation."""
        ticket = self.ticket
        if ticket is None:
            return
        gen = self.exchange.gen if self.exchange is not None else None
        if gen is not None and gen.upstream_stream:  # a one-piece answer (1.x) arrives whole: no pace to learn
            ticket.progress(gen.completion_tokens)
        if end or (gen is not None and (gen.upstream_done or gen.upstream_failed)):
            ticket.finish()  # Shimmy's [DONE] or [ERROR]: the ext_proc stream may close before its last byte

    def response_headers(self, msg: ep.HttpHeaders) -> ep.ProcessingResponse | None:
        exchange = self.exchange
        status = _status(msg)
        if exchange is None or (status != 200 and _local_reply(msg)):
            # Either an earlier filter answered (an Envoy local reply, already JSON) and it passes through, or
            # a request without a body still reached Shimmy, whose answer must not count.
            if exchange is None and 200 <= status < 300:
                return self._failed(InvalidRequest("The request body is missing", code="missing_body"))
            self.exchange = None  # Shimmy generated nothing: no tokens to count
            if self.ticket is not None:
                if status == 504:  # Envoy's deadline: Shimmy may still be generating
                    self.ticket.abandon("deadline")
                else:  # Envoy answered instead of Shimmy, or Shimmy's connection died
                    self.ticket.finish()
            response = mutations.continue_response_headers()
            return response if exchange is None else self._record(response, "error", f"http_{status}")
        gen = exchange.gen
        if status == 502 and not gen.upstream_stream:  # 1.x one-piece answer: its only way to say it failed
            message = "Shimmy failed to generate the answer (502: the generation failed, or the model's load did)"
            return self._failed(UpstreamError(message, code="generation_failed"))
        if status != 200:
            self._shimmy_progress(end=True)  # Shimmy refused or failed before generating
            return self._failed(upstream_error(status, b"", gen.model))
        counted = (  # "exact" or "estimated"
            ("x-gateway-prompt-tokens", gen.prompt_tokens_kind),
            ("x-gateway-completion-tokens", gen.completion_tokens_kind),
        )
        if gen.stream:
            return mutations.response_headers(_STREAM_HEADERS + counted, ["content-length"], mutations.DUPLEX_RESPONSE)
        if not self.response_duplex:  # BUFFERED: the whole body comes in one message, headers still held by Envoy
            return mutations.response_headers(_JSON_HEADERS + counted, ["content-length"])
        # Non-stream: the headers wait until the answer is whole, so its status can still be an error (a Shimmy
        # failure mid-generation is a 502, never a 200 with a broken body). Envoy streams Shimmy's body to us
        # meanwhile (FULL_DUPLEX_STREAMED): a stop sequence or the deadline ends the answer without Shimmy's rest.
        self.held_headers = [*_JSON_HEADERS, *counted]
        return None

    def response_body(self, msg: ep.HttpBody) -> ep.ProcessingResponse | list[ep.ProcessingResponse] | None:
        exchange = self.exchange
        if exchange is None:  # an Envoy local reply passing through (see response_headers): full duplex echoes it
            if self.response_duplex:
                return mutations.streamed_body(msg.body, msg.end_of_stream)
            return mutations.continue_response_body()
        if exchange.finished:  # the client's answer is complete; Shimmy's late chunks only count its tokens
            if self.ticket is not None:
                self.ticket.progress(self.ticket.tokens + msg.body.count(b"\n\n"))  # about one per event
            self._shimmy_progress(msg.end_of_stream)
            return None
        if exchange.gen.stream:
            out = exchange.relay(msg.body, msg.end_of_stream)
            self._shimmy_progress(msg.end_of_stream)
            if not exchange.finished:
                return mutations.streamed_body(out, False) if out else None
            outcome = ("error", exchange.failure) if exchange.failure else ("ok", "")
            return self._record(mutations.streamed_body(out, True), *outcome)
        if not self.response_duplex:
            try:
                body = exchange.complete(msg.body)
            except GatewayError as exc:
                return self._failed(exc)
            finally:
                self._shimmy_progress(end=True)  # a buffered body is Shimmy's whole answer
            return self._record(mutations.response_body(body, [("content-length", str(len(body)))]), "ok", "")
        try:
            whole = exchange.collect(msg.body, msg.end_of_stream)
        except GatewayError as exc:
            # The headers were held, so the error gets its own status. Not an immediate response: Envoy's
            # local-reply mappers would rewrite a 504 of ours as its own gateway_error.
            self.held_headers = [(":status", str(exc.status)), *_JSON_HEADERS]
            answer = self._release_held(self.api.error_body(exc))
            self._record(answer[-1], "error", exc.code or exc.type)
            return answer
        finally:
            self._shimmy_progress(msg.end_of_stream)
        if whole is None:
            return None
        answer = self._release_held(whole)
        self._record(answer[-1], "ok", "")
        return answer

    def _release_held(self, body: bytes) -> list[ep.ProcessingResponse]:
        """The held headers and the whole body, which ends the response (chunked: full duplex drops lengths)."""
        headers, self.held_headers = self.held_headers or [], None
        return [mutations.response_headers(headers, ["content-length"]), mutations.streamed_body(body, True)]

    def close(self) -> None:
        if self.outcome is None and self.exchange is not None:  # the client or Envoy went away mid-request
            self._record(None, "cancelled", "")
        ticket = self.ticket
        if ticket is not None and not ticket.released:  # Shimmy goes on generating for nobody
            ticket.abandon(self._abandon_reason())

    def _abandon_reason(self) -> AbandonReason:
        exchange = self.exchange
        if exchange is None or not exchange.finished:
            return "client_gone"
        if exchange.failure is not None:
            return "deadline" if exchange.failure == "timeout" else "error"
        return "stop_sequence"

    def _failed(self, exc: GatewayError) -> ep.ProcessingResponse:
        response = mutations.immediate(exc.status, self.api.error_body(exc), _retry_after(exc))
        return self._record(response, "error", exc.code or exc.type)

    def _record(self, response: ResponseT, outcome: str, error_type: str) -> ResponseT:
        """Count the request's end once, and put its summary in Envoy's dynamic metadata for the access log.

        The metrics name the model only once it was checked against Shimmy's list and a generation started for it:
        a name a client made up is `unknown` there, so no client can grow the metrics without bound. The access log
        keeps it.
        """
        self.outcome = outcome
        duration = time.monotonic() - self.started
        exchange, model, api = self.exchange, self.model or "unknown", self.api.route
        label = model if self.served_model else "unknown"
        error = "cancelled" if outcome == "cancelled" else error_type
        fields: dict[str, str | float] = {
            "api": api,
            "model": model,
            "outcome": outcome,
            "duration_ms": round(duration * 1000, 1),
        }
        if exchange is None:
            metrics.request_ended(self.api.operation, label, api, error, duration)
        else:
            gen = exchange.gen
            ttft = gen.first_content_at - self.started if gen.stream and gen.first_content_at is not None else None
            tokens = (gen.prompt_tokens, gen.completion_tokens)
            metrics.request_ended(self.api.operation, label, api, error, duration, gen.stream, tokens, ttft)
            fields["prompt_tokens"], fields["completion_tokens"] = tokens
            if ttft is not None:  # a non-stream client sees no first token
                fields["ttft_ms"] = round(ttft * 1000, 1)
        if response is not None:
            mutations.set_metadata(response, fields)
        if tracing.enabled():
            self._trace(error)
        return response

    def _trace(self, error: str) -> None:
        """The request's span (extproc.tracing): where its time went, its tokens and how it ended; no text."""
        operation, exchange = self.api.operation, self.exchange
        attributes: dict[str, str | int | float | list[str]] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": "shimmy",
            "gen_ai.request.model": self.model or "unknown",
            "shimmy.api": self.api.route,
        }
        events: list[tuple[str, float]] = []
        if self.queued is not None:
            since, until = self.queued
            attributes["shimmy.queue.wait"] = until - since
            events += [("queued", since), ("admitted", until)]
        if exchange is not None:
            gen = exchange.gen
            attributes["gen_ai.response.model"] = gen.shimmy_model
            attributes["gen_ai.request.max_tokens"] = gen.max_tokens
            attributes["gen_ai.usage.input_tokens"] = gen.prompt_tokens
            attributes["gen_ai.usage.output_tokens"] = gen.completion_tokens
            attributes["shimmy.stream"] = gen.stream
            if not error:
                attributes["gen_ai.response.finish_reasons"] = [gen.stop_reason]
            if gen.first_content_at is not None:
                attributes["gen_ai.server.time_to_first_token"] = gen.first_content_at - self.started
                events.append(("first_token", gen.first_content_at))
        name = f"{operation} {self.model}" if self.model else operation
        tracing.record(name, self.traceparent, self.started, attributes, events, error)


ResponseT = TypeVar("ResponseT", ep.ProcessingResponse, None)


ROUTES: dict[str, Callable[[Context], Processor]] = {
    **{route: partial(GenerationProcessor, api=api) for route, api in APIS.items()},
    "models": ModelsProcessor,
    "model": ModelProcessor,
    MessagesCountTokens.route: TokenCountProcessor,
    "health": HealthProcessor,
    "metrics": MetricsProcessor,
}
